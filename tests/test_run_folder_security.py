"""Run folders read back (issue 34, item 3): `mmcl eval` never writes through a symbolic link
out of the run (or onto another of its files), a recorded config.yaml never makes `mmcl.load`,
`mmcl eval` or `mmcl embed` import a plug-in without the caller's consent, and a recorded
config that is not plain YAML is one `mmcl: error:` line. No Ray: one tiny in-process run,
copied per test inside the same storage folder (so its generated data set is shared)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import mmcl
from mmcl import config, storage
from mmcl.cli import EXIT_USER_ERROR, main
from mmcl.config import ConfigError
from mmcl.train import launcher
from mmcl.train.checkpoint import CheckpointError

TINY = ["data.synth.n=240", "train.epochs=1", "train.batch_size=32", "train.warmup_epochs=0",
        "model.embed_dim=8", "model.encoder.hidden=8", "model.proj_hidden=8",
        "model.proj_dim=8", "model.fusion_heads=2", "model.encoder.kind=mlp"]
FAST_EVAL = ["--no-ray", "--l2-grid", "1e-2", "--few-label-k", "--knn-k", "0",
             "--max-rows", "200"]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmcl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    storage_path = tmp_path_factory.mktemp("runs")
    cfg = config.load(None, [*TINY, f"storage.path={storage_path}", "storage.name=base"])
    return Path(launcher.pretrain(cfg, in_process=True).run_url)


@pytest.fixture
def run(trained, request) -> Path:
    """A fresh copy of the trained run beside it (same storage folder, same data)."""
    copy = trained.parent / f"copy-{request.node.name.split('[')[0][-40:]}-{os.getpid()}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(trained, copy, symlinks=True)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def edit_configs(run: Path, old: str, new: str) -> None:
    for path in (run / "config.yaml", run / "model" / "config.yaml"):
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))


# ------------------------------------------------------------------ symlinks out of a run


@pytest.mark.parametrize("link", ["eval", "eval/report.md", "eval/embeddings",
                                  "eval/embeddings/split=train"])
def test_eval_never_writes_through_a_symlink_in_the_run(run, tmp_path, capsys, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me\n")
    (run / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim if link.endswith(".md") else outside, run / link)
    assert main(["eval", "--run", str(run), *FAST_EVAL]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "symbolic link" in err and link.split("/")[-1] in err
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "keep me\n"


def test_eval_of_a_plain_run_writes_and_rewrites_its_report(run, capsys):
    for _ in range(2):    # the second finds the first's eval/ folder: real folders pass
        assert main(["eval", "--run", str(run), *FAST_EVAL]) == 0
        assert (run / "eval" / "report.md").is_file()
        assert (run / "eval" / "embeddings").is_dir()


def test_a_link_onto_another_file_of_the_run_is_refused_too(run, capsys):
    (run / "eval").mkdir()
    os.symlink(run / "model" / "config.yaml", run / "eval" / "report.json")
    before = (run / "model" / "config.yaml").read_text()
    assert main(["eval", "--run", str(run), *FAST_EVAL]) == EXIT_USER_ERROR
    assert "symbolic link" in one_error(capsys)
    assert (run / "model" / "config.yaml").read_text() == before


def test_check_inside_allows_real_folders_and_a_linked_run_folder(tmp_path):
    real = tmp_path / "real-run"
    (real / "eval" / "embeddings").mkdir(parents=True)
    storage.check_inside(str(real / "eval"), str(real))          # real folders
    storage.check_inside(str(real / "new" / "deeper"), str(real))  # not there yet
    linked = tmp_path / "linked-run"
    os.symlink(real, linked)      # the run folder itself may be a link (runs on a big disk)
    storage.check_inside(str(linked / "eval"), str(linked))
    with pytest.raises(storage.StorageError, match="not inside"):
        storage.check_inside(str(tmp_path / "elsewhere"), str(real))
    storage.check_inside("s3://bucket/run/eval", "s3://bucket/run")


# ------------------------------------------------------------------ plug-ins need consent


PLUGIN = '''
import math
from pathlib import Path

Path({marker!r}).write_text("imported")


def Encoder(spec, cfg, embed_dim):
    from mmcl.models.encoders import MLPEncoder

    Path({marker!r}).write_text("called")
    return MLPEncoder(math.prod(spec.shape), cfg, embed_dim)
'''


def plant_plugin(run: Path, tmp_path: Path, monkeypatch, name: str) -> Path:
    """A module `name` on sys.path whose import and call leave a marker file, and the run's
    recorded configs edited to name it as their encoder kind."""
    marker = tmp_path / f"{name}.marker"
    (tmp_path / "plugins").mkdir(exist_ok=True)
    (tmp_path / "plugins" / f"{name}.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    edit_configs(run, "kind: mlp", f"kind: {name}:Encoder")
    return marker


def test_mmcl_load_refuses_a_plugin_named_by_a_recorded_config(run, tmp_path, monkeypatch):
    marker = plant_plugin(run, tmp_path, monkeypatch, "mmcl_test_plugin_load")
    with pytest.raises(ConfigError, match="trust_plugins=True") as info:
        mmcl.load(str(run))
    assert "--allow-plugins" in str(info.value) and "mmcl_test_plugin_load:Encoder" in str(
        info.value)
    assert not marker.exists()
    # With consent it is imported and builds the model (weights fit: the same MLP).
    model = mmcl.load(str(run), trust_plugins=True)
    assert marker.read_text() == "called" and model.objective is not None


def test_os_system_in_a_recorded_config_is_never_called(run, capsys):
    edit_configs(run, "kind: mlp", "kind: os:system")
    with pytest.raises(ConfigError, match="'os:system'"):
        mmcl.load(str(run))
    with pytest.raises(ConfigError):
        mmcl.load(str(run / "model"))


@pytest.mark.parametrize("command", ["eval", "embed"])
def test_eval_and_embed_refuse_a_plugin_without_allow_plugins(run, tmp_path, monkeypatch,
                                                              capsys, command):
    marker = plant_plugin(run, tmp_path, monkeypatch, f"mmcl_test_plugin_{command}")
    argv = ([command, "--run", str(run), *FAST_EVAL] if command == "eval" else
            [command, "--run", str(run), "--out", str(tmp_path / "emb"), "--no-ray"])
    assert main(argv) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "--allow-plugins" in err and "plug-in" in err
    assert not marker.exists() and not (tmp_path / "emb").exists()
    assert not (run / "eval").exists()


def test_embed_with_allow_plugins_imports_it(run, tmp_path, monkeypatch, capsys):
    marker = plant_plugin(run, tmp_path, monkeypatch, "mmcl_test_plugin_allowed")
    assert main(["embed", "--run", str(run), "--out", str(tmp_path / "emb"), "--no-ray",
                 "--allow-plugins"]) == 0
    assert marker.read_text() == "called"


def test_builtin_kinds_need_no_consent(trained):
    assert mmcl.load(str(trained)).objective is not None


# ------------------------------------------------------------ a recorded config not YAML


@pytest.mark.parametrize("text", [
    "model: !!python/object/apply:os.system ['echo hacked']\n",
    "train: !custom {lr: 1}\n",
    "- just\n- a list\n",
    "model: [unclosed\n",
])
def test_a_recorded_config_that_is_not_plain_yaml_is_one_error(run, tmp_path, capsys, text):
    for path in (run / "config.yaml", run / "model" / "config.yaml"):
        path.write_text(text)
    with pytest.raises(CheckpointError, match="config.yaml"):
        mmcl.load(str(run))
    assert main(["eval", "--run", str(run), *FAST_EVAL]) == EXIT_USER_ERROR
    assert "config.yaml" in one_error(capsys)
    assert main(["embed", "--run", str(run), "--out", str(tmp_path / "e"),
                 "--no-ray"]) == EXIT_USER_ERROR
    assert "config.yaml" in one_error(capsys)


def test_a_recorded_config_with_non_utf8_bytes_is_one_error(run, capsys):
    (run / "model" / "config.yaml").write_bytes(b"train: {lr: \xff\xfe}\n")
    assert main(["eval", "--run", str(run), *FAST_EVAL]) == EXIT_USER_ERROR
    assert "UTF-8" in one_error(capsys)


# -------------------------------------------------------------------- Ctrl-C in pretrain


def test_ctrl_c_in_a_no_ray_pretrain_says_where_the_run_is(tmp_path, monkeypatch, capsys):
    from mmcl.train import local

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "fit_in_memory", interrupted)
    argv = ["pretrain", "--no-ray", *[a for s in [*TINY, f"storage.path={tmp_path}",
                                                  "storage.name=stopped"]
                                      for a in ("--set", s)]]
    assert main(argv) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmcl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mmcl: interrupted: the run ")
    assert str(tmp_path / "stopped") in lines[0] and "same command" in lines[0]


class _Controller:
    aborted = 0

    class _Abort:
        def remote(self):
            _Controller.aborted += 1

    abort = _Abort()


class _RayLikeTrainer:
    """Does what Ray Train's fit() does with Ctrl-C: registers its SIGINT handler (Ray's
    own calls controller.abort and then sys.exit(0), and the process ends with status 1 and
    no word), then the user presses Ctrl-C while it waits for the controller."""

    def _register_sigint_handler(self, controller):
        import signal
        import sys

        def ray_handler(signum, frame):
            controller.abort.remote()
            sys.exit(0)

        signal.signal(signal.SIGINT, ray_handler)

    def fit(self):
        import signal

        self._register_sigint_handler(_Controller())
        os.kill(os.getpid(), signal.SIGINT)   # delivered to this (the main) thread now
        for _ in range(10_000_000):            # the handler runs between two of these
            pass
        raise AssertionError("the SIGINT was not handled")


def test_ctrl_c_in_a_ray_pretrain_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import signal

    monkeypatch.setattr(launcher, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "make_trainer", lambda *a, **k: _RayLikeTrainer())
    before = signal.getsignal(signal.SIGINT)
    argv = ["pretrain", *[a for s in [*TINY, f"storage.path={tmp_path}", "storage.name=ray-stop"]
                          for a in ("--set", s)]]
    assert main(argv) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmcl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mmcl: interrupted: the run {tmp_path / 'ray-stop'}")
    assert "before its first checkpoint" in lines[0]
    assert _Controller.aborted == 1                      # the workers were asked to stop
    assert signal.getsignal(signal.SIGINT) is before     # the handler before is back


# ------------------------------------------------------------- a full disk in a Ray run


def _disk_full_on_a_worker():
    import errno

    from ray.train.v2.api.exceptions import WorkerGroupError

    class Wrapped(Exception):   # as Ray wraps a worker's exception with its traceback
        def __init__(self, base):
            super().__init__("worker traceback ...")
            self._base_exc = base

    full = OSError(errno.ENOSPC, "No space left on device", "/ckpt/state.pt")
    return WorkerGroupError("rank 0 failed", {0: Wrapped(full), 1: RuntimeError("collateral")})


def test_a_full_disk_on_a_worker_is_not_retried_and_other_failures_are():
    import pickle

    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from mmcl.train.failures import NoRetryWhenDiskFull

    policy = pickle.loads(pickle.dumps(NoRetryWhenDiskFull(FailureConfig(max_failures=3))))
    assert policy.make_decision(_disk_full_on_a_worker()) == FailureDecision.RAISE
    crash = WorkerGroupError("x", {0: RuntimeError("segfault")})
    assert policy.make_decision(crash) == FailureDecision.RETRY


class _FullDiskTrainer:
    """Ray Train's controller loop in small: every attempt's worker group fails with a full
    disk, and the failure policy Ray Train would use decides whether to retry."""

    attempts = 0

    def fit(self):
        from ray.train import FailureConfig
        from ray.train.v2._internal.execution.failure_handling import FailureDecision
        from ray.train.v2.api import data_parallel_trainer as dpt

        policy = dpt.create_failure_policy(FailureConfig(max_failures=3))
        while True:
            _FullDiskTrainer.attempts += 1
            error = _disk_full_on_a_worker()
            if policy.make_decision(error) == FailureDecision.RAISE:
                raise error


def test_a_full_disk_in_a_ray_pretrain_is_one_error_without_retries(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(launcher, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "make_trainer", lambda *a, **k: _FullDiskTrainer())
    argv = ["pretrain", *[a for s in [*TINY, f"storage.path={tmp_path}", "storage.name=full",
                                      "scaling.max_failures=3"] for a in ("--set", s)]]
    assert main(argv) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "no space left on the device" in err and "/ckpt/state.pt" in err
    assert _FullDiskTrainer.attempts == 1


def test_a_full_disk_in_a_tune_trial_is_not_retried(tmp_path, monkeypatch):
    """A sweep trial's Train run (run_train_trial) gives up at once on a full disk, as a
    pretrain does: the trainer's failure policy is mmcl's during its fit()."""
    from types import SimpleNamespace

    from ray import tune

    from mmcl.storage import StorageError
    from mmcl.tune import trial
    from mmcl.tune.trial import ScoreSpec, run_train_trial

    class Trainer(_FullDiskTrainer):
        run_config = SimpleNamespace(callbacks=[])

    _FullDiskTrainer.attempts = 0
    monkeypatch.setattr(launcher, "make_trainer", lambda *a, **k: Trainer())
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t"))
    monkeypatch.setattr(trial, "_score_callback_class", lambda: lambda *a: None)  # no session
    cfg = config.load(None, [*TINY, f"storage.path={tmp_path}", "storage.name=trial-x",
                             "scaling.max_failures=3"])
    with pytest.raises(StorageError, match="no space left on the device"):
        run_train_trial(cfg, storage_path=str(tmp_path), name="trial-x",
                        score_spec=ScoreSpec(reward=False), pg_records=str(tmp_path / "pg"))
    assert _FullDiskTrainer.attempts == 1


# ------------------------------------------- a Tune trial killed after its last epoch line


def _trial_killed_after_its_last_epoch(tmp_path, epochs_trained=1, epochs=1):
    """A sweep trial's Train run folder as a driver killed right after the last epoch line
    leaves it: the complete checkpoint of that epoch, no model/ (Tune never recorded it)."""
    from mmcl.train.checkpoint import write_checkpoint
    from mmcl.tune.trial import trial_run_config

    cfg = config.load(None, [*TINY, f"storage.path={tmp_path}", "storage.name=trial-x",
                             f"train.epochs={epochs}"])
    root, manifest = launcher.prepare_data(cfg)
    run_cfg = trial_run_config(cfg, root, str(tmp_path), "trial-x")
    trained = run_cfg.model_copy(update={"train": run_cfg.train.model_copy(
        update={"epochs": epochs_trained})})
    state = launcher._pretrain_in_process(trained, root, manifest)
    write_checkpoint(str(tmp_path / "trial-x" / "checkpoint_000000"), state, run_cfg, manifest)
    return cfg, manifest


def test_a_trial_killed_after_its_last_epoch_resumes_with_its_score(tmp_path, monkeypatch):
    import math

    from ray import tune

    from mmcl.tune.trial import ScoreSpec, default_probe_label, run_train_trial

    cfg, manifest = _trial_killed_after_its_last_epoch(tmp_path)
    reported = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reported.append(metrics))

    def trained_again(*args, **kwargs):
        raise AssertionError("the finished Train run was started again")

    monkeypatch.setattr(launcher, "make_trainer", trained_again)
    spec = ScoreSpec(metric="probe", probe_label=default_probe_label(manifest), reward=False)
    state = run_train_trial(cfg, storage_path=str(tmp_path), name="trial-x", score_spec=spec,
                            pg_records=str(tmp_path / "pg"))
    assert state["epoch"] == 1
    assert len(reported) == 1 and reported[0]["epoch"] == 1
    assert math.isfinite(reported[0]["score"]) and reported[0]["score"] == reported[0][
        "val_probe"]
    assert (tmp_path / "trial-x" / "model" / "weights.pt").is_file()


def test_an_in_process_trial_killed_after_its_last_epoch_resumes_with_its_score(
        tmp_path, monkeypatch):
    """The in-process trial path (sample optimization) restored from its last epoch's
    checkpoint: scores those weights and reports them, training nothing (it reported
    nothing, and Tune failed the trial for want of 'score')."""
    import math

    import ray.train
    from ray import tune

    from mmcl.train.engine import Engine
    from mmcl.tune.trial import ScoreSpec, default_probe_label, run_in_process_trial

    cfg, manifest = _trial_killed_after_its_last_epoch(tmp_path)
    reported = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reported.append(metrics))

    def trained_again(*args, **kwargs):
        raise AssertionError("the finished trial was trained again")

    monkeypatch.setattr(Engine, "train_epoch", trained_again)
    spec = ScoreSpec(metric="probe", probe_label=default_probe_label(manifest), reward=False)
    last = str(tmp_path / "trial-x" / "checkpoint_000000")
    state = run_in_process_trial(cfg, storage_path=str(tmp_path), name="trial-x",
                                 score_spec=spec, start_checkpoint=ray.train.Checkpoint(last))
    assert state["epoch"] == 1
    assert len(reported) == 1 and reported[0]["epoch"] == 1
    assert math.isfinite(reported[0]["score"]) and reported[0]["score"] == reported[0][
        "val_probe"]
    assert reported[0]["checkpoint_path"] == last


def test_a_trial_with_epochs_left_resumes_by_training(tmp_path):
    from mmcl.tune.trial import ScoreSpec, report_finished_trial, trial_run_config

    cfg, manifest = _trial_killed_after_its_last_epoch(tmp_path, epochs_trained=1, epochs=2)
    root, _ = launcher.prepare_data(cfg)
    run_cfg = trial_run_config(cfg, root, str(tmp_path), "trial-x")
    steps = launcher.train_steps(run_cfg, manifest, run_cfg.scaling.num_workers, root)
    assert report_finished_trial(run_cfg, manifest, root, str(tmp_path), "trial-x", steps,
                                 ScoreSpec(reward=False)) is None


# ---------------------------------------------- a local Ray ends with its (killed) driver


FAKE_DRIVER = """
import subprocess, sys, time
from mmcl.reaper import owned_ray, start_reaper

with owned_ray() as token:       # as start_local_ray marks the processes ray.init starts
    ray_like = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
other = subprocess.Popen(["sleep", "600"])   # started after: not this Ray's
start_reaper(token)
print(token, " ".join(str(p.pid) for p in ray_like), other.pid, flush=True)
time.sleep(600)   # SIGKILLed here by the test
"""


def test_what_a_sigkilled_driver_started_as_its_ray_is_stopped_by_its_reaper():
    """The driver's local Ray stands in as two `sleep` processes started while its token
    was set: SIGKILL the driver and they end too (the reaper sees the driver's pipe close;
    nothing is timed); a process started without the token is left alone."""
    import signal
    import subprocess
    import sys

    from conftest import pid_alive, wait_for

    from mmcl.reaper import marked

    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER], stdout=subprocess.PIPE,
                              text=True)
    token, *pids = driver.stdout.readline().split()
    ray_like, other = [int(p) for p in pids[:2]], int(pids[2])
    try:
        assert sorted(marked(token)) == sorted(ray_like)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        wait_for(lambda: not any(pid_alive(p) for p in ray_like), 60,
                 "the driver's processes to end")
        assert pid_alive(other)
    finally:
        for pid in [*ray_like, other]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_start_local_ray_marks_its_processes_and_starts_a_reaper(monkeypatch):
    import ray

    from mmcl import cluster, reaper

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault(
        "token", os.environ.get(reaper.OWNER_VAR)))
    monkeypatch.setattr(reaper, "start_reaper", lambda token: seen.setdefault("reaper", token))
    cluster.start_local_ray(num_cpus=1)
    assert seen["token"] and seen["reaper"] == seen["token"]
    assert reaper.OWNER_VAR not in os.environ   # only ray.init's processes carry it
