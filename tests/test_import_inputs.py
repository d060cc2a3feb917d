"""`mmcl data import` without Ray: the spec, the per-row decoding and every bad input, each
one DataError naming the row id, the column and the file. The decode-and-write step is the
same callable Ray Data runs, called here in-process on small real files."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from import_files import COLOURS, image, image_text_table, write_spec, write_wav
from mmcl.data.ingest import (SUMMARY_COLUMN, _SPLIT_COLUMN, ImportSpec, _ImportBlock,
                              _row_split, build_manifest, load_spec)
from mmcl.data.schema import DataError


def run_block(spec: dict, rows: list[dict], base, out) -> dict:
    """One decode task over `rows` (ids 0.., all train): its summary."""
    spec = ImportSpec.model_validate(spec)
    manifest = build_manifest(spec)
    table = pa.Table.from_pylist([{**r, "id": i, _SPLIT_COLUMN: "train"}
                                  for i, r in enumerate(rows)])
    block = _ImportBlock(spec.model_dump_json(), manifest.to_json(), str(base), str(out),
                         None, None)
    return json.loads(block(table).column(SUMMARY_COLUMN)[0].as_py())


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    _, spec = image_text_table(folder, n=4)
    return folder, spec


def rows_of(n=4):
    return [{"file": f"img/{i}.{'jpg' if i % 4 == 3 else 'png'}",
             "caption": f"a small {COLOURS[i % 4]} square", "colour": COLOURS[i % 4],
             "tags": "small"} for i in range(n)]


def test_a_block_decodes_images_text_and_labels(table, tmp_path):
    folder, spec = table
    summary = run_block(spec, rows_of(), folder, tmp_path / "out")
    part = summary["splits"]["train"]
    assert part["rows"] == 4 and part["missing"] == {"image": 0, "caption": 0}
    assert part["stats"]["image"]["count"] == 4 * 16 * 16
    got = pq.read_table(part["files"][0])
    assert got.column("caption__len").to_pylist() == [4, 4, 4, 4]
    img = np.asarray(got.column("image").combine_chunks().to_numpy_ndarray())
    assert img.shape == (4, 3, 16, 16) and img.dtype == np.uint8
    red, green = img[0].reshape(3, -1).mean(1), img[1].reshape(3, -1).mean(1)
    assert red[0] > 150 > red[1] and green[1] > 150 > green[0]
    assert got.column("colour").to_pylist() == [0, 1, 2, 3]


@pytest.mark.parametrize("case, match", [
    ("missing file", r"row id 1, column 'file': file .*img/nope.png: no such file"),
    ("unreadable image", r"row id 1, column 'file': file .*bad.png: not a readable image"),
    ("wrong channels", r"row id 1, column 'file': file .*gray.png: the image has 1 channel"),
    ("text too long", r"row id 1, column 'caption': the text has 10 tokens, more than "
                      r"max_len=8; raise max_len or set truncation: true"),
    ("label not in classes", r"row id 1, column 'colour': 'purple' is not one of the "
                             r"declared classes"),
    ("multilabel not in classes", r"row id 1, column 'tags': 'huge' is not one of"),
])
def test_every_bad_input_is_one_error_naming_row_column_and_file(table, tmp_path, case, match):
    folder, spec = table
    (folder / "img" / "bad.png").write_bytes(b"not a png at all")
    image("red", mode="L").save(folder / "img" / "gray.png")
    rows = rows_of()
    bad = dict(rows[1])
    if case == "missing file":
        bad["file"] = "img/nope.png"
    elif case == "unreadable image":
        bad["file"] = "img/bad.png"
    elif case == "wrong channels":
        bad["file"] = "img/gray.png"
    elif case == "text too long":
        bad["caption"] = "a " * 9 + "square"
    elif case == "label not in classes":
        bad["colour"] = "purple"
    else:
        bad["tags"] = "small|huge"
    rows[1] = bad
    with pytest.raises(DataError, match=match):
        run_block(spec, rows, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the failing block wrote nothing


def test_the_error_is_the_first_bad_cell_in_row_then_spec_order(table, tmp_path):
    # The block decodes column by column; the error must still be the one a row-by-row
    # pass meets first.
    folder, spec = table
    rows = rows_of()
    rows[1] = {**rows[1], "colour": "purple"}
    rows[2] = {**rows[2], "file": "img/nope.png"}
    with pytest.raises(DataError, match=r"row id 1, column 'colour'"):
        run_block(spec, rows, folder, tmp_path / "out")
    rows[1] = {**rows[1], "file": "img/nope.png"}
    with pytest.raises(DataError, match=r"row id 1, column 'file'"):
        run_block(spec, rows, folder, tmp_path / "out")
    summary = run_block({**spec, "bad_rows": "drop"}, rows, folder, tmp_path / "out")
    assert summary["dropped"] == {"missing file": 2}  # row 1: its first bad cell only


def test_bad_rows_drop_counts_them_by_reason(table, tmp_path):
    folder, spec = table
    rows = rows_of()
    rows[0] = {**rows[0], "file": "img/nope.png"}
    rows[2] = {**rows[2], "colour": "purple"}
    summary = run_block({**spec, "bad_rows": "drop"}, rows, folder, tmp_path / "out")
    assert summary["dropped"] == {"missing file": 1, "label not in classes": 1}
    assert summary["splits"]["train"]["rows"] == 2


def test_truncation_and_nulls_become_lengths_and_missing(table, tmp_path):
    folder, spec = table
    spec = json.loads(json.dumps(spec))
    spec["modalities"]["caption"]["truncation"] = True
    rows = rows_of()
    rows[0] = {**rows[0], "caption": "a " * 12 + "square"}
    rows[1] = {**rows[1], "file": None}
    rows[2] = {**rows[2], "caption": ""}
    part = run_block(spec, rows, folder, tmp_path / "out")["splits"]["train"]
    assert part["missing"] == {"image": 1, "caption": 1}

    got = pq.read_table(part["files"][0])
    assert got.column("caption__len").to_pylist() == [8, 4, 0, 4]
    assert got.column("image__present").to_pylist() == [True, False, True, True]
    assert got.column("caption__present").to_pylist() == [True, True, False, True]


def test_audio_is_resampled_mono_and_cut_or_padded(tmp_path):
    write_wav(tmp_path / "a.wav", 440.0, rate=16000, seconds=0.25)   # 4000 samples
    write_wav(tmp_path / "b.wav", 440.0, rate=8000, seconds=0.05)    # 400 samples
    spec = {"modalities": {"wav": {"column": "wav", "kind": "audio", "sample_rate": 8000,
                                   "length": 1000}}}
    part = run_block(spec, [{"wav": "a.wav"}, {"wav": "b.wav"}], tmp_path,
                     tmp_path / "out")["splits"]["train"]
    got = np.asarray(pq.read_table(part["files"][0]).column("wav").combine_chunks()
                     .to_numpy_ndarray())
    assert got.shape == (2, 1000)
    assert np.abs(got[0]).max() > 0.4             # 2000 resampled samples, cut to 1000
    assert np.all(got[1, 400:] == 0) and np.abs(got[1, :400]).max() > 0.4  # zero-padded


def test_variable_npy_sequences_are_padded_with_lengths(tmp_path):
    for i, steps in enumerate((3, 5, 1)):
        np.save(tmp_path / f"s{i}.npy", np.full((steps, 2), i + 1.0))
    spec = {"modalities": {"seq": {"column": "f", "kind": "sequence", "max_len": 5,
                                   "features": 2}}}
    part = run_block(spec, [{"f": f"s{i}.npy"} for i in range(3)], tmp_path,
                     tmp_path / "out")["splits"]["train"]
    got = pq.read_table(part["files"][0])
    assert got.column("seq__len").to_pylist() == [3, 5, 1]
    np.save(tmp_path / "long.npy", np.zeros((6, 2)))
    with pytest.raises(DataError, match=r"row id 0, column 'f': file .*long.npy: 6 steps, "
                                        r"more than max_len=5"):
        run_block(spec, [{"f": "long.npy"}], tmp_path, tmp_path / "out2")


def test_spec_problems_name_the_file_and_field(tmp_path):
    path = write_spec(tmp_path / "s.yaml", {"modalities": {"img": {"column": "f",
                                                                    "kind": "image"}}})
    with pytest.raises(DataError, match=r"s.yaml: modalities.img: .*needs size"):
        load_spec(path)
    path = write_spec(tmp_path / "t.yaml", {"modalities": {"x": {"column": "f",
                                                                  "kind": "vector",
                                                                  "shape": [2]}},
                                            "labels": {"y": {"column": "y",
                                                             "task": "multilabel"}}})
    with pytest.raises(DataError, match=r"labels.y: .*needs its classes"):
        load_spec(path)
    with pytest.raises(DataError, match="no such spec file"):
        load_spec(str(tmp_path / "none.yaml"))


def test_seeded_split_is_stable_per_id():
    splits = [_row_split(i, (0.8, 0.1, 0.1), 0) for i in range(2000)]
    assert splits == [_row_split(i, (0.8, 0.1, 0.1), 0) for i in range(2000)]
    assert 0.75 < splits.count("train") / 2000 < 0.85
    assert splits != [_row_split(i, (0.8, 0.1, 0.1), 1) for i in range(2000)]


def test_an_empty_multilabel_cell_holds_no_class(table, tmp_path):
    folder, spec = table
    rows = rows_of(3)
    rows[0] = {**rows[0], "tags": ""}
    rows[1] = {**rows[1], "tags": "big|small"}
    part = run_block(spec, rows, folder, tmp_path / "out")["splits"]["train"]
    got = pq.read_table(part["files"][0]).column("tags").combine_chunks().to_numpy_ndarray()
    assert got.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0]]
