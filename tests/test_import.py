"""`mmcl data import` on local Ray end to end: real files -> import -> inspect -> pretrain one
epoch on 2 Ray Train workers -> a trained model that embeds the imported data; a failed import
is one `mmcl: error:` line and writes nothing."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

import mmcl
from import_files import COLOURS, image, image_text_table, write_spec, write_table, write_wav
from mmcl import cli, config
from mmcl.data.pipeline import DropCounter, build_dataset, complete_rows
from mmcl.data.prepare import Preparer
from mmcl.data.schema import DataError
from mmcl.data.shards import read_manifest, read_split
from mmcl.train import launcher
from conftest import TINY_MODEL
from test_import_security import loopback  # noqa: F401 - a fixture

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

TINY = [*TINY_MODEL, "train.batch_size=8", "train.warmup_epochs=0", "train.epochs=1",
        "scaling.num_workers=2"]


def import_cli(src, out, spec, *extra) -> str:
    """`mmcl data import`; returns its stdout, asserting success."""
    buf = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(buf):
        rc = cli.main(["data", "import", str(src), "--out", str(out), "--spec", str(spec),
                       *extra])
    assert rc == 0
    return buf.getvalue()


def pretrain_one_epoch(tmp_path, data, *extra):
    cfg = config.load(None, [*TINY, f"storage.path={tmp_path / 'runs'}", f"data.path={data}",
                             *extra])
    result = launcher.pretrain(cfg)
    assert result.history[-1]["steps"] >= 1
    assert np.isfinite(result.history[-1]["loss"])
    return mmcl.load(result.run_url)


def test_image_text_table_with_multilabel_imports_inspects_and_pretrains(tmp_path, capsys):
    table, spec = image_text_table(tmp_path / "src")
    out = import_cli(table, tmp_path / "ds", write_spec(tmp_path / "spec.yaml", spec))
    assert "imported 64 tuples" in out and "rows dropped: none" in out
    m = read_manifest(str(tmp_path / "ds"))
    assert m.modality("image").dtype == "uint8" and m.modality("image").shape == (3, 16, 16)
    assert m.modality("caption").vocab_size == 13 and m.modality("caption").pad_id == 0
    assert len(m.modality("image").mean) == 3 and m.label("tags").task == "multilabel"

    assert cli.main(["data", "inspect", str(tmp_path / "ds"), "--contact-sheet",
                     str(tmp_path / "sheet.png")]) == 0
    text = capsys.readouterr().out
    assert "caption: tokens per tuple" in text and "multilabel[3]" in text
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size == (16 * 16, 16)

    model = pretrain_one_epoch(tmp_path, tmp_path / "ds")
    test = read_split(str(tmp_path / "ds"), "test")
    emb = model.embed(test).detach()
    assert emb.shape == (len(test["id"]), 16) and bool(emb.isfinite().all())


def rgbd_table(folder, n=64):
    """RGB PNG + 1-channel depth PNG per tuple; every 5th depth missing (20%)."""
    (folder / "rgb").mkdir(parents=True)
    (folder / "depth").mkdir()
    rows = []
    for i in range(n):
        colour = COLOURS[i % 4]
        image(colour, seed=i).save(folder / "rgb" / f"{i}.png")
        depth = None
        if i % 5:
            image(colour, seed=100 + i, mode="L").save(folder / "depth" / f"{i}.png")
            depth = f"depth/{i}.png"
        rows.append({"rgb": f"rgb/{i}.png", "depth": depth, "scene": colour})
    spec = {"modalities": {"rgb": {"column": "rgb", "kind": "image", "size": [12, 12]},
                           "depth": {"column": "depth", "kind": "image", "size": [12, 12],
                                     "channels": 1, "resize": "resize"}},
            "labels": {"scene": {"column": "scene", "classes": list(COLOURS)}}}
    return write_table(rows, folder / "pairs.jsonl"), spec


def test_rgbd_pairs_with_missing_depth_drop_mask_and_fail(tmp_path):
    table, spec = rgbd_table(tmp_path / "src")
    import_cli(table, tmp_path / "ds", write_spec(tmp_path / "spec.yaml", spec))
    m = read_manifest(str(tmp_path / "ds"))
    assert sum(c["depth"] for c in m.missing.values()) == 13  # ids 0, 5, ..., 60
    assert sum(c["rgb"] for c in m.missing.values()) == 0
    assert m.modality("depth").shape == (1, 12, 12)

    # fail (the default) refuses before training starts, naming the modality and the fix
    with pytest.raises(DataError, match=r"modality 'depth' is missing in \d+ tuple.*"
                                        r"data.missing=drop"):
        pretrain_one_epoch(tmp_path, tmp_path / "ds")
    cfg = config.load(None, [*TINY, f"storage.path={tmp_path / 'runs'}",
                             f"data.path={tmp_path / 'ds'}", "data.missing=drop"])
    (epoch,) = launcher.pretrain(cfg).history
    # Steps per epoch (the LR schedule, the progress bar) count the complete tuples only.
    complete = launcher.train_steps(cfg, m, 2, str(tmp_path / "ds"))
    assert epoch["steps"] == complete < launcher.train_steps(cfg, m, 2)
    assert epoch["dropped_missing_rows"] == m.missing["train"]["depth"]
    assert epoch["dropped_rows"] == 0 and np.isfinite(epoch["loss"])

    # mask: what the data side guarantees to the model
    ds = build_dataset(str(tmp_path / "ds"), "train", m, shuffle_files=False, missing="mask")
    rows = m.splits["train"]
    prep = Preparer(m, missing="mask")
    seen = 0
    for batch in ds.iter_torch_batches(batch_size=16):
        out = prep(batch)
        present = out["depth__present"]
        assert present.dtype.is_floating_point is False and "rgb__present" not in out
        assert bool((out["depth"][~present] == 0).all())
        assert bool((out["depth"][present].flatten(1).abs().sum(1) > 0).all())
        seen += len(present)
    assert seen == rows
    counter = DropCounter.create()
    dropped = build_dataset(str(tmp_path / "ds"), "train", m, shuffle_files=False,
                            missing="drop", drop_counter=counter)
    absent = m.missing["train"]["depth"]
    assert dropped.count() == rows - absent
    # counted apart from NaN rows; and what the LR schedule and the progress bar count on
    assert counter.counts()["train"] == {"missing_rows": absent, "depth__missing": absent}
    assert complete_rows(str(tmp_path / "ds"), "train", m, m.modality_names) == rows - absent


def test_audio_vector_and_padded_sequences_from_parquet(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(64):
        write_wav(src / f"{i}.wav", 200.0 + 50 * (i % 4), rate=16000 if i % 2 else 8000,
                  seconds=0.1)
        steps = 1 + i % 6
        np.save(src / f"{i}.npy", rng.normal(i % 4, 1.0, (steps, 3)).astype(np.float32))
        rows.append({"wav": f"{i}.wav", "feats": f"{i}.npy",
                     "vec": (rng.normal(0, 50, 4) + 1000 * (i % 4)).tolist(),
                     "y": float(i % 4), "split": ("train", "train", "val", "test")[i % 4]
                     if i >= 8 else "train"})
    spec = {"modalities": {
        "wav": {"column": "wav", "kind": "audio", "sample_rate": 4000, "length": 400},
        "feats": {"column": "feats", "kind": "sequence", "max_len": 6, "features": 3},
        "vec": {"column": "vec", "holds": "numbers", "kind": "vector", "shape": [4]}},
        "labels": {"y": {"column": "y", "task": "regression"}}, "split_column": "split"}
    import_cli(write_table(rows, src / "t.parquet"), tmp_path / "ds",
               write_spec(tmp_path / "spec.yaml", spec))
    m = read_manifest(str(tmp_path / "ds"))
    assert m.splits == {"train": 36, "val": 14, "test": 14}
    train = read_split(str(tmp_path / "ds"), "train")
    assert train["wav"].shape == (36, 400) and train["feats__len"].max() == 6
    # the constants standardise the train split: vectors of scale 1000 arrive near N(0, 1)
    import torch

    prepared = Preparer(m)({k: torch.from_numpy(v) for k, v in train.items()})
    assert abs(float(prepared["vec"].mean())) < 1e-3
    assert abs(float(prepared["vec"].std(unbiased=False)) - 1) < 1e-2
    assert prepared["feats__mask"].sum(1).tolist() == train["feats__len"].tolist()

    model = pretrain_one_epoch(tmp_path, tmp_path / "ds")
    assert model.embed(read_split(str(tmp_path / "ds"), "val")).shape == (14, 16)


def webdataset_folder(folder, n=32):
    folder.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / f"shard-{shard:04d}.tar", "w") as tar:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                colour = COLOURS[i % 4]
                buf = io.BytesIO()
                image(colour, seed=i).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()),
                                  ("txt", f"a photo of a {colour} square".encode()),
                                  ("cls", str(i % 4).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_webdataset_folder_imports(tmp_path):
    webdataset_folder(tmp_path / "wds")
    _, base = image_text_table(tmp_path / "tok_src", n=1)
    spec = {"modalities": {
        "image": {"column": "jpg", "holds": "bytes", "kind": "image", "size": [16, 16]},
        "caption": {**base["modalities"]["caption"], "column": "txt", "holds": "bytes"}},
        "labels": {"colour": {"column": "cls", "num_classes": 4}}}
    out = import_cli(tmp_path / "wds", tmp_path / "ds", write_spec(tmp_path / "s.yaml", spec))
    assert "imported 32 tuples" in out
    data = {s: read_split(str(tmp_path / "ds"), s) for s in ("train", "val", "test")}
    ids = np.concatenate([d["id"] for d in data.values()])
    assert sorted(ids.tolist()) == list(range(32))
    colours = np.concatenate([d["colour"] for d in data.values()])
    assert sorted(colours.tolist()) == sorted([i % 4 for i in range(32)])
    assert all((d["caption__len"] == 6).all() for d in data.values())


def test_a_failed_import_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    table, spec = image_text_table(tmp_path / "src", n=16)
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    import_cli(table, tmp_path / "ds", spec_path)
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    os.remove(tmp_path / "src" / "img" / "5.png")
    capsys.readouterr()

    for extra in ([], ["--overwrite"]):
        rc = cli.main(["data", "import", table, "--out", str(tmp_path / "ds"), "--spec",
                       spec_path, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("mmcl: error:")
        if extra:  # the decode error: row id, column and file
            assert "row id 5, column 'file': file " in err[0] and "5.png: no such file" in err[0]
        else:
            assert "already exists" in err[0]
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ds", "spec.yaml", "src"]  # no temp folder left

    bad = {**spec, "labels": {"colour": {"column": "color", "classes": list(COLOURS)}}}
    rc = cli.main(["data", "import", table, "--out", str(tmp_path / "new"), "--spec",
                   write_spec(tmp_path / "bad.yaml", bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "column(s) named in the spec are not in the table: labels.colour: 'color'" in err[0]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("case", ["dotdot", "symlink", "http", "not_utf8_row",
                                  "not_utf8_jsonl", "huge_cell", "huge_cell_later",
                                  "truncated_tar"])
def test_a_hostile_source_is_one_error_line_and_writes_nothing(tmp_path, capsys, loopback,
                                                               case):
    """The confinement and source cases of tests/test_import_security.py, end to end on Ray
    Data: one `mmcl: error:` line, exit 2, no data set, no folder left beside it."""
    from import_files import make_tokenizer

    server, requests = loopback
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "secret.txt").write_text("a big blue photo")
    text = {"column": "doc", "holds": "path", "kind": "text", "max_len": 16,
            "truncation": True, "tokenizer": make_tokenizer(tmp_path / "tok")}
    spec = {"modalities": {"doc": text}}
    table = src / "t.csv"
    if case in ("dotdot", "symlink", "http"):
        os.symlink(tmp_path / "secret.txt", src / "link.txt")
        (src / "ok.txt").write_text("a small red square")
        cell = {"dotdot": "../secret.txt", "symlink": "link.txt",
                "http": f"{server}/secret.txt"}[case]
        table.write_text(f"doc\nok.txt\n{cell}\n")
        expect = "outside the table's folder" if case != "http" else "urls: [http]"
    elif case == "not_utf8_row":
        table.write_bytes(b"doc,label\nok,a\nok,\xffb\n")
        spec = {"modalities": {"doc": {**text, "holds": "text"}},
                "labels": {"label": {"column": "label", "classes": ["a", "b"]}}}
        expect = "UTF"
    elif case == "not_utf8_jsonl":
        table = src / "t.jsonl"
        table.write_bytes(b'{"doc": "ok", "label": "a"}\n{"doc": "ok", "label": "\xffb"}\n')
        spec = {"modalities": {"doc": {**text, "holds": "text"}},
                "labels": {"label": {"column": "label", "classes": ["a", "b"]}}}
        expect = "UTF"
    elif case == "huge_cell":
        table.write_text("doc\nshort\n" + "a " * 10_000_000 + "\n")  # a 20 MB cell
        spec = {"modalities": {"doc": {**text, "holds": "text"}}}
        expect = "max_cell_bytes"
    elif case == "huge_cell_later":  # past the first block: found by Ray Data's reader
        table.write_text("doc\n" + "short\n" * 250_000 + "a " * 1_000_000 + "\n")
        spec = {"modalities": {"doc": {**text, "holds": "text"}}, "max_cell_bytes": 1000}
        expect = "longer than max_cell_bytes=1000"
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(8):
                data = f"a small photo number {i} ".encode() * 200
                info = tarfile.TarInfo(f"{i:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (src / "000000.tar").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        table = src
        spec = {"modalities": {"doc": {**text, "column": "txt", "holds": "bytes"}}}
        expect = "truncated or corrupt"
    capsys.readouterr()
    rc = cli.main(["data", "import", str(table), "--out", str(tmp_path / "ds"), "--spec",
                   write_spec(tmp_path / "spec.yaml", spec)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mmcl: error:"), err
    assert expect in err[0], err[0]
    assert requests == []  # nothing fetched from the loopback server
    assert not (tmp_path / "ds").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]


def test_import_prints_no_ray_noise(tmp_path):
    """Issue 35, item 7: `mmcl data import` follows pretrain's console rules (no Ray Data
    INFO lines, execution plans or progress logs, no `concurrency` deprecation): a console
    of its own (a subprocess joining this module's Ray, not starting one) shows mmcl's
    report and at most one line of Ray's (the driver core worker's note on Ray Data's
    restartable actors, printed by Ray's C++ logger). On 0d8e07f: 21 lines of Ray's."""
    import re
    import subprocess
    import sys

    table, spec = image_text_table(tmp_path / "src", n=16)
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    proc = subprocess.run([sys.executable, "-m", "mmcl.cli", "data", "import", table, "--out",
                           str(tmp_path / "ds"), "--spec", spec_path, "--address",
                           ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(lines[-20:])
    noise = re.compile(r"\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+\.py:\d+ --|"
                       r"logging_progress|streaming_executor|is deprecated|"
                       r"of memory per worker|Running Dataset")
    assert [line for line in lines if noise.search(line)] == []
    assert len(proc.stderr.splitlines()) <= 1, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"wrote {tmp_path / 'ds'}"
