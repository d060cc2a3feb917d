"""Shard format version 2 without Ray: dtypes, text, padded sequences, missing modalities,
multi-label columns, normalisation constants, and the `prepare` step."""

import json

import numpy as np
import pytest
import torch

from mmcl.config import DataConfig
from mmcl.data.convert import convert_npz
from mmcl.data.prepare import Preparer
from mmcl.data.schema import DataError, LabelSpec, Manifest, ModalitySpec
from mmcl.data.shards import ShardWriter, finish_dataset, read_manifest, read_split, validate, \
    write_dataset

N = 12


def v2_manifest() -> Manifest:
    return Manifest(
        [ModalitySpec("img", (3, 4, 4), "image", "uint8"),
         ModalitySpec("txt", (6,), "text", "int64", vocab_size=20, pad_id=0, tokenizer="local"),
         ModalitySpec("seq", (5, 2), "sequence", variable_length=True),
         ModalitySpec("vec", (3,), "vector", "float16", nullable=True)],
        [LabelSpec("tags", "multilabel", classes=("a", "b", "c")),
         LabelSpec("cls", "classification", 2)])


def v2_columns(rng, n=N) -> dict:
    present = np.arange(n) % 4 != 0
    vec = rng.normal(5.0, 2.0, (n, 3)) * present[:, None]
    return {"id": np.arange(n), "img": rng.integers(0, 256, (n, 3, 4, 4)),
            "txt": rng.integers(1, 20, (n, 6)), "txt__len": rng.integers(1, 7, n),
            "seq": rng.normal(size=(n, 5, 2)), "seq__len": rng.integers(1, 6, n),
            "vec": vec, "vec__present": present,
            "tags": rng.integers(0, 2, (n, 3)), "cls": rng.integers(0, 2, n)}


def test_v2_round_trip_keeps_dtypes_aux_columns_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    cols = v2_columns(rng)
    out = write_dataset(str(tmp_path / "ds"), v2_manifest(), {"train": cols},
                        stats_split="train")
    assert out.missing == {"train": {"vec": 3}}
    validate(str(tmp_path / "ds"))
    back = read_split(str(tmp_path / "ds"), "train")
    assert back["img"].dtype == np.uint8 and back["txt"].dtype == np.int64
    assert back["vec"].dtype == np.float16 and back["tags"].dtype == np.uint8
    np.testing.assert_array_equal(back["txt__len"], cols["txt__len"])
    np.testing.assert_array_equal(back["tags"], cols["tags"])
    assert len(read_split(str(tmp_path / "ds"), "train", missing="drop")["id"]) == 9
    with pytest.raises(DataError, match="modality 'vec' is missing in 3"):
        read_split(str(tmp_path / "ds"), "train", missing="fail")
    # constants: train split only, present rows only, images per channel in [0, 1]
    m = read_manifest(str(tmp_path / "ds"))
    vec = cols["vec"][cols["vec__present"]].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(m.modality("vec").mean, vec.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.modality("vec").std, vec.std(0), rtol=1e-4)
    img = cols["img"] / 255.0
    np.testing.assert_allclose(m.modality("img").mean, img.mean(axis=(0, 2, 3)), rtol=1e-6)
    steps = np.arange(5)[None] < cols["seq__len"][:, None]
    np.testing.assert_allclose(m.modality("seq").mean, cols["seq"][steps].mean(0), rtol=1e-5)
    assert m.modality("txt").mean is None


def test_shard_writer_streams_chunks_with_distinct_prefixes(tmp_path):
    rng = np.random.default_rng(1)
    root = str(tmp_path / "ds")
    manifest = v2_manifest()
    writers = {}
    with ShardWriter(root, "train", manifest) as w:
        w.write(v2_columns(rng, 8))
        cols = v2_columns(rng, 8)
        cols["id"] = cols["id"] + 100
        w.write(cols)
    writers["train"] = w
    out = finish_dataset(root, manifest, writers, stats_split="train")
    assert out.splits == {"train": 16} and out.missing["train"]["vec"] == 4
    assert read_manifest(root).modality("vec").mean is not None


def test_bad_v2_values_are_refused():
    with pytest.raises(DataError, match="must not contain '__'"):
        ModalitySpec("a__b", (3,))
    with pytest.raises(DataError, match="dtype must be one of"):
        ModalitySpec("a", (3,), dtype="float64")
    with pytest.raises(DataError, match="text modality needs"):
        ModalitySpec("t", (4,), "text", "float32")


def test_bad_chunks_name_the_column(tmp_path):
    rng = np.random.default_rng(2)
    cols = v2_columns(rng)
    cols["txt"] = cols["txt"] + 0.5
    with pytest.raises(DataError, match="'txt' is stored as int64 but holds non-integer"):
        write_dataset(str(tmp_path / "a"), v2_manifest(), {"train": cols})
    cols = v2_columns(rng)
    cols["tags"] = cols["tags"] * 2
    with pytest.raises(DataError, match="'tags' is multilabel"):
        write_dataset(str(tmp_path / "b"), v2_manifest(), {"train": cols})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_version_1_manifest_reads_as_before(tmp_path):
    raw = {"modalities": [{"name": "x", "shape": [3], "kind": "vector", "dtype": "float32"}],
           "labels": [{"name": "y", "task": "classification", "num_classes": 2}],
           "splits": {"train": 4}, "version": 1}
    m = Manifest.from_json(json.dumps(raw))
    assert m.version == 1 and m.missing == {} and m.modality("x").mean is None
    assert m.modality("x").storage_columns == ["x"]
    x = torch.randn(4, 3)
    assert torch.equal(Preparer(m)({"x": x})["x"], x)


def test_convert_records_train_split_constants(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "a.npz", x=rng.normal(100.0, 10.0, (50, 2)).astype(np.float32))
    out = convert_npz(str(tmp_path / "a.npz"), str(tmp_path / "ds"))
    train = read_split(str(tmp_path / "ds"), "train")["x"]
    np.testing.assert_allclose(out.modality("x").mean, train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(out.modality("x").std, train.std(0), rtol=1e-4)


def test_prepare_casts_standardises_and_derives_masks(tmp_path):
    rng = np.random.default_rng(4)
    root = str(tmp_path / "ds")
    write_dataset(root, v2_manifest(), {"train": v2_columns(rng)}, stats_split="train")
    m = read_manifest(root)
    batch = {k: torch.from_numpy(v) for k, v in read_split(root, "train").items()}
    out = Preparer.for_run(m, DataConfig(missing="mask"))(batch)
    assert out["img"].dtype == torch.float32 and 0 <= out["img"].min() and out["img"].max() <= 1
    assert torch.allclose(out["img"], batch["img"].float() / 255)  # the encoder normalises
    assert out["txt"].dtype == torch.int64 and "txt__len" not in out
    assert torch.equal(out["txt__mask"].sum(1), batch["txt__len"].long())
    assert torch.equal(out["seq"][~out["seq__mask"]], torch.zeros(0, 2).new_zeros(
        int((~out["seq__mask"]).sum()), 2))
    present = out["vec__present"]
    assert present.dtype == torch.bool and int((~present).sum()) == 3
    assert torch.equal(out["vec"][~present], torch.zeros(3, 3))
    kept = out["vec"][present]
    assert torch.allclose(kept.mean(0), torch.zeros(3), atol=1e-3)
    # drop: no presence key; normalize off: values as stored (cast to float32)
    raw = Preparer(m, normalize=False, missing="drop")(batch)
    assert "vec__present" not in raw
    assert torch.equal(raw["vec"], batch["vec"].float())
