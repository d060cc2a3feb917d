"""Experiment tracking and live metrics, in-process through mmcl.train.local: the same RunLog
the Ray workers use (their run is checked in tests/test_pretrain.py)."""

import json
import os

import pytest

from mmcl import config
from mmcl.config import ConfigError
from mmcl.data.synth import make_arrays
from mmcl.train import tracking
from mmcl.train.local import fit_in_memory
from conftest import TINY_MODEL

SMALL = [*TINY_MODEL, "train.batch_size=32", "train.epochs=2", "storage.name=run",
         "tracking.every_n_steps=2"]
STEPS_PER_EPOCH = 256 // 32


@pytest.fixture(scope="module")
def data():
    return make_arrays("factorcl", 256, seed=0)


def train(data, tmp_path, *extra, on_epoch=None):
    manifest, arrays = data
    cfg = config.load(None, [*SMALL, f"storage.path={tmp_path}", *extra])
    run_url = os.path.join(tmp_path, "run")
    run_log = tracking.RunLog(cfg, run_url)
    try:
        fit_in_memory(cfg, manifest, arrays, on_epoch=on_epoch, run_log=run_log)
    finally:
        run_log.close()
    return run_url


def test_tensorboard_events_hold_step_curves_and_the_objectives_own_terms(data, tmp_path):
    run_url = train(data, tmp_path, "objective.name=factorcl_ssl")
    curves = tracking.read_scalars(os.path.join(run_url, "tensorboard"))
    steps = list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait_fraction",
                "train/club_x1x2", "train/nce_x1x2"):  # the last two: FactorCL's own terms
        assert [s for s, _ in curves[tag]] == steps, tag
    assert [s for s, _ in curves["epoch/loss"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert curves["train/lr"][0][1] > curves["train/lr"][-1][1]  # the cosine schedule


def test_metrics_jsonl_grows_after_every_epoch_during_the_run(data, tmp_path):
    seen = []

    def read_during_run(summary):
        with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
            seen.append([json.loads(line)["epoch"] for line in f])

    train(data, tmp_path, "tracking.backend=none", on_epoch=read_during_run)
    assert seen == [[1], [1, 2]]
    assert not os.path.exists(os.path.join(tmp_path, "run", "tensorboard"))


def test_mlflow_file_store_gets_the_run_its_params_and_step_metrics(data, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path}/mlruns"
    train(data, tmp_path, "tracking.backend=mlflow", f"tracking.tracking_uri={store}",
          "tracking.experiment=mmcl-test", "objective.name=tuple_infonce")
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("mmcl-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run"
    assert runs[0].data.params["objective.name"] == "tuple_infonce"
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))


def test_a_backend_that_is_not_installed_is_one_config_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="tracking.backend=wandb needs the wandb package"):
        tracking.check_backend(config.load(None, ["tracking.backend=wandb"]).tracking)


def test_only_finite_numbers_become_curves():
    assert tracking.scalars({"loss": 1.5, "epoch": 3, "ok": True, "name": "x",
                             "bad": float("nan"), "lr": 1e-3}, "train") == {
        "train/loss": 1.5, "train/lr": 1e-3}


def test_report_accepts_a_run_still_in_progress(tmp_path):
    from mmcl.evaluate.report import compare

    run = str(tmp_path / "runs" / "live")
    history = [{"epoch": 1, "step": 12, "loss": 2.5, "samples_per_s": 100.0},
               {"epoch": 2, "step": 24, "loss": 1.25, "samples_per_s": 120.0}]
    tracking.write_metrics(run, history, {})
    result = compare([run], out=str(tmp_path / "report"), progress=None)
    assert "| in progress | 2 | 24 | 1.2500 | 120 |" in result["markdown"]
    assert not os.path.exists(os.path.join(run, ".metrics.jsonl.partial"))
    with pytest.raises(Exception, match="no evaluation report"):  # nothing to show at all
        compare([str(tmp_path / "runs" / "empty")], progress=None)


def test_wandb_offline_run_gets_the_step_metrics(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import glob

    monkeypatch.setenv("WANDB_SILENT", "true")
    run_url = train(data, tmp_path, "tracking.backend=wandb", "objective.name=tuple_infonce")
    records = glob.glob(os.path.join(run_url, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(records) == 1, os.listdir(os.path.join(run_url, "wandb"))
    with open(records[0], "rb") as f:
        blob = f.read()
    # The offline record file is protobuf: metric names appear verbatim, once per logged
    # step at least (wandb's own reader is private and changes between versions).
    assert blob.count(b"train/loss") >= 2 * STEPS_PER_EPOCH // 2
    assert b"epoch/loss" in blob
