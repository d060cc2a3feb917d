"""Faults on local Ray (issue 9): a training worker SIGKILLed mid-epoch, the driver killed
mid-run and the same command rerun, a crash while a checkpoint is being written, a non-finite
loss, and a Tune sweep with a crashed trial that is interrupted and resumed. Each run is tiny
(400 tuples, 5 steps per epoch and worker); every fault is a real one (SIGKILL, SIGINT, an
exception inside the worker), injected through the worker loop or from the test."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import mmcl
from mmcl import config
from mmcl.cluster import start_local_ray
from mmcl.train import launcher
from mmcl.train.checkpoint import CheckpointError, read_checkpoint_state
from conftest import TINY_MODEL, TINY_TRAIN, pid_alive, wait_for, worker_shards

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

STALL_ENV = "MMCL_TEST_STALL"
# Put first on the path of every Ray worker of this module: Tune trials run mmcl's own loop
# in processes the test cannot patch, so this stalls them from the inside. While the file
# named by $MMCL_TEST_STALL exists, a training step of epoch 2 (0-based 1) first writes
# "<file>.stalled", then waits until the test removes the file.
STALL_HOOK = """
import importlib.abc, importlib.util, os, sys, time

ARM = os.environ.get("MMCL_TEST_STALL")


def _patch(engine):
    real = engine.Engine.train_step

    def train_step(self, batch):
        if ARM and self.epoch == 1 and os.path.exists(ARM):
            open(ARM + ".stalled", "w").close()
            while os.path.exists(ARM):
                time.sleep(0.2)
        return real(self, batch)

    engine.Engine.train_step = train_step


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "mmcl.train.engine":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if ARM:
    sys.meta_path.insert(0, _Hook())
"""


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """This module's local Ray (as tests/conftest.py's), whose workers load STALL_HOOK."""
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(STALL_HOOK)
    arm = str(tmp_path_factory.mktemp("stall") / "armed")
    path = os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])
    start_local_ray(num_cpus=4, log_to_driver=False,
                    runtime_env={"env_vars": {"PYTHONPATH": path, STALL_ENV: arm}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield Path(arm)
    ray.shutdown()

TINY = [*TINY_MODEL, *TINY_TRAIN, "scaling.num_workers=2", "train.checkpoint_every=1",
        "objective.name=tuple", "data.synth.n=400"]
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small controlled data set for the module (320 training tuples: 5 steps per epoch
    on each of 2 workers at batch 32), in shards of 64 rows so that the file order of an
    epoch matters."""
    from mmcl.data.shards import read_manifest, read_split, write_dataset
    from mmcl.data.synth import generate

    one_shard = str(tmp_path_factory.mktemp("one-shard") / "rus")
    generate("rus", one_shard, n=400, seed=0)
    manifest = read_manifest(one_shard)
    root = str(tmp_path_factory.mktemp("data") / "rus")
    write_dataset(root, manifest, {name: read_split(one_shard, name) for name in manifest.splits},
                  max_rows_per_shard=64)
    return root


def tiny_config(data, tmp_path, *extra):
    return config.load(None, [*TINY, f"data.path={data}", f"storage.path={tmp_path}", *extra])


def trainer_for(cfg, loop):
    root, manifest = launcher.prepare_data(cfg)
    steps = launcher.train_steps(cfg, manifest, cfg.scaling.num_workers)
    return launcher.make_trainer(cfg, root, manifest, steps, cfg.storage.name, loop=loop), steps


def latest_registered_checkpoint(run: Path) -> Path:
    """The newest checkpoint Ray Train registered (what a rerun resumes from)."""
    snapshot = json.loads((run / SNAPSHOT).read_text())
    return run / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]


def read_metrics(run_url) -> list[dict]:
    with open(os.path.join(run_url, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]



# --------------------------------------------------------- faults inside the workers


def faulty_loop(*, stall=None, marker=None, poison=None, poison_ranks=(1,), fail_at=None):
    """mmcl's worker loop with faults at given (epoch, batch) points, both 0-based epochs and
    1-based batch numbers within the epoch:
      stall:  rank 1 of the first attempt writes its pid and step to `marker` just before that
              batch's step, then waits to be SIGKILLed by the test. Restarted workers are new
              processes and see the marker: they run normally.
      poison: that batch holds a NaN on `poison_ranks` (once per worker process).
      fail_at: every rank raises RuntimeError("injected failure") before that batch's step."""

    def loop(loop_config):
        import json as json_
        import math as math_
        import os as os_
        import time as time_

        import ray.train as train

        from mmcl.train import worker

        rank = train.get_context().get_world_rank()
        first_attempt = marker is None or not os_.path.exists(marker)
        real = worker.Engine.train_step
        seen: dict[int, int] = {}
        poisoned = []

        def train_step(self, batch):
            seen[self.epoch] = n = seen.get(self.epoch, 0) + 1
            if stall == (self.epoch, n) and rank == 1 and first_attempt:
                with open(marker + ".tmp", "w") as f:
                    json_.dump({"pid": os_.getpid(), "step": self.step}, f)
                os_.replace(marker + ".tmp", marker)
                time_.sleep(600)  # SIGKILLed here by the test
            if fail_at == (self.epoch, n):
                raise RuntimeError("injected failure")
            if poison == (self.epoch, n) and rank in poison_ranks and not poisoned:
                poisoned.append(n)
                batch = dict(batch)
                batch["a"] = batch["a"].clone()
                batch["a"][0, 0] = math_.nan
            return real(self, batch)

        worker.Engine.train_step = train_step
        return worker.train_loop_per_worker(loop_config)

    return loop


def registered_epoch(run: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (0: none yet)."""
    try:
        checkpoint = latest_registered_checkpoint(run)
        return json.loads((checkpoint / "meta.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being written
        return 0


@pytest.fixture(scope="module")
def survived(data, tmp_path_factory):
    """One 2-epoch run on 2 workers (train.nonfinite_loss=skip, scaling.max_failures=1) that
    meets two faults: in epoch 1 rank 1's third batch holds a NaN, and in epoch 2 rank 1 is
    SIGKILLed before its third batch (registered or not, the checkpoint of epoch 1 is then
    in storage).
    The tests below read what happened."""
    tmp = tmp_path_factory.mktemp("survived")
    cfg = tiny_config(data, tmp, "storage.name=survived", "train.epochs=2",
                      "train.nonfinite_loss=skip", "scaling.max_failures=1")
    marker = str(tmp / "worker.json")
    trainer, steps = trainer_for(cfg, faulty_loop(stall=(1, 3), marker=marker, poison=(0, 3)))
    killed = {}

    def kill_the_worker():
        info = wait_for(lambda: os.path.exists(marker) and json.loads(Path(marker).read_text()),
                        600, "the worker's marker")
        # Killed at once, whether or not Ray Train has registered the checkpoint of epoch 1
        # yet (it polls the workers every ~2 s): its upload finished before the epoch line,
        # and the restarted workers resume from the newest complete checkpoint in storage.
        os.kill(info["pid"], signal.SIGKILL)
        killed.update(info)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    result = trainer.fit()
    killer.join(timeout=5)
    return {"result": result, "killed": killed, "steps": steps, "cfg": cfg}


def test_a_worker_killed_with_sigkill_mid_epoch_is_restarted_from_its_checkpoint(survived):
    result, killed, steps = survived["result"], survived["killed"], survived["steps"]
    assert killed, "the worker was never killed"
    assert result.error is None
    history = result.return_value
    assert [h["epoch"] for h in history] == [1, 2]
    first = steps - 1  # one batch of epoch 1 was skipped (next test)
    # Epoch 2 ran again in the restarted group, from the checkpoint of epoch 1.
    assert [h["resumed_from_step"] for h in history] == [0, first]
    lost = killed["step"] - history[1]["resumed_from_step"]
    assert lost == 2 and lost <= survived["cfg"].train.checkpoint_every * steps
    assert history[-1]["step"] == first + steps
    with result.checkpoint.as_directory() as directory:
        assert read_checkpoint_state(directory)["step"] == first + steps
        model = mmcl.load(directory)
    assert model.manifest.modality_names == ["a", "b", "c"]


def test_a_nan_loss_on_one_worker_is_skipped_by_all_when_configured(survived):
    """Only rank 1's batch is bad: both ranks skip that step together (else DDP's gradient
    all-reduce would hang), count it, and train on with finite weights."""
    result, steps = survived["result"], survived["steps"]
    history = result.return_value
    assert [h["steps"] for h in history] == [steps - 1, steps]
    assert [h["skipped_batches"] for h in history] == [1, 1]
    assert all(math.isfinite(h["loss"]) for h in history)
    with result.checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
    assert all(v.isfinite().all() for v in state["objective"].values())


# ------------------------------------- the driver killed while a checkpoint is written

PARTIAL = "checkpoint_2999-01-01_00-00-00.000000"  # sorts after every real checkpoint

DRIVER = """
import os, sys

import mmcl.train.launcher as launcher
from mmcl.cli import main

MARKER = os.environ["MMCL_TEST_MARKER"]
RUN = os.environ["MMCL_TEST_RUN"]
PARTIAL = os.environ["MMCL_TEST_PARTIAL"]


def crashing_loop(loop_config):
    # mmcl's worker loop; rank 0 stalls while it writes the checkpoint of epoch 2, after
    # leaving what an interrupted upload leaves in storage: a checkpoint folder with some
    # of its files and state.pt cut short. The test kills this driver meanwhile.
    import json, os, shutil, time

    import ray.train

    from mmcl.train import worker

    real = worker.write_checkpoint

    def write_checkpoint(directory, state, cfg, manifest):
        real(directory, state, cfg, manifest)
        if state["epoch"] == 2 and ray.train.get_context().get_world_rank() == 0:
            partial = os.path.join(RUN, PARTIAL)
            os.makedirs(partial)
            for name in ("meta.json", "config.yaml"):
                shutil.copy(os.path.join(directory, name), partial)
            with open(os.path.join(directory, "state.pt"), "rb") as f:
                whole = f.read()
            with open(os.path.join(partial, "state.pt"), "wb") as f:
                f.write(whole[: len(whole) // 2])
            with open(MARKER + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "step": state["step"]}, f)
            os.replace(MARKER + ".tmp", MARKER)
            time.sleep(600)

    worker.write_checkpoint = write_checkpoint
    return worker.train_loop_per_worker(loop_config)


real_make_trainer = launcher.make_trainer


def make_trainer(cfg, root, manifest, steps, name, loop=None, **kw):
    return real_make_trainer(cfg, root, manifest, steps, name, loop=crashing_loop, **kw)


launcher.make_trainer = make_trainer
sys.exit(main(sys.argv[1:]))
"""



def test_the_driver_killed_mid_checkpoint_then_the_same_command_resumes(data, tmp_path,
                                                                         capsys, straight):
    """`mmcl pretrain` joins the cluster; its driver is SIGKILLed while the checkpoint of
    epoch 2 is being written (a partial checkpoint folder already in storage). The run is not
    mistaken for a finished one, the checkpoint of epoch 1 is intact, and the same command,
    run again, resumes from it: not from scratch, not from the partial one."""
    from mmcl.cli import EXIT_USER_ERROR, main

    run = tmp_path / "runs" / "killed"
    config_file = tmp_path / "run.yaml"
    cfg = tiny_config(data, tmp_path / "runs", "storage.name=killed", "train.epochs=2",
                      "scaling.max_failures=0")
    config_file.write_text(config.dump(cfg))
    steps = launcher.train_steps(cfg, launcher.prepare_data(cfg)[1], 2)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    marker = tmp_path / "writing.json"
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "MMCL_TEST_MARKER": str(marker), "MMCL_TEST_RUN": str(run),
           "MMCL_TEST_PARTIAL": PARTIAL}
    command = ["pretrain", "-c", str(config_file), "--address", address]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, str(script), *command], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        info = wait_for(lambda: marker.exists() and json.loads(marker.read_text()), 600,
                        "the checkpoint write of epoch 2 (see driver.log)")
        wait_for(lambda: registered_epoch(run) == 1, 120,
                 "Ray Train to register the checkpoint of epoch 1")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    # The job's workers die with their driver.
    wait_for(lambda: not pid_alive(info["pid"]), 60, "the job's workers to exit")

    # Not a finished run: no model to load or evaluate.
    assert not (run / "model").exists()
    with pytest.raises(CheckpointError, match="no trained model"):
        mmcl.load(str(run))
    assert main(["eval", "--run", str(run), "--no-ray"]) == EXIT_USER_ERROR
    assert "no trained model" in capsys.readouterr().err
    # The last complete checkpoint is intact and loads; the partial one is refused.
    last = latest_registered_checkpoint(run)
    assert last.name != PARTIAL and (run / PARTIAL).exists()
    assert read_checkpoint_state(str(last))["step"] == steps
    assert mmcl.load(str(last)).config.storage.name == "killed"
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint_state(str(run / PARTIAL))

    # As if the driver had been killed before Ray Train registered that checkpoint: the
    # record of registered checkpoints is lost. The checkpoint in storage still counts.
    (run / SNAPSHOT).unlink()

    # The same command again: it resumes from the checkpoint of epoch 1.
    assert main(command) == 0
    history = read_metrics(run)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["resumed_from_step"] for h in history] == [0, steps]
    assert history[-1]["step"] == 2 * steps
    assert mmcl.load(str(run)).manifest.modality_names == ["a", "b", "c"]

    # The resumed run equals an uninterrupted one with the same seed: same file order and
    # shuffles in epoch 2, same random draws on both workers.
    assert_equals_straight(run, history, straight)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted 2-epoch run of the config the resume tests interrupt."""
    cfg = tiny_config(data, tmp_path_factory.mktemp("straight"), "storage.name=straight",
                      "train.epochs=2", "scaling.max_failures=0")
    return launcher.pretrain(cfg)


def assert_equals_straight(run: Path, history: list[dict], straight) -> None:
    resumed_weights = torch.load(run / "model" / "weights.pt", weights_only=True)
    straight_weights = torch.load(Path(straight.run_url) / "model" / "weights.pt",
                                  weights_only=True)
    for key, value in straight_weights.items():
        assert torch.allclose(resumed_weights[key], value, rtol=1e-4, atol=1e-6), key
    for epoch in (0, 1):
        assert history[epoch]["loss"] == pytest.approx(straight.history[epoch]["loss"],
                                                       rel=1e-5)


def test_a_run_stopped_after_a_mid_epoch_checkpoint_resumes_as_a_straight_run(
        data, tmp_path, straight):
    """train.checkpoint_every_steps=3 at 5 steps per epoch: checkpoints at steps 3, 5 (end of
    epoch 1), 6 (one batch into epoch 2). The first attempt dies at step 8; rerun, the run
    goes on from step 6: it skips the batch of epoch 2 already trained on, draws what a
    straight run draws, and ends with its weights and its epoch losses."""
    cfg = tiny_config(data, tmp_path, "storage.name=steps", "train.epochs=2",
                      "train.checkpoint_every_steps=3", "scaling.max_failures=0")
    trainer, steps = trainer_for(cfg, faulty_loop(fail_at=(1, 3)))
    assert steps == 5
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure"):
        trainer.fit()
    run = tmp_path / "steps"
    metas = [json.loads(p.read_text()) for p in run.glob("checkpoint_*/meta.json")]
    assert {(m["epoch"], m["step"]) for m in metas} >= {(1, 6)}

    result = launcher.pretrain(cfg)
    history = read_metrics(result.run_url)
    assert [h["resumed_from_step"] for h in history] == [0, 6]
    assert [h["steps"] for h in history] == [steps, steps]
    assert history[-1]["step"] == 2 * steps
    assert_equals_straight(run, history, straight)


def test_a_dataset_built_for_the_resume_epoch_reads_that_epochs_file_order(data):
    """What a resumed driver builds (the dataset for epoch 1) reads the file order that an
    uninterrupted run reads in its second epoch, not epoch 0's again."""
    from mmcl.data import pipeline
    from mmcl.data.shards import read_manifest

    manifest = read_manifest(data)

    def epoch_orders(first_epoch: int, epochs: int) -> list[list[int]]:
        ds = pipeline.build_dataset(data, "train", manifest, ["a"], seed=3, epoch=first_epoch)
        (split,) = worker_shards(ds, 1)
        return [[int(i) for b in split.iter_batches(batch_size=None, batch_format="numpy")
                 for i in b["id"]] for _ in range(epochs)]

    straight = epoch_orders(0, 2)
    assert straight[0] != straight[1]
    assert epoch_orders(1, 1)[0] == straight[1]


# ------------------------------------------------------------------- non-finite loss


def with_loop(monkeypatch, loop):
    """`mmcl pretrain` as is, with its workers running `loop`."""
    real = launcher.make_trainer
    monkeypatch.setattr(launcher, "make_trainer",
                        lambda cfg, root, manifest, steps, name, loop_=None, **kw:
                        real(cfg, root, manifest, steps, name, loop=loop, **kw))


def test_a_nan_loss_stops_the_run_clearly_and_keeps_the_last_checkpoint(data, tmp_path,
                                                                         monkeypatch, capsys):
    from mmcl.cli import EXIT_USER_ERROR, main

    with_loop(monkeypatch, faulty_loop(poison=(1, 3), poison_ranks=(0, 1)))
    argv = ["pretrain", *[a for s in [*TINY, f"data.path={data}", f"storage.path={tmp_path}",
                                      "storage.name=nan", "train.epochs=2",
                                      "scaling.max_failures=0"] for a in ("--set", s)]]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmcl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "the loss became nan at step 7 (epoch 1)" in errors[0]
    assert "train.nonfinite_loss=skip" in errors[0]
    run = tmp_path / "nan"
    assert not (run / "model").exists()
    with pytest.raises(CheckpointError, match="no trained model"):
        mmcl.load(str(run))
    state = read_checkpoint_state(str(latest_registered_checkpoint(run)))
    assert state["step"] == 5 and state["epoch"] == 1
    assert all(v.isfinite().all() for v in state["objective"].values())


# ----------------------------------------------------------------- a corrupt shard on Ray


def test_a_corrupt_shard_is_named_on_the_ray_path(data, tmp_path, capsys):
    """A shard whose footer parses but whose data pages are garbled passes the footer
    check; Ray Data's reader then fails without naming the file. mmcl names it."""
    import shutil

    from mmcl.cli import EXIT_USER_ERROR, main
    from mmcl.data.shards import list_shards

    bad = str(tmp_path / "corrupt")
    shutil.copytree(data, bad)
    path = Path(list_shards(bad, "train")[0])
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    raw[4:len(raw) - footer] = bytes(len(raw) - footer - 4)  # zero every data page
    path.write_bytes(bytes(raw))
    argv = ["pretrain", *[a for s in [*TINY, f"data.path={bad}", f"storage.path={tmp_path}",
                                      "scaling.max_failures=0"] for a in ("--set", s)]]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"{path}: not a readable Parquet file, truncated or corrupt" in err


# ------------------------------------------------------------------------------ Tune


def test_a_crashed_trial_is_recorded_and_an_interrupted_sweep_resumes(data, tmp_path,
                                                                      local_ray):
    """A sweep over modality subsets, two trials at once: one names a modality the data
    lacks and crashes; the other trains on, and the sweep is interrupted (Ctrl-C, as a user
    would) after its first checkpoint. Running the same sweep again resumes it: the crashed
    trial stays recorded as crashed with its error, the interrupted one goes on from its own
    checkpoint and finishes, and the best config is written."""
    from mmcl.tune import space
    from mmcl.tune.sweep import run_sweep

    good, bad = ["a", "b", "c"], ["a", "zzz"]
    raw = {
        "data": {"path": data, "modalities": {"tune": "grid", "values": [good, bad]}},
        "train": {"batch_size": 32, "warmup_epochs": 0, "epochs": 2, "lr": 3e-3},
        "model": {"embed_dim": 16, "proj_hidden": 16, "proj_dim": 16, "fusion_heads": 2,
                  "encoder": {"hidden": 16}},
        "objective": {"name": "tuple_infonce"},
        "scaling": {"num_workers": 1, "max_failures": 0},
        "storage": {"path": str(tmp_path), "name": "sweep"},
        "sweep": {"searcher": "grid", "scheduler": "none", "max_concurrent_trials": 2},
    }
    folder = tmp_path / "sweep"
    interrupted = {}
    # The trial that trains stalls in its second epoch until the sweep is interrupted: it
    # cannot finish first, however the machine is loaded.
    stall = local_ray
    stall.write_text("")

    def interrupt_after_the_first_checkpoint():
        wait_for(lambda: list(folder.glob("*/error.txt")), 600, "the crashed trial")
        wait_for(lambda: Path(f"{stall}.stalled").exists(), 600,
                 "the other trial to stall in its second epoch")
        wait_for(lambda: [p for p in folder.glob("runs/trial-*/" + SNAPSHOT)
                          if registered_epoch(p.parent) >= 1], 600,
                 "the other trial's first checkpoint")
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            return  # Tune's handler is not installed: a Ctrl-C would stop pytest itself
        interrupted["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: save the experiment, return

    killer = threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        first = run_sweep(space.parse(raw, source="tiny"), progress=lambda text: None)
    finally:
        stall.unlink(missing_ok=True)
    killer.join(timeout=5)
    assert interrupted, "the sweep ended before it could be interrupted"
    assert first.interrupted and first.best_config_url is None
    statuses = {tuple(r["params"]["data.modalities"]): r["status"] for r in first.rows}
    assert statuses.get(tuple(bad)) == "error", first.table()
    assert statuses.get(tuple(good)) == "unfinished", first.table()

    lines = []
    second = run_sweep(space.parse(raw, source="tiny"), progress=lines.append)
    assert any("resuming the interrupted sweep" in line for line in lines), lines
    assert not second.interrupted
    rows = {tuple(r["params"]["data.modalities"]): r for r in second.rows}
    assert set(rows) == {tuple(good), tuple(bad)}, second.table()
    crashed, finished = rows[tuple(bad)], rows[tuple(good)]
    assert crashed["status"] == "error" and "'zzz'" in crashed["error"], second.table()
    assert finished["status"] == "done" and finished["epochs"] == 2, second.table()
    with open(folder / "runs" / f"trial-{finished['trial']}" / "metrics.jsonl") as f:
        history = [json.loads(line) for line in f]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["resumed_from_step"] == history[0]["step"] > 0
    assert second.best["trial"] == finished["trial"]
    assert config.load(second.best_config_url).data.modalities == good
    assert "error" in (folder / "trials.md").read_text()
