"""The tuple shard format: convert -> read -> inspect round trips, shard rolling, overwrite
protection, schema validation against the manifest, non-finite rows, and S3 (moto)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcl.data.convert import convert_npz
from mmcl.data.inspect import format_inspect, inspect_dataset
from mmcl.data.schema import ID_COLUMN, MANIFEST_NAME, DataError, LabelSpec, Manifest, ModalitySpec
from mmcl.data.shards import (ShardWriter, list_shards, read_manifest, read_split, validate,
                              write_dataset)

N = 200


@pytest.fixture
def npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "vec": rng.normal(2.0, 3.0, size=(N, 8)).astype(np.float32),
        "seq": rng.normal(size=(N, 4, 5)).astype(np.float32),
        "img": rng.uniform(size=(N, 2, 3, 3)).astype(np.float32),
        "cls": rng.integers(0, 3, size=N),
        "target": rng.normal(size=N).astype(np.float32),
        "id": np.arange(1000, 1000 + N),
    }


@pytest.fixture
def npz_path(tmp_path, npz_arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **npz_arrays)
    return str(path)


def small_manifest() -> Manifest:
    return Manifest([ModalitySpec("x", (4,)), ModalitySpec("s", (3, 2), "sequence")],
                    [LabelSpec("y", "classification", 2)])


def small_columns(n: int, start: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {ID_COLUMN: np.arange(start, start + n), "x": rng.normal(size=(n, 4)),
            "s": rng.normal(size=(n, 3, 2)), "y": rng.integers(0, 2, size=n)}


# ---------------------------------------------------------------------- convert/inspect


def test_convert_read_inspect_round_trip(tmp_path, npz_path, npz_arrays):
    out = str(tmp_path / "ds")
    manifest = convert_npz(npz_path, out, split=(0.8, 0.1, 0.1), seed=3)
    assert manifest.splits == {"train": 160, "val": 20, "test": 20}
    assert {m.name: m.kind for m in manifest.modalities} == {
        "vec": "vector", "seq": "sequence", "img": "image"}
    assert manifest.label("cls").task == "classification"
    assert manifest.label("cls").num_classes == int(npz_arrays["cls"].max()) + 1
    assert manifest.label("target").task == "regression"
    assert read_manifest(out) == manifest
    validate(out)

    seen = []
    for split, rows in manifest.splits.items():
        data = read_split(out, split)
        assert len(data[ID_COLUMN]) == rows
        assert data[ID_COLUMN].dtype == np.int64 and data["cls"].dtype == np.int64
        idx = data[ID_COLUMN] - 1000
        for name in ("vec", "seq", "img", "cls", "target"):
            assert data[name].dtype == npz_arrays[name].dtype or name == "cls"
            np.testing.assert_array_equal(data[name], npz_arrays[name][idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(N))  # every tuple lands in exactly one split

    info = inspect_dataset(out)
    assert info["splits"] == manifest.splits
    train_idx = read_split(out, "train", columns=[])[ID_COLUMN] - 1000
    vec = next(m for m in info["modalities"] if m["name"] == "vec")
    assert vec["shape"] == [8] and vec["kind"] == "vector"
    assert vec["mean"] == pytest.approx(float(npz_arrays["vec"][train_idx].mean()), rel=1e-5)
    assert vec["std"] == pytest.approx(float(npz_arrays["vec"][train_idx].std()), rel=1e-5)
    cls = next(lab for lab in info["labels"] if lab["name"] == "cls")
    expected = np.bincount(npz_arrays["cls"][train_idx], minlength=3).tolist()
    assert cls["balance"]["train"]["counts"] == expected
    text = format_inspect(info)
    assert "vec" in text and "160" in text and "regression" in text


def test_inspect_streams_batches_over_shards(tmp_path, monkeypatch):
    import mmcl.data.inspect as inspect_mod

    monkeypatch.setattr(inspect_mod, "BATCH_ROWS", 7)
    root = str(tmp_path / "ds")
    cols = small_columns(50)
    cols["x"] = cols["x"] * np.arange(1, 51)[:, None] + 10.0  # drifts across batches
    cols["x"][4, 2] = np.nan
    write_dataset(root, small_manifest(), {"train": cols}, max_rows_per_shard=20)
    assert len(list_shards(root, "train")) == 3
    info = inspect_dataset(root)
    x = next(m for m in info["modalities"] if m["name"] == "x")
    finite = cols["x"][np.isfinite(cols["x"])]
    assert x["nonfinite"] == 1
    assert x["mean"] == pytest.approx(float(finite.mean()), rel=1e-6)
    assert x["std"] == pytest.approx(float(finite.std()), rel=1e-6)
    y = next(lab for lab in info["labels"] if lab["name"] == "y")
    assert y["balance"]["train"]["counts"] == np.bincount(cols["y"], minlength=2).tolist()


def test_convert_split_is_seeded(tmp_path, npz_path):
    a = convert_npz(npz_path, str(tmp_path / "a"), seed=5)
    b = convert_npz(npz_path, str(tmp_path / "b"), seed=5)
    c = convert_npz(npz_path, str(tmp_path / "c"), seed=6)
    ids = {k: read_split(str(tmp_path / k), "val", columns=[])[ID_COLUMN] for k in "abc"}
    assert a == b and a.splits == c.splits
    np.testing.assert_array_equal(ids["a"], ids["b"])
    assert not np.array_equal(ids["a"], ids["c"])


def test_convert_errors(tmp_path, npz_path, npz_arrays):
    with pytest.raises(DataError, match="no such file"):
        convert_npz(str(tmp_path / "missing.npz"), str(tmp_path / "o1"))
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip file")
    with pytest.raises(DataError, match="not a readable NumPy .npz"):
        convert_npz(str(bad), str(tmp_path / "o2"))
    ragged = dict(npz_arrays, seq=npz_arrays["seq"][:-1])
    np.savez(tmp_path / "ragged.npz", **ragged)
    with pytest.raises(DataError, match="'seq'"):
        convert_npz(str(tmp_path / "ragged.npz"), str(tmp_path / "o3"))
    with pytest.raises(DataError, match="sum to 1"):
        convert_npz(npz_path, str(tmp_path / "o4"), split=(0.5, 0.1, 0.1))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


# ------------------------------------------------------------------------------ writer


def test_writer_rolls_shards_at_the_row_bound(tmp_path):
    root = str(tmp_path / "ds")
    with ShardWriter(root, "train", small_manifest(), max_rows_per_shard=30) as writer:
        for i in range(4):
            writer.write(small_columns(25, start=25 * i, seed=i))
    assert writer.rows == 100
    files = list_shards(root, "train")
    assert [os.path.basename(f) for f in files] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [30, 30, 30, 10]


def test_writer_rolls_shards_at_the_byte_bound(tmp_path):
    root = str(tmp_path / "ds")
    row_bytes = 8 + 4 * 4 + 4 * 6 + 8  # id, x, s, y
    with ShardWriter(root, "train", small_manifest(), max_bytes_per_shard=10 * row_bytes) as w:
        w.write(small_columns(45))
    rows = [pq.ParquetFile(f).metadata.num_rows for f in list_shards(root, "train")]
    assert sum(rows) == 45 and len(rows) == 5 and max(rows) <= 10


@pytest.mark.parametrize("change, column", [
    (lambda c: c.pop("s"), "s"),
    (lambda c: c.update(x=np.zeros((10, 5))), "x"),
    (lambda c: c.update(y=np.zeros(9, np.int64)), "y"),
    (lambda c: c.update(y=np.full(10, 2)), "y"),
])
def test_writer_checks_chunks_against_the_manifest(tmp_path, change, column):
    cols = small_columns(10)
    change(cols)
    with ShardWriter(str(tmp_path / "ds"), "train", small_manifest()) as writer:
        with pytest.raises(DataError, match=f"'{column}'"):
            writer.write(cols)


def test_write_dataset_refuses_existing_data_unless_overwrite(tmp_path):
    root = str(tmp_path / "ds")
    first = {"train": small_columns(20), "val": small_columns(5, start=20)}
    write_dataset(root, small_manifest(), first)
    before = {f: os.path.getmtime(f) for f in list_shards(root, "train")}
    with pytest.raises(DataError, match="--overwrite"):
        write_dataset(root, small_manifest(), {"train": small_columns(7, seed=9)})
    assert {f: os.path.getmtime(f) for f in list_shards(root, "train")} == before
    np.testing.assert_array_equal(read_split(root, "train")["x"],
                                  first["train"]["x"].astype(np.float32))
    assert read_manifest(root).splits == {"train": 20, "val": 5}

    second = write_dataset(root, small_manifest(), {"train": small_columns(7, seed=9)},
                           overwrite=True)
    assert second.splits == {"train": 7}
    assert list_shards(root, "val") == []  # the old split is gone
    np.testing.assert_array_equal(read_split(root, "train")["x"],
                                  small_columns(7, seed=9)["x"].astype(np.float32))


def test_write_dataset_rejects_repeated_ids(tmp_path):
    with pytest.raises(DataError, match="unique"):
        write_dataset(str(tmp_path / "ds"), small_manifest(),
                      {"train": small_columns(5), "val": small_columns(5)})
    assert not (tmp_path / "ds").exists()


def test_missing_manifest_says_how_to_create_one(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json.*mmcl data"):
        read_manifest(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------- validation


def _rewrite_first_shard(root: str, split: str, edit) -> str:
    path = list_shards(root, split)[0]
    table = pq.read_table(path)
    pq.write_table(edit(table), path)
    return path


def _replace(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


@pytest.mark.parametrize("kind", ["wrong_shape", "missing", "list_float", "label_type"])
def test_validate_names_file_and_column(tmp_path, kind):
    root = str(tmp_path / "ds")
    write_dataset(root, small_manifest(), {"train": small_columns(30), "val": small_columns(
        10, start=30)}, max_rows_per_shard=10)
    n = 10
    edits = {
        "wrong_shape": ("x", lambda t: _replace(t, "x", pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.zeros((n, 5), np.float32)))),
        "missing": ("s", lambda t: t.drop_columns(["s"])),
        "list_float": ("x", lambda t: _replace(t, "x", pa.array(np.zeros((n, 4)).tolist(),
                                                                pa.list_(pa.float32())))),
        "label_type": ("y", lambda t: _replace(t, "y", pa.array(np.zeros(n), pa.float64()))),
    }
    column, edit = edits[kind]
    validate(root)
    path = _rewrite_first_shard(root, "train", edit)
    with pytest.raises(DataError) as err:
        validate(root)
    message = str(err.value)
    assert path in message and f"'{column}'" in message
    assert "part-00001" not in message  # only the bad file is blamed
    if kind == "list_float":
        assert "fixed-shape tensor" in message
    validate(root, splits=["val"])  # the other split is fine
    with pytest.raises(DataError, match=f"'{column}'"):
        read_split(root, "train")


def test_validate_checks_row_counts(tmp_path):
    root = str(tmp_path / "ds")
    manifest = write_dataset(root, small_manifest(), {"train": small_columns(12)})
    bad = Manifest(manifest.modalities, manifest.labels, {"train": 13})
    (tmp_path / "ds" / MANIFEST_NAME).write_text(bad.to_json())
    with pytest.raises(DataError, match="12 rows.*13"):
        validate(root)
    with pytest.raises(DataError, match="'test'"):
        validate(root, splits=["test"])


# -------------------------------------------------------------------------- non-finite


def test_read_split_nonfinite_fail_and_drop(tmp_path):
    root = str(tmp_path / "ds")
    cols = small_columns(20)
    cols["x"][3, 1] = np.nan
    cols["s"][7, 0, 0] = np.inf
    write_dataset(root, small_manifest(), {"train": cols})
    with pytest.raises(DataError) as err:
        read_split(root, "train")
    assert "'x'" in str(err.value) and "[3]" in str(err.value)
    assert "data.nonfinite=drop" in str(err.value)
    kept = read_split(root, "train", nonfinite="drop")
    assert kept[ID_COLUMN].tolist() == [i for i in range(20) if i not in (3, 7)]
    assert len(kept["y"]) == len(kept["x"]) == 18
    only_x = read_split(root, "train", columns=["x"], nonfinite="drop")
    assert set(only_x) == {ID_COLUMN, "x"} and len(only_x["x"]) == 19


# --------------------------------------------------------------------------------- S3


# `s3_endpoint` (tests/conftest.py): a moto server on 127.0.0.1 with bucket "mmcl-test".


def test_s3_round_trip(tmp_path, npz_path, npz_arrays, s3_endpoint):
    root = "s3://mmcl-test/sets/demo"
    manifest = convert_npz(npz_path, root, seed=1, endpoint_url=s3_endpoint)
    files = list_shards(root, "train", endpoint_url=s3_endpoint)
    assert files == ["s3://mmcl-test/sets/demo/train/part-00000.parquet"]
    assert validate(root, endpoint_url=s3_endpoint) == manifest
    data = read_split(root, "val", endpoint_url=s3_endpoint)
    np.testing.assert_array_equal(data["img"], npz_arrays["img"][data[ID_COLUMN] - 1000])
    info = inspect_dataset(root, endpoint_url=s3_endpoint)
    assert info["splits"] == manifest.splits
    with pytest.raises(DataError, match="--overwrite"):
        convert_npz(npz_path, root, endpoint_url=s3_endpoint)
