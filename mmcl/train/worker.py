"""The Ray Train function every worker runs: short and linear, the same for every objective.

find the newest complete checkpoint (if any) -> start this worker's stream of the training
split from there (one background thread over the whole run, ahead across epoch boundaries,
already flowing while the model is built) -> build the engine and load the checkpoint -> for
each remaining epoch: take steps, each batch reseeded from (seed, epoch, batch, rank), with a
checkpoint every `train.checkpoint_every_steps` steps if set; report the epoch's metrics (with
a checkpoint every `train.checkpoint_every` epochs and at the end), then print the epoch line.
The run ends after train.epochs or train.max_steps. Rank 0 returns the epoch history.
"""

from __future__ import annotations

import tempfile

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mmcl.config import RunConfig
from mmcl.data.pipeline import EpochDrops, EpochStream, derive_seed, iter_worker_batches
from mmcl.data.schema import Manifest
from mmcl.evaluate.online import OnlineProbe
from mmcl.storage import filesystem
from mmcl.train import console, tracking
from mmcl.train.checkpoint import (newest_complete_checkpoint, read_checkpoint_state,
                                   safe_load, write_checkpoint)
from mmcl.train.engine import Engine, epochs_needed


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over all workers of per-worker values (the values themselves on one). The
    tensor lives on the training device: NCCL, the GPU workers' backend, refuses host
    tensors; one worker communicates nothing."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def worker_engine(loop_config: dict) -> tuple[RunConfig, Engine, int]:
    """The run's config, this worker's DDP-wrapped Engine and its world rank."""
    cfg = RunConfig.model_validate(loop_config["run"])
    manifest = Manifest.from_json(loop_config["manifest"])
    rank = ray.train.get_context().get_world_rank()

    def wrap(module):
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={
                "find_unused_parameters": module.has_unused_parameters})

    engine = Engine(cfg, manifest, loop_config["steps_per_epoch"],
                    ray.train.torch.get_device(), rank, wrap=wrap)
    return cfg, engine, rank


def epoch_batches(shard, cfg: RunConfig, epoch: int, rank: int, device):
    """This worker's batches of one epoch from its Ray Data shard."""
    return iter_worker_batches(shard, cfg.train.batch_size,
                               shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
                               epoch=epoch, rank=rank, device=device)


def resume_state(loop_config: dict) -> dict | None:
    """The engine state to resume from: the run's newest complete checkpoint in storage (the
    one Ray Train registered, or a newer one whose upload finished before its worker or
    driver was killed, not yet registered), else the checkpoint a new run starts from
    (`start_checkpoint`, a ray.train.Checkpoint: Tune's sample optimization does this).
    None: a fresh start. Read before the model is built, so that the data can start to flow
    meanwhile from where the state left off."""
    remote = loop_config.get("remote") or (None, None)
    found = newest_complete_checkpoint(loop_config.get("run_url"), *remote)
    if found is not None:
        return found.state
    checkpoint = ray.train.get_checkpoint() or loop_config.get("start_checkpoint")
    if checkpoint:
        with checkpoint.as_directory() as directory:
            return read_checkpoint_state(directory)
    return None


def restore(engine: Engine, state: dict | None, loop_config: dict, rank: int) -> None:
    """Load the resume state, or a finished run's weights for a new run (`init_weights`:
    `mmcl pretrain --continue-from`)."""
    if state is not None:
        engine.load_state_dict(state)
        print(f"[mmcl] rank {rank}: resumed at epoch {engine.epoch}, step {engine.step}"
              + (f" ({engine.tally.batches} batches into the epoch)"
                 if engine.tally.batches else ""))
    elif loop_config.get("init_weights"):
        remote = loop_config.get("remote") or (None, None)
        fs, path = filesystem(loop_config["init_weights"], *remote)
        engine.objective.load_state_dict(safe_load(fs.cat_file(path),
                                                   loop_config["init_weights"]))


def seed_batch(engine: Engine, cfg: RunConfig, epoch: int, index: int, rank: int) -> None:
    """Each worker's random draws for a batch (augmentations, permutations, dropout) follow
    from (seed, epoch, batch index, rank) alone: a checkpoint holds rank 0's generators
    only, and a run resumed at any batch, mid-epoch too, must draw what a straight run
    draws."""
    engine.generator.manual_seed(derive_seed(cfg.train.seed, epoch, rank, index, 0))
    torch.manual_seed(derive_seed(cfg.train.seed, epoch, rank, index, 1))


def seeded(engine: Engine, cfg: RunConfig, batches, epoch: int, rank: int):
    """The batches of `batches` (EpochStream.epoch's (index, batch) pairs), each seeded just
    before it trains."""
    for index, batch in batches:
        seed_batch(engine, cfg, epoch, index, rank)
        yield batch


def stop_epoch_of(cfg: RunConfig, loop_config: dict) -> int:
    """The epoch after which this run stops: train.epochs (or fewer, as train.max_steps
    needs), or `stop_epoch`, which ends the run early keeping the schedule of the whole run."""
    stop = epochs_needed(cfg.train, loop_config["steps_per_epoch"])
    return min(stop, loop_config.get("stop_epoch") or stop)


def report_checkpoint(engine: Engine, cfg: RunConfig, metrics: dict, rank: int) -> None:
    """Report `metrics` with a checkpoint of the engine (every worker calls this together)."""
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:  # one copy of the (replicated) state is enough
            write_checkpoint(directory, engine.state_dict(), cfg, engine.manifest)
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved)


def step_checkpointer(engine: Engine, cfg: RunConfig, rank: int):
    """Called after every step: a mid-epoch checkpoint every train.checkpoint_every_steps
    steps (none at the run's last step: the final checkpoint follows), after the steps so far
    are read and found finite. Every worker takes the same steps (skipped batches are agreed
    on by all), so all of them report together."""
    every = cfg.train.checkpoint_every_steps

    def after_step() -> None:
        if every and engine.step % every == 0 and not engine.finished:
            metrics = engine.log_now()
            report_checkpoint(engine, cfg, {"epoch": engine.epoch, "step": engine.step,
                                            "epoch_batches": engine.tally.batches,
                                            "loss": metrics["loss"]}, rank)
    return after_step


def train_loop_per_worker(loop_config: dict) -> list[dict]:
    cfg = RunConfig.model_validate(loop_config["run"])
    rank = ray.train.get_context().get_world_rank()
    state = resume_state(loop_config)
    first_epoch = state["epoch"] if state else 0
    stop_epoch = stop_epoch_of(cfg, loop_config)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    # The data starts flowing now, while the model is built, and runs ahead across epochs.
    drops = EpochDrops(loop_config.get("drop_counter"), cfg.data.train_split)
    stream = EpochStream(lambda e: epoch_batches(shard, cfg, e, rank, device),
                         range(first_epoch, stop_epoch),
                         skip=state.get("tally", {}).get("batches", 0) if state else 0,
                         on_epoch_read=drops.mark)
    try:
        return _train(cfg, loop_config, state, stream, stop_epoch, drops)
    finally:
        stream.close()


def _train(cfg: RunConfig, loop_config: dict, state: dict | None, stream: EpochStream,
           stop_epoch: int, drops: EpochDrops) -> list[dict]:
    cfg, engine, rank = worker_engine(loop_config)
    restore(engine, state, loop_config, rank)
    resumed_from_step = engine.step  # 0 on a fresh run; reported so resumes are visible
    run_log = tracking.RunLog(cfg, loop_config.get("run_url"), rank)
    checkpoint_steps = step_checkpointer(engine, cfg, rank)
    probe = OnlineProbe.for_worker(cfg, engine.manifest, loop_config.get("data_root"), rank,
                                   loop_config.get("remote") or (None, None))
    for epoch in range(engine.epoch, stop_epoch):
        bar = console.EpochProgress(epoch + 1, cfg.train.epochs, engine.steps_per_epoch,
                                    enabled=rank == 0 and loop_config.get("progress_bar", False))
        engine.on_log = lambda m: (bar.update(m), run_log.step(m))
        engine.after_step = checkpoint_steps
        summary = engine.train_epoch(seeded(engine, cfg, stream.epoch(epoch), epoch, rank))
        bar.close()
        summary.update(probe.at_epoch_end(engine, epoch))  # rank 0: probe_<label>
        summary["samples_per_s_total"] = all_reduce_sum([summary["samples_per_s"]],
                                                        engine.device)[0]
        summary["resumed_from_step"] = resumed_from_step
        summary.update(drops.of_epoch(epoch))
        last = epoch + 1 == stop_epoch or engine.finished
        if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
            report_checkpoint(engine, cfg, summary, rank)
        else:
            ray.train.report(summary)
        # Only now: an epoch line (and metrics.jsonl's row) means that epoch's checkpoint
        # is in storage.
        run_log.epoch(summary, engine.history)
        if rank == 0:
            console.log_epoch(summary, cfg.train.epochs)
        if last:
            break
    run_log.close()
    return engine.history
