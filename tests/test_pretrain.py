"""Pretraining on local Ray end to end: Ray Data -> 2 Ray Train workers -> a run folder that
mmcl.load opens without Ray; a finished run is never changed (rerunning it is refused,
--continue-from trains a new run from its weights); rows with NaN are dropped and counted;
one driver per run folder (a lease); an interrupted run resumes; a worker that dies is
restarted from its last checkpoint."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmcl
from mmcl import config
from mmcl.data.shards import read_split
from mmcl.objectives import OBJECTIVES
from mmcl.train import launcher, lease, tracking
from conftest import TINY_MODEL, TINY_TRAIN

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")  # `ray.train.TrainingFailedError` below, also when run alone
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

TINY = [*TINY_MODEL, *TINY_TRAIN, "data.synth.n=400", "scaling.num_workers=2",
        "train.checkpoint_every=1"]



def tiny_config(tmp_path, *extra):
    return config.load(None, [*TINY, f"storage.path={tmp_path}", *extra])


def read_metrics(run_url):
    with open(os.path.join(run_url, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


POISONED = [3, 10]  # training rows with a NaN in modality "a"


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """The controlled data (400 tuples, 320 for training) with NaN in 2 training rows."""
    from mmcl.data.shards import read_manifest, write_dataset
    from mmcl.data.synth import generate

    clean = str(tmp_path_factory.mktemp("clean") / "rus")
    generate("rus", clean, n=400, seed=0)
    manifest = read_manifest(clean)
    splits = {name: read_split(clean, name) for name in manifest.splits}
    splits["train"]["a"][POISONED, 0] = float("nan")
    root = str(tmp_path_factory.mktemp("nan") / "rus")
    write_dataset(root, manifest, splits)
    return root


def folder_digest(folder) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def pretrain_args(*sets):
    return ["pretrain", *[a for s in [*TINY, *sets] for a in ("--set", s)]]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mmcl: error:")]


def test_pretrain_writes_a_run_that_loads_without_ray_and_continues(tmp_path, nan_data,
                                                                    capsys):
    from mmcl.cli import EXIT_USER_ERROR, main

    cfg = tiny_config(tmp_path, "storage.name=demo", "train.epochs=2",
                      "objective.name=tuple_infonce", f"data.path={nan_data}",
                      "data.nonfinite=drop", "tracking.every_n_steps=1")
    result = launcher.pretrain(cfg)
    metrics = read_metrics(result.run_url)
    assert [m["epoch"] for m in metrics] == [1, 2]
    # TensorBoard (the default tracker) from rank 0: every step and every epoch.
    curves = tracking.read_scalars(os.path.join(result.run_url, "tensorboard"))
    assert [s for s, _ in curves["train/loss"]] == list(range(1, metrics[-1]["step"] + 1))
    assert [s for s, _ in curves["epoch/loss"]] == [m["step"] for m in metrics]
    for key in ("loss", "lr", "samples_per_s", "samples_per_s_total", "data_wait_fraction"):
        assert key in metrics[-1], key
    assert metrics[-1]["samples_per_s_total"] > metrics[-1]["samples_per_s"]
    # The online probe (eval.every_epochs: 1 by default) of every label, each epoch, from
    # rank 0: in metrics.jsonl and the tracker's epoch curves.
    for m in metrics:
        assert 0.0 <= m["probe_y"] <= 1.0 and "probe_synergy" in m
    assert [s for s, _ in curves["epoch/probe_y"]] == [m["step"] for m in metrics]
    # The rows with NaN are dropped and counted, every epoch, and the summary says so.
    assert [m["dropped_rows"] for m in metrics] == [len(POISONED)] * 2
    assert f"dropped:    {len(POISONED)} training rows per epoch" in result.summary()
    assert not (Path(result.run_url) / lease.LEASE).exists(), "the lease outlived the run"

    model = mmcl.load(result.model_url)
    batch = {k: torch.as_tensor(v[:8]) for k, v in read_split(nan_data, "test").items()}
    assert model.embed(batch).shape == (8, 16)
    assert set(model.modality_embeddings(batch)) == set(model.manifest.modality_names)
    assert config.load(os.path.join(result.run_url, "config.yaml")).train.epochs == 2

    # Rerunning the finished run, with more epochs, is refused before Ray starts; nothing
    # of it changes.
    before = folder_digest(result.run_url)
    sets = [f"storage.path={tmp_path}", "objective.name=tuple_infonce",
            f"data.path={nan_data}", "data.nonfinite=drop"]
    assert main(pretrain_args(*sets, "storage.name=demo", "train.epochs=3")) == EXIT_USER_ERROR
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "is finished" in errors[0] and "--continue-from" in errors[0]
    assert folder_digest(result.run_url) == before

    # --continue-from: a new run from its weights, on Ray; the finished run stays as it was.
    assert main([*pretrain_args(*sets, "storage.name=more", "train.epochs=1"),
                 "--continue-from", result.run_url]) == 0
    more = read_metrics(tmp_path / "more")
    assert more[0]["resumed_from_step"] == 0
    assert more[0]["loss"] < metrics[0]["loss"], "the continued run did not start trained"
    assert folder_digest(result.run_url) == before


def test_in_process_a_finished_run_is_never_changed_and_drops_are_counted(tmp_path, nan_data,
                                                                          capsys):
    from mmcl.cli import EXIT_USER_ERROR, main

    sets = [f"storage.path={tmp_path}", "objective.name=tuple", "train.epochs=1",
            f"data.path={nan_data}", "data.nonfinite=drop"]
    assert main([*pretrain_args(*sets, "storage.name=base"), "--no-ray"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "base"
    base = read_metrics(run)
    assert [m["dropped_rows"] for m in base] == [len(POISONED)]
    assert f"dropped:    {len(POISONED)} training rows per epoch" in out
    before = folder_digest(run)

    for name in ("base", "base/../base"):
        assert main([*pretrain_args(*sets, f"storage.name={name}", "train.epochs=2"),
                     "--no-ray"]) == EXIT_USER_ERROR
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1, errors
    assert folder_digest(run) == before

    # Continuing needs a model the weights fit; then it writes a new run from them.
    assert main([*pretrain_args(*sets, "storage.name=wider", "model.embed_dim=32"),
                 "--continue-from", str(run), "--no-ray"]) == EXIT_USER_ERROR
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "does not fit" in errors[0], errors
    assert main([*pretrain_args(*sets, "storage.name=more"), "--continue-from", str(run),
                 "--no-ray"]) == 0
    assert "starting from the weights of" in capsys.readouterr().out
    assert read_metrics(tmp_path / "more")[0]["loss"] < base[0]["loss"]
    assert folder_digest(run) == before


# --------------------------------------------------------------- one driver per run folder


def test_a_second_driver_on_the_same_run_is_refused_naming_the_holder(tmp_path, capsys):
    from mmcl.cli import EXIT_USER_ERROR, main

    run = tmp_path / "busy"
    with lease.run_lease(str(run)):
        assert main([*pretrain_args(f"storage.path={tmp_path}", "storage.name=busy",
                                    "objective.name=tuple", "train.epochs=1"),
                     "--no-ray"]) == EXIT_USER_ERROR
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1, errors
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since" in errors[0]
        assert not (run / "model").exists()
    assert not (run / lease.LEASE).exists(), "the lease was not released"


def write_lease(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / lease.LEASE).write_text(json.dumps({**lease.new_lease(), **fields}))


def test_a_stale_lease_of_a_killed_driver_does_not_block_a_resume(tmp_path):
    run = tmp_path / "stale"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # This host: the holder process is gone, or its pid now runs another process.
    for fields in ({"pid": gone.pid}, {"pid": os.getpid(), "started": "0"}):
        write_lease(run, **fields)
        taken = lease.Lease(str(run))
        taken.acquire()
        assert json.loads((run / lease.LEASE).read_text())["token"] == taken.mine["token"]
        taken.release()
    # Another host: expired once not renewed for EXPIRY_S; a renewed one still holds.
    write_lease(run, host="elsewhere", renewed=time.time() - lease.EXPIRY_S - 1)
    lease.Lease(str(run)).acquire()
    write_lease(run, host="elsewhere", pid=1234, renewed=time.time())
    with pytest.raises(lease.RunBusyError, match="host elsewhere, pid 1234"):
        lease.Lease(str(run)).acquire()


def test_the_lease_on_s3_is_a_conditional_put(s3_endpoint):
    url = "s3://mmcl-test/runs/shared"
    first, second = lease.Lease(url, s3_endpoint), lease.Lease(url, s3_endpoint)
    first.acquire()
    assert not second._create(lease.new_lease()), "a second exclusive create succeeded"
    with pytest.raises(lease.RunBusyError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.renew()
    first.release()
    second.acquire()
    assert second.read()["token"] == second.mine["token"]
    second.release()
    assert second.read() is None


# The Ray path has no branch on objective names (worker loop, data, checkpoints are the same
# for all), and tests/test_distributed_losses.py checks every objective's two-rank loss and
# gradients against one process. So every objective trains through the launcher in process
# (the Engine the workers run), and these four, which between them use every kind of
# cross-worker gather (fused tuples and disturbed sets, masked views, critics, labels), also
# train on two Ray workers: each Ray Train run costs ~35 s of start-up on 2 cores.
RAY_OBJECTIVES = ("comm", "factorcl_ssl", "supcon", "tuple_infonce")


def objective_config(tmp_path, name):
    preset = "factorcl" if name.startswith("factorcl") else "rus"
    return tiny_config(tmp_path, f"objective.name={name}", f"data.synth.preset={preset}",
                       "data.synth.n=600", "train.epochs=3", "train.lr=3e-3",
                       "train.checkpoint_every=3")


def assert_learned(name, result):
    losses = [m["loss"] for m in read_metrics(result.run_url)]
    assert len(losses) == 3 and losses[-1] < losses[0], f"{name}: {losses}"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_through_the_launcher(tmp_path, name):
    assert_learned(name, launcher.pretrain(objective_config(tmp_path, name), in_process=True))


@pytest.mark.parametrize("name", RAY_OBJECTIVES)
def test_objectives_train_on_two_workers(tmp_path, name):
    assert_learned(name, launcher.pretrain(objective_config(tmp_path, name)))


def dying_loop(at_epoch):
    """mmcl's worker loop, except that a run's first attempt dies when it starts epoch
    `at_epoch` (after the checkpoint of the epoch before). Restarted workers are fresh
    processes, so the patch does not follow them."""

    def loop(loop_config):
        import ray.train

        from mmcl.train import worker

        if ray.train.get_checkpoint() is None:
            real = worker.Engine.train_epoch

            def train_epoch(self, batches):
                if self.epoch == at_epoch:
                    raise RuntimeError("injected worker failure")
                return real(self, batches)

            worker.Engine.train_epoch = train_epoch
        return worker.train_loop_per_worker(loop_config)

    return loop


def test_a_killed_run_resumes_at_its_checkpoint_when_rerun(tmp_path):
    cfg = tiny_config(tmp_path, "storage.name=killed", "train.epochs=2", "objective.name=tuple",
                      "scaling.max_failures=0")
    root, manifest = launcher.prepare_data(cfg)
    steps = launcher.train_steps(cfg, manifest, cfg.scaling.num_workers)
    with pytest.raises(ray.train.TrainingFailedError, match="injected worker failure"):
        launcher.make_trainer(cfg, root, manifest, steps, "killed", loop=dying_loop(1)).fit()

    result = launcher.pretrain(cfg)
    history = read_metrics(result.run_url)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["resumed_from_step"] for h in history] == [0, steps]
    assert history[-1]["step"] == 2 * steps


def test_a_failed_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "storage.name=flaky", "train.epochs=3", "objective.name=tuple",
                      "scaling.max_failures=1")
    root, manifest = launcher.prepare_data(cfg)
    steps = launcher.train_steps(cfg, manifest, cfg.scaling.num_workers)

    result = launcher.make_trainer(cfg, root, manifest, steps, "flaky",
                                   loop=dying_loop(1)).fit()
    assert result.error is None
    history = result.return_value
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert result.metrics["epoch"] == 3
    assert history[1]["resumed_from_step"] == steps  # epoch 2 ran after the restart


def test_too_small_a_cluster_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, "scaling.num_workers=8")
    with pytest.raises(launcher.LaunchError, match="scaling.num_workers"):
        launcher.pretrain(cfg)


def test_a_worker_hands_no_host_tensor_to_a_gpu_process_group(tmp_path, monkeypatch):
    """NCCL, the backend of GPU workers, refuses host tensors ("No backend type associated
    with device type cpu"): an epoch summary's all-reduce crashed every GPU run at the end of
    epoch 1. A process group whose gloo is registered for CUDA only refuses them the same
    way on a CPU machine; a one-worker run under it (epoch summaries, step checkpoints, the
    online probe, the finiteness check) must finish."""
    import ray.train.torch as train_torch

    class DeviceOnlyGroup(train_torch.TorchTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, torch_config=train_torch.TorchConfig(backend="cuda:gloo"),
                             **kwargs)

    monkeypatch.setattr(train_torch, "TorchTrainer", DeviceOnlyGroup)
    cfg = tiny_config(tmp_path, "storage.name=gpu-rule", "scaling.num_workers=1",
                      "train.epochs=2", "train.checkpoint_every_steps=3",
                      "objective.name=cross", "scaling.max_failures=0")
    result = launcher.pretrain(cfg)
    assert [h["epoch"] for h in read_metrics(result.run_url)] == [1, 2]
