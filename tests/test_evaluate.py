"""Evaluation: probe metrics and protocol, raw-feature probes that recover the generator,
`mmcl embed` (Ray Data actor pool, multi-shard, matched by id), `mmcl eval` (report.json /
report.md, one run on Ray, several seeds in process) and `mmcl report`."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mmcl
from mmcl import config
from mmcl.cli import EXIT_USER_ERROR, main
from mmcl.data import synth
from mmcl.data.schema import LabelSpec
from mmcl.data.shards import read_manifest, write_dataset
from mmcl.evaluate import diagnostics as diag
from mmcl.evaluate.embed import FUSED, META_NAME, modality_column, read_embeddings
from mmcl.evaluate.probe import (classification_metrics, few_label_probe, linear_probe,
                                 macro_f1, regression_metrics, score_all, fit_probe)
from mmcl.train import launcher

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

TINY = ["data.synth.n=400", "train.epochs=2", "train.batch_size=32", "train.warmup_epochs=0",
        "model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
        "model.proj_dim=16", "model.fusion_heads=2"]
FAST_PROBES = ["--l2-grid", "1e-4", "1e-2", "--few-label-k", "5", "--few-label-seeds", "2"]
# Ray's and Ray Data's console output that mmcl's commands keep off (issue 35, item 7)
RAY_NOISE = re.compile(r"\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+\.py:\d+ --|"
                       r"Parquet dataset sampling|logging_progress|streaming_executor|"
                       r"is deprecated|of memory per worker|Running Dataset")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short pretraining runs of the default config (rus, tuple_infonce) on the same
    generated data: r0, and r1/r2 differing only in their seed."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, seed in (("r0", 0), ("r1", 1), ("r2", 2)):
        cfg = config.load(None, [*TINY, f"storage.path={tmp}", f"storage.name={name}",
                                 f"train.seed={seed}"])
        out[name] = launcher.pretrain(cfg, in_process=True).run_url
    out["data"] = launcher.resolve_data(cfg)
    return out


@pytest.fixture(scope="module")
def ray_eval(runs):
    """`mmcl eval` of r0 on the default (Ray Data) path."""
    code = main(["eval", "--run", runs["r0"], "--concurrency", "1", *FAST_PROBES])
    assert code == 0
    return os.path.join(runs["r0"], "eval")


# ----------------------------------------------------------------------------- metrics


def test_classification_and_regression_metrics():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 2, 2])
    # per class F1: 0: 2*2/(4+0+1) = .8; 1: 2*1/(2+1+1) = .5; 2: 2*1/(2+1+0) = 2/3
    assert macro_f1(y, p) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert macro_f1([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx((2 * 2 / (4 + 2)) / 2)
    r = regression_metrics([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 4.0])
    assert r["mse"] == pytest.approx(0.125) and r["mae"] == pytest.approx(0.25)
    assert r["r2"] == pytest.approx(1 - 0.5 / 5.0)
    assert regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])["r2"] == pytest.approx(0.0)


def test_probe_protocol_selects_on_val_refits_on_train_and_val():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    y = (x[:, 0] + 0.3 * rng.normal(size=600) > 0).astype(np.int64)
    res = linear_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:],
                       "classification", grid=(1e-4, 1e-2, 10.0))
    assert set(res.metrics) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert res.l2 in (1e-4, 1e-2) and res.train_rows == 400
    assert set(res.val_scores) == {1e-4, 1e-2, 10.0}
    assert res.metrics["balanced_accuracy"] > 0.85
    # the refit is the probe on train+val with the chosen L2
    refit = fit_probe(x[:400], y[:400], "classification", 2, res.l2)
    assert score_all(refit, x[400:], y[400:]) == res.metrics
    t = x @ rng.normal(size=8) + 0.1 * rng.normal(size=600)
    reg = linear_probe(x[:300], t[:300], x[300:400], t[300:400], x[400:], t[400:], "regression")
    assert set(reg.metrics) == {"mse", "mae", "r2"} and reg.metrics["r2"] > 0.95
    few = few_label_probe(x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:],
                          ks=(2, 20), seeds=(0, 1, 2), grid=(1e-3, 1e-1))
    assert set(few) == {2, 20}
    assert few[20]["balanced_accuracy"]["n"] == 3
    assert few[20]["balanced_accuracy"]["mean"] > 0.75


# ------------------------------------------------------------ the generator's structure


def _splits(preset: str, n: int):
    manifest, arrays = synth.make_arrays(preset, n, seed=3)
    cut = [int(0.6 * n), int(0.8 * n)]
    parts = dict(zip(("train", "val", "test"),
                     [{k: v[i] for k, v in arrays.items()}
                      for i in np.split(np.arange(n), cut)]))
    return manifest, parts


def test_raw_feature_probes_recover_what_the_generator_built():
    manifest, parts = _splits("rus", 1500)
    specs = [manifest.label(c) for c in ("redundancy", "unique_a", "unique_c", "synergy",
                                         "z_unique_b")]
    settings = diag.ProbeSettings(l2_grid=(1e-4, 1e-2), few_label_k=())
    res = diag.primary_table(diag.raw_feature_probes(parts, specs, manifest.modality_names,
                                                     settings))
    for m in "abc":                                   # every modality carries redundancy
        assert res["redundancy"][f"raw:{m}"] > 0.95
    assert res["unique_a"]["raw:a"] > 0.95 and res["unique_c"]["raw:c"] > 0.95
    for m in "bc":                                    # ... and only a carries unique_a
        assert abs(res["unique_a"][f"raw:{m}"] - 0.5) < 0.08
    assert abs(res["unique_c"]["raw:a"] - 0.5) < 0.08
    assert res["z_unique_b"]["raw:b"] > 0.95 and res["z_unique_b"]["raw:a"] < 0.05
    # the XOR synergy is in a and b together but not linearly: chance even on all features
    assert abs(res["synergy"]["raw:all"] - 0.5) < 0.08

    manifest, parts = _splits("factorcl", 1200)
    specs = [manifest.label(c) for c in ("y_shared", "y_unique1", "y_unique2")]
    res = diag.primary_table(diag.raw_feature_probes(parts, specs, manifest.modality_names,
                                                     settings))
    assert res["y_shared"]["raw:x1"] > 0.95 and res["y_shared"]["raw:x2"] > 0.95
    assert res["y_unique1"]["raw:x1"] > 0.95 and abs(res["y_unique1"]["raw:x2"] - 0.5) < 0.08
    assert res["y_unique2"]["raw:x2"] > 0.95 and abs(res["y_unique2"]["raw:x1"] - 0.5) < 0.08


# ------------------------------------------------------------------------------- embed


def test_embed_on_a_multi_shard_data_set_gives_one_row_per_tuple(runs, tmp_path, capsys):
    manifest, arrays = synth.make_arrays("rus", 260, seed=9)
    arrays["id"] = arrays["id"] * 7 + 1000           # ids that are not row numbers
    # a multi-hot label column ((N, K) uint8) rides along unchanged
    manifest.labels.append(LabelSpec("tags", "multilabel", 3, classes=("a", "b", "c")))
    arrays["tags"] = np.random.default_rng(9).integers(0, 2, (260, 3)).astype(np.uint8)
    parts = {"train": {k: v[:200] for k, v in arrays.items()},
             "test": {k: v[200:] for k, v in arrays.items()}}
    data = str(tmp_path / "multi")
    write_dataset(data, manifest, parts, max_rows_per_shard=17)
    assert len(os.listdir(os.path.join(data, "train"))) == 12
    out = str(tmp_path / "emb")
    assert main(["embed", "--run", runs["r0"], "--data", data, "--out", out,
                 "--concurrency", "2", "--batch-size", "16"]) == 0
    assert "embedded 260 tuples" in capsys.readouterr().out

    model = mmcl.load(runs["r0"])
    for split, cols in parts.items():
        got = read_embeddings(out, split)
        assert len(got["id"]) == len(cols["id"]) == len(np.unique(got["id"]))
        order = np.argsort(cols["id"])
        np.testing.assert_array_equal(got["id"], cols["id"][order])
        batch = {m: torch.as_tensor(cols[m][order]) for m in manifest.modality_names}
        np.testing.assert_allclose(got[FUSED], model.embed(batch).numpy(), atol=1e-5)
        own = model.modality_embeddings(batch)
        for m in manifest.modality_names:
            np.testing.assert_allclose(got[modality_column(m)], own[m].numpy(), atol=1e-5)
        for lab in manifest.labels:
            np.testing.assert_array_equal(got[lab.name], cols[lab.name][order])
    table = pq.read_table(out)                         # Hive layout: one table, split column
    assert table.num_rows == 260 and "split" in table.column_names
    meta = json.loads(open(os.path.join(out, META_NAME)).read())
    assert meta["rows"] == {"train": 200, "test": 60} and meta["columns"][FUSED] == 16

    # the in-process path writes the same thing
    assert main(["embed", "--run", runs["r0"], "--data", data, "--out", out, "--no-ray",
                 "--overwrite", "--splits", "test"]) == 0
    again = read_embeddings(out, "test")
    np.testing.assert_allclose(again[FUSED], got[FUSED], atol=1e-5)
    np.testing.assert_array_equal(again["tags"], got["tags"])
    assert again["tags"].dtype == np.uint8 and again["tags"].shape == (60, 3)
    # an existing output is not silently appended to
    capsys.readouterr()
    assert main(["embed", "--run", runs["r0"], "--data", data, "--out", out]) == \
        EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err


# -------------------------------------------------------------------------------- eval


def _in_range(metric: str, value: float) -> bool:
    if metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        return 0.0 <= value <= 1.0
    if metric in ("mse", "mae"):
        return value >= 0.0
    return metric == "r2" and value <= 1.0


def test_eval_writes_report_json_and_markdown(runs, ray_eval, capsys):
    with open(os.path.join(ray_eval, "report.json")) as f:
        report = json.load(f)
    md = open(os.path.join(ray_eval, "report.md")).read()
    manifest = read_manifest(runs["data"])
    assert report["kind"] == "run" and report["objective"] == "tuple_infonce"
    assert report["rows"] == {"train": 320, "val": 40, "test": 40}
    assert report["embedding"]["backend"].startswith("ray")
    s = report["settings"]
    assert s["l2_grid"] == [1e-4, 1e-2] and s["few_label_k"] == [5]
    assert s["few_label_seeds"] == [0, 1] and "protocol" in s
    kinds = ["fused", "emb:a", "emb:b", "emb:c", "raw:a", "raw:b", "raw:c", "raw:all"]
    assert list(report["representations"]) == kinds
    assert set(report["labels"]) == {lab.name for lab in manifest.labels if lab.role == "label"}
    assert set(report["factors"]) == {lab.name for lab in manifest.labels
                                      if lab.role == "factor"}
    for section in ("labels", "factors"):
        for col, e in report[section].items():
            spec = manifest.label(col)
            metrics = (("accuracy", "balanced_accuracy", "macro_f1")
                       if spec.task == "classification" else ("mse", "mae", "r2"))
            assert e["task"] == spec.task and e["carried_by"] == list(spec.carried_by)
            assert list(e["probes"]) == kinds
            for kind, probe in e["probes"].items():
                assert probe["l2"] in (1e-4, 1e-2) and probe["train_rows"] == 360
                for m in metrics:
                    assert _in_range(m, probe[m]), (col, kind, m, probe[m])
            assert e["carried"]["emb:a"] == ("a" in spec.carried_by)
            if spec.task == "classification" and spec.role == "label":
                assert set(e["few_label"]) == {"fused", "raw:all"}
                few = e["few_label"]["fused"]["5"]["balanced_accuracy"]
                assert few["n"] == 2 and 0 <= few["mean"] <= 1
            else:
                assert e["few_label"] == {}
    # the raw reference sees what the generator built, even on 40 test rows
    assert report["labels"]["redundancy"]["probes"]["raw:all"]["balanced_accuracy"] > 0.9
    assert report["factors"]["z_unique_c"]["probes"]["raw:c"]["r2"] > 0.9
    assert report["final_metrics"]["epoch"] == 2
    assert "## Labels" in md and "## What each representation holds" in md
    assert "| redundancy |" in md and "| z_unique_a |" in md


def test_eval_of_several_seeds_reports_mean_and_std(runs, capsys):
    assert main(["eval", "--run", runs["r1"], runs["r2"], "--no-ray", "--l2-grid", "1e-3",
                 "--few-label-k", "5", "--few-label-seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "±" in out and "mean ± std over 2 runs" in out
    for name in ("r1", "r2"):
        assert os.path.exists(os.path.join(runs[name], "eval", "report.json"))
    with open(os.path.join(runs["r1"], "eval", "seeds", "report.json")) as f:
        combined = json.load(f)
    assert combined["kind"] == "seeds" and combined["seeds"] == [1, 2]
    assert combined["config_differences"] == []
    cell = combined["labels"]["y"]["probes"]["fused"]["balanced_accuracy"]
    assert cell["n"] == 2 and len(cell["values"]) == 2
    assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
    assert cell["std"] == pytest.approx(np.std(cell["values"], ddof=1))
    assert combined["labels"]["y"]["few_label"]["fused"]["5"]["accuracy"]["n"] == 2
    assert combined["final_metrics"]["loss"]["n"] == 2


# ------------------------------------------------------------------------------ report


def test_report_puts_runs_side_by_side_with_plots(runs, ray_eval, tmp_path, capsys,
                                                  monkeypatch):
    if not os.path.exists(os.path.join(runs["r1"], "eval", "seeds", "report.json")):
        assert main(["eval", "--run", runs["r1"], runs["r2"], "--no-ray", "--l2-grid",
                     "1e-3", "--few-label-k"]) == 0
    seeds = os.path.join(runs["r1"], "eval", "seeds")
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", runs["r0"], seeds, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| r0 |" in md and "r1 (x2)" in md and "## What the fused embedding holds" in md
    assert "±" in md and "| label |" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed
    else:
        assert (out / "curves.png").stat().st_size > 1000
        assert (out / "factors.png").stat().st_size > 1000
    # without matplotlib: the tables, and one clear message
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    other = tmp_path / "plain"
    assert main(["report", runs["r0"], "--out", str(other)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (other / "report.md").exists() and not (other / "curves.png").exists()


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("command", [["embed"], ["eval"], ["report"]])
def test_new_commands_explain_themselves(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mmcl" in capsys.readouterr().out


def test_user_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "nope")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("mmcl: error:") and "nope" in err and "Traceback" not in err
    assert main(["report", str(tmp_path)]) == EXIT_USER_ERROR
    assert "mmcl eval" in capsys.readouterr().err
    other = str(tmp_path / "other")
    synth.generate("factorcl", other, n=64)
    assert main(["embed", "--run", runs["r0"], "--data", other, "--out",
                 str(tmp_path / "e"), "--no-ray"]) == EXIT_USER_ERROR
    assert "does not fit the model" in capsys.readouterr().err
    assert main(["eval", "--run", runs["r0"], "--max-rows", "-1"]) == EXIT_USER_ERROR


# ------------------------------------------------------------ eval's parts, speed, console


def _run_copy(runs, tmp_path, name="copy"):
    """A copy of r0's run folder (its own eval/ folder), evaluated on r0's data (--data)."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(runs["r0"], dst, ignore=shutil.ignore_patterns("eval", "checkpoint_*"))
    return str(dst)


def test_eval_only_probe_or_only_retrieval_and_small_splits_in_process(runs, tmp_path,
                                                                        capsys):
    """Issue 35, item 4: `--only probe` runs the probes without retrieval, `--only retrieval`
    embeds the test split alone and runs no probe; small splits are embedded in this process
    (no Ray Data actor pool: its start cost more than the demo's whole evaluation)."""
    run = _run_copy(runs, tmp_path)
    common = ["--run", run, "--data", runs["data"], "--knn-k", "0", *FAST_PROBES,
              "--retrieval", "a:b"]
    assert main(["eval", *common, "--only", "retrieval"]) == 0
    with open(os.path.join(run, "eval", "report.json")) as f:
        report = json.load(f)
    assert report["embedding"]["backend"].startswith("in-process")
    assert report["rows_embedded"] == {"test": 40} and report["rows"] == {"test": 40}
    assert report["labels"] == {} and report["factors"] == {}
    assert report["settings"]["only"] == "retrieval" and report["retrieval"]["split"] == "test"
    assert "a:b" in report["retrieval"]["pairs"] or report["retrieval"]["no_shared_space"]
    capsys.readouterr()
    assert main(["eval", *common, "--only", "probe"]) == 0
    out = capsys.readouterr()
    with open(os.path.join(run, "eval", "report.json")) as f:
        report = json.load(f)
    assert report["embedding"]["backend"].startswith("in-process")
    assert report["retrieval"] is None and report["labels"]["y"]["probes"]["fused"]
    assert "retrieval" not in out.err and "## Labels" in out.out


def cli_joining_this_ray(*args: str, timeout: float = 600) -> tuple[int, list[str], list[str]]:
    """`mmcl ARGS --address <the module's Ray>` in a subprocess (a console of its own, as a
    user sees it: Ray Data configures its console logging once per process), joining the
    module's local Ray instead of starting one. Returns (exit code, stdout lines, stderr
    lines)."""
    import subprocess

    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "mmcl.cli", *args, "--address", address],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines()


def test_eval_on_ray_data_prints_no_ray_noise(runs, tmp_path):
    """Issue 35, item 7: `mmcl eval` on Ray Data follows pretrain's console rules: none of
    Ray Data's INFO lines (execution plans, progress logs, parquet sampling), deprecation or
    memory warnings; what remains is mmcl's own lines and the tables (on 0d8e07f: 36 lines
    of Ray output before the tables)."""
    run = _run_copy(runs, tmp_path, "quiet")
    code, out, err = cli_joining_this_ray("eval", "--run", run, "--data", runs["data"],
                                          "--concurrency", "1", "--knn-k", "0", *FAST_PROBES)
    assert code == 0, "\n".join(err[-20:])
    with open(os.path.join(run, "eval", "report.json")) as f:
        assert json.load(f)["embedding"]["backend"].startswith("ray")
    assert [line for line in out + err if RAY_NOISE.search(line)] == []
    assert out[0].startswith("# Evaluation")
    # mmcl's progress: embedding, probing, one line per representation (8), retrieval,
    # wrote; plus at most one of Ray's (the driver core worker's note on Ray Data's
    # restartable actors, from Ray's C++ logger)
    mmcl_lines = [line for line in err if line.startswith("[mmcl]")]
    assert len(mmcl_lines) == 12 and len(err) <= 13, "\n".join(err)
