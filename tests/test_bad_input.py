"""Bad input refused clearly (issue 9), without Ray: each case through the `mmcl` command ends
with exit code 2, one `mmcl: error:` message naming what is wrong and where, no traceback,
no Ray started, and every file already written (a data set, a finished run) unchanged.
Also: unsafe or damaged weight files, storage that cannot be written or fills up, and
credentials that never reach a file or the output.

Faults that need Ray (killed workers and drivers, crashes mid-checkpoint, non-finite losses
on workers, crashed Tune trials) are in test_reliability.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import mmcl
from mmcl import config
from mmcl.cli import EXIT_USER_ERROR, main
from mmcl.data.shards import list_shards, read_manifest, read_split, write_dataset
from mmcl.data.synth import generate
from mmcl.objectives import build_objective
from mmcl.storage import StorageError
from mmcl.train import launcher
from mmcl.train.checkpoint import (STATE, WEIGHTS, CheckpointError, check_storage_writable,
                                   export_model, read_checkpoint_state)
from conftest import TINY_MODEL, TINY_TRAIN

SMALL = [*TINY_MODEL, *TINY_TRAIN, "train.epochs=1", "objective.name=tuple"]


# ------------------------------------------------------------------------------ fixtures


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_data(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_first_train_shard(root: str, edit) -> str:
    path = list_shards(root, "train")[0]
    pq.write_table(edit(pq.read_table(path)), path)
    return path


def replace_column(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def write_run(folder: Path, cfg, manifest) -> None:
    """A finished run folder as `mmcl pretrain` leaves it (model/, config.yaml,
    metrics.jsonl), with the untrained weights of `cfg`'s model."""
    torch.manual_seed(0)
    state = {"objective": build_objective(cfg, manifest).state_dict(),
             "history": [{"epoch": 1, "step": 1, "loss": 1.0}]}
    launcher.finish_run(cfg, manifest, str(folder), state)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """data/: a small controlled data set; bad/<case>: copies of it, each damaged one way;
    runs/good: a finished run on data/; runs/other: that run with weights of another config
    (model.embed_dim 32 where its config says 16)."""
    root = tmp_path_factory.mktemp("world")
    data = str(root / "data")
    generate("rus", data, n=200, seed=0)
    bad = root / "bad"
    out = {"root": root, "data": data}

    def tensor(shape, dtype=np.float32):
        return lambda t: pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.zeros((len(t), *shape), dtype))

    a_shape = read_manifest(data).modality("a").shape
    out["shape"] = copy_data(data, bad / "shape")
    out["shape_file"] = rewrite_first_train_shard(
        out["shape"], lambda t: replace_column(t, "a", tensor((a_shape[0] + 1,))(t)))
    out["dtype"] = copy_data(data, bad / "dtype")
    out["dtype_file"] = rewrite_first_train_shard(
        out["dtype"], lambda t: replace_column(t, "a", tensor(a_shape, np.float64)(t)))

    arrays = {s: read_split(data, s) for s in ("train", "val", "test")}
    arrays["train"]["a"][7, 0] = np.nan
    out["nan_id"] = int(arrays["train"]["id"][7])
    out["nan"] = str(bad / "nan")
    write_dataset(out["nan"], read_manifest(data), arrays)

    out["truncated"] = copy_data(data, bad / "truncated")
    path = list_shards(out["truncated"], "train")[0]
    Path(path).write_bytes(Path(path).read_bytes()[:300])
    out["truncated_file"] = path
    # Footer intact, data pages garbled: only reading the rows finds it.
    out["corrupt"] = copy_data(data, bad / "corrupt")
    path = list_shards(out["corrupt"], "train")[0]
    raw = bytearray(Path(path).read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    raw[4:len(raw) - footer] = bytes(len(raw) - footer - 4)  # zero every data page
    Path(path).write_bytes(bytes(raw))
    out["corrupt_file"] = path

    out["empty"] = copy_data(data, bad / "empty")
    for f in list_shards(out["empty"], "train"):
        os.remove(f)
    manifest_path = Path(out["empty"]) / "manifest.json"
    raw_manifest = json.loads(manifest_path.read_text())
    raw_manifest["splits"]["train"] = 0
    manifest_path.write_text(json.dumps(raw_manifest))

    runs = root / "runs"
    cfg = config.load(None, [*SMALL, f"data.path={data}", f"storage.path={runs}",
                             "storage.name=good"])
    write_run(runs / "good", cfg, read_manifest(data))
    other = config.load(None, [*SMALL, f"data.path={data}", f"storage.path={runs}",
                               "storage.name=other", "model.embed_dim=32"])
    write_run(runs / "other", other, read_manifest(data))
    for name in ("config.yaml", "model/config.yaml"):  # the config of run "good"
        shutil.copy(runs / "good" / name, runs / "other" / name)
    out["runs"] = runs

    np.savez(root / "ragged.npz", a=np.zeros((10, 3), np.float32),
             b=np.zeros((9, 3), np.float32), y=np.zeros(10, np.int64))
    out["ragged"] = str(root / "ragged.npz")
    (root / "bad.yaml").write_text("train:\n  epochs: 3\n  lr: [1e-3\nmodel: {}\n")
    out["bad_yaml"] = str(root / "bad.yaml")
    return out


def sets(*assignments: str) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def pretrain_args(world, data: str, *extra: str, ray: bool = True,
                  name: str = "good") -> list[str]:
    """`mmcl pretrain` onto the finished run "good" (the same storage path and name): errors
    in the config or the data are found before the run is refused as finished. Errors that
    only reading the data finds go to a new run `name` beside it."""
    return ["pretrain", *([] if ray else ["--no-ray"]),
            *sets(*SMALL, f"data.path={data}", f"storage.path={world['runs']}",
                  f"storage.name={name}", *extra)]


# Each case: the command line (from the world) and what its message must name.
CASES = {
    "malformed_yaml": (lambda w: ["pretrain", "-c", w["bad_yaml"]],
                       ["bad.yaml", "not valid YAML at line 4"]),
    "unknown_objective": (lambda w: pretrain_args(w, w["data"], "objective.name=simclr"),
                          ["objective", "unknown objective", "tuple_infonce"]),
    "unknown_encoder": (lambda w: pretrain_args(w, w["data"], "model.encoder.kind=resnet"),
                        ["model.encoder.kind", "'resnet'", "'gru'"]),
    "wrong_type": (lambda w: pretrain_args(w, w["data"], "train.epochs=many"),
                   ["train.epochs", "'many'"]),
    "negative_temperature": (lambda w: pretrain_args(w, w["data"],
                                                     "objective.temperature=-0.5"),
                             ["objective.temperature", "greater than 0", "-0.5"]),
    "batch_size_zero": (lambda w: pretrain_args(w, w["data"], "train.batch_size=0"),
                        ["train.batch_size", "greater than or equal to 2"]),
    "modality_not_in_data": (lambda w: pretrain_args(w, w["data"], "data.modalities=[a, zzz]"),
                             ["data.modalities", "'zzz'", "data", "['a', 'b', 'c']"]),
    "shard_shape": (lambda w: pretrain_args(w, w["shape"]),
                    ["shape_file", "'a'", "expected"]),
    "shard_dtype": (lambda w: pretrain_args(w, w["dtype"]),
                    ["dtype_file", "'a'", "double", "expected"]),
    "nan_in_modality": (lambda w: pretrain_args(w, w["nan"], ray=False, name="fresh"),
                        ["nan", "modality 'a'", "NaN", "nan_id", "data.nonfinite=drop"]),
    "empty_split": (lambda w: pretrain_args(w, w["empty"]),
                    ["'train'", "empty", "no shard files"]),
    "truncated_parquet": (lambda w: pretrain_args(w, w["truncated"]),
                          ["truncated_file", "not a readable Parquet file"]),
    "corrupt_parquet": (lambda w: pretrain_args(w, w["corrupt"], ray=False, name="fresh"),
                        ["corrupt_file", "not a readable Parquet file", "truncated or corrupt"]),
    "missing_data_path": (lambda w: pretrain_args(w, str(w["root"] / "nowhere")),
                          ["nowhere", "no mmcl data set", "mmcl data"]),
    "factorcl_three_modalities": (lambda w: pretrain_args(w, w["data"],
                                                          "objective.name=factorcl_ssl",
                                                          ray=False),
                                  ["factorcl_ssl", "exactly 2 modalities", "data.modalities"]),
    "eval_checkpoint_of_another_config": (
        lambda w: ["eval", "--run", str(w["runs"] / "other"), "--no-ray"],
        ["other", "weights.pt", "does not fit", "config.yaml", "[32,"]),
    "npz_arrays_disagree_in_length": (
        lambda w: ["data", "convert", w["ragged"], "--out", w["data"], "--overwrite"],
        ["ragged.npz", "'b'", "9 rows", "10", "nothing was written"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_damages_nothing(world, case, capsys, no_ray):
    argv, expected = CASES[case]
    before = snapshot(world["root"])
    capsys.readouterr()
    assert main(argv(world)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmcl: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for text in expected:
        text = str(world[text]) if text in world else text
        assert text in err, f"{case}: {text!r} not in {err!r}"
    assert snapshot(world["root"]) == before, "a refused command changed files on disk"


def test_a_nan_row_can_be_dropped_and_counted_instead(world, tmp_path, capsys):
    code = main(pretrain_args(world, world["nan"], "data.nonfinite=drop",
                              f"storage.path={tmp_path}", "storage.name=dropped", ray=False))
    assert code == 0
    # The run itself left the row out, every epoch, and said so (not only the reader below).
    history = [json.loads(line) for line in
               (tmp_path / "dropped" / "metrics.jsonl").read_text().splitlines()]
    assert history and all(h["dropped_rows"] == 1 for h in history)
    assert "dropped:    1 training rows per epoch" in capsys.readouterr().out
    mmcl.load(str(tmp_path / "dropped"))
    rows = read_split(world["nan"], "train", nonfinite="drop")
    assert world["nan_id"] not in rows["id"].tolist()
    assert len(rows["id"]) == read_manifest(world["nan"]).splits["train"] - 1


def test_the_unreadable_shard_of_a_split_is_found_by_name(world):
    """For readers that do not say which file failed (Ray Data's read tasks)."""
    from mmcl.data.shards import find_unreadable_shard

    assert find_unreadable_shard(world["data"], "train") is None
    found = find_unreadable_shard(world["corrupt"], "train")
    assert found is not None and world["corrupt_file"] in str(found)
    assert "truncated or corrupt" in str(found)


def test_an_objective_that_does_not_fit_the_data_is_refused_before_ray(world, capsys, no_ray):
    assert main(pretrain_args(world, world["data"], "objective.name=factorcl_ssl")) == \
        EXIT_USER_ERROR
    assert "exactly 2 modalities" in capsys.readouterr().err


# ---------------------------------------------------------------------- weight files


class Planted:
    """Unpickling this object would create a file: proof that a loader ran it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_weights_file_that_needs_unpickling_is_refused_not_run(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["runs"] / "good", run)
    marker = tmp_path / "ran"
    good = torch.load(run / "model" / WEIGHTS, weights_only=True)  # mmcl's own files load
    torch.save({**good, "extra": Planted(str(marker))}, run / "model" / WEIGHTS)
    with pytest.raises(CheckpointError, match="cannot be loaded safely.*never unpickles"):
        mmcl.load(str(run))
    assert main(["eval", "--run", str(run), "--no-ray"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and str(run) in err and "Traceback" not in err
    assert not marker.exists(), "an object in a weights file was unpickled"
    assert not (run / "eval").exists()

    # a checkpoint's state.pt is held to the same rule
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.save({"objective": good, "step": Planted(str(marker))}, checkpoint / STATE)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint_state(str(checkpoint))
    assert not marker.exists()


def test_a_truncated_weights_file_is_named_as_damaged(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["runs"] / "good", run)
    weights = run / "model" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"weights\.pt is not a readable checkpoint file "
                                              r"\(truncated or corrupt"):
        mmcl.load(str(run))


# --------------------------------------------------------------------------- storage


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into: chmod 555, and for root (whom permissions do not
    stop) the immutable attribute as well."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        immutable = done.returncode == 0
        if not immutable:
            pytest.skip("cannot make a folder read-only here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_unwritable_storage_is_a_clear_error_and_leaves_no_run(world, read_only_dir, capsys):
    argv = pretrain_args(world, world["data"], f"storage.path={read_only_dir}",
                         "storage.name=run", ray=False)
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("mmcl: error: cannot write") and str(read_only_dir) in err, err
    assert "Traceback" not in err
    assert list(read_only_dir.iterdir()) == []  # no half-written run to mistake for one
    with pytest.raises(CheckpointError, match="no trained model"):
        mmcl.load(str(read_only_dir / "run"))


def test_unwritable_storage_is_refused_before_any_work(world, read_only_dir, monkeypatch):
    import mmcl.train.local as local

    def no_training(*args, **kwargs):
        raise AssertionError("training started on storage that cannot be written")

    monkeypatch.setattr(local, "fit_in_memory", no_training)
    cfg = config.load(None, [*SMALL, f"data.path={world['data']}",
                             f"storage.path={read_only_dir}", "storage.name=run"])
    with pytest.raises(StorageError, match=re.escape(f"cannot write {read_only_dir}")):
        launcher.pretrain(cfg, in_process=True)


def test_check_storage_writable(read_only_dir, tmp_path):
    check_storage_writable(str(tmp_path / "new" / "runs"))
    assert (tmp_path / "new" / "runs").is_dir() and not any((tmp_path / "new" / "runs").iterdir())
    with pytest.raises(StorageError, match=re.escape(f"cannot write {read_only_dir}/runs: ")):
        check_storage_writable(str(read_only_dir / "runs"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="a part of the path is a file"):
        check_storage_writable(str(tmp_path / "file" / "runs"))


def test_a_full_disk_while_exporting_keeps_the_earlier_model(world, tmp_path, monkeypatch):
    """Storage fills up while a resumed run rewrites its model: one StorageError naming the
    file, the earlier model still complete and loadable, no temporary file left behind."""
    from fsspec.implementations.local import LocalFileSystem

    run = tmp_path / "run"
    shutil.copytree(world["runs"] / "good", run)
    before = snapshot(run)
    real_open = LocalFileSystem.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(self, path, mode="rb", **kwargs):
        f = real_open(self, path, mode, **kwargs)
        return FullDisk(f) if "w" in mode and path.endswith(f".{WEIGHTS}.tmp") else f

    monkeypatch.setattr(LocalFileSystem, "open", open_)
    model = mmcl.load(str(run))
    state = {"objective": {k: v + 1 for k, v in model.objective.state_dict().items()}}
    with pytest.raises(StorageError,
                       match=re.escape(f"cannot write {run}/model/weights.pt: no space")):
        export_model(state, model.config, model.manifest, str(run / "model"))
    monkeypatch.undo()
    assert snapshot(run) == before
    reloaded = mmcl.load(str(run))
    for (name, a), b in zip(model.objective.state_dict().items(),
                            reloaded.objective.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


# ----------------------------------------------------------------------- credentials


def test_credentials_never_reach_a_file_or_the_output(world, tmp_path, monkeypatch, capfd):
    """A run with credentials in the environment and a storage block with an endpoint: the
    secret is in no file the run wrote and in nothing it printed, nor in an error about a
    bucket it cannot reach. (tests/test_s3.py does the same on S3, with Ray's logs.)"""
    secret = "mmclTestSecret/" + os.urandom(12).hex()
    key_id = "AKIAMMCLTEST" + os.urandom(4).hex().upper()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret + "-token")
    runs = tmp_path / "runs"
    assert main(pretrain_args(world, world["data"], f"storage.path={runs}",
                              "storage.name=secret", "storage.endpoint_url=http://127.0.0.1:9",
                              "storage.region=us-east-1", ray=False)) == 0
    assert main(["config", *sets(f"storage.path={runs}")]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == WEIGHTS for p in written) and any(p.name == "config.yaml"
                                                           for p in written)
    for p in written:
        body = p.read_bytes()
        for value in (secret, key_id):
            assert value.encode() not in body, f"{value} in {p}"
    saved = yaml.safe_load((runs / "secret" / "config.yaml").read_text())
    assert saved["storage"]["endpoint_url"] == "http://127.0.0.1:9"
    printed = capfd.readouterr()
    for value in (secret, key_id):
        assert value not in printed.out + printed.err
