"""The Ray Train function every worker runs: short and linear, the same for every objective.

resume from the newest complete checkpoint (if any) -> for each remaining epoch: reseed,
stream this worker's shard of the training split, take steps, report the epoch's metrics
(with a checkpoint every `train.checkpoint_every` epochs and at the end), then print the
epoch line. Rank 0 returns the epoch history.
"""

from __future__ import annotations

import tempfile

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mmcl.config import RunConfig
from mmcl.data.pipeline import EpochDrops, derive_seed, iter_worker_batches
from mmcl.data.schema import Manifest
from mmcl.evaluate.online import OnlineProbe
from mmcl.storage import filesystem
from mmcl.train import console, tracking
from mmcl.train.checkpoint import (newest_complete_checkpoint, read_checkpoint_state,
                                   safe_load, write_checkpoint)
from mmcl.train.engine import Engine


def all_reduce_sum(values: list[float]) -> list[float]:
    """The sums over all workers of per-worker values (the values themselves on one)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
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


def restore(engine: Engine, loop_config: dict, rank: int) -> None:
    """Resume from the run's newest complete checkpoint in storage: the one Ray Train
    registered, or a newer one whose upload finished before its worker or driver was killed
    (not yet registered). A new run may start from another run's checkpoint
    (`start_checkpoint`, a ray.train.Checkpoint: Tune's sample optimization does this) or
    from a finished run's weights (`init_weights`: `mmcl pretrain --continue-from`)."""
    remote = loop_config.get("remote") or (None, None)
    found = newest_complete_checkpoint(loop_config.get("run_url"), *remote)
    checkpoint = ray.train.get_checkpoint() or loop_config.get("start_checkpoint")
    if found is not None:
        engine.load_state_dict(found.state)
    elif checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_state_dict(read_checkpoint_state(directory))
    elif loop_config.get("init_weights"):
        fs, path = filesystem(loop_config["init_weights"], *remote)
        engine.objective.load_state_dict(safe_load(fs.cat_file(path),
                                                   loop_config["init_weights"]))
        return
    else:
        return
    print(f"[mmcl] rank {rank}: resumed at epoch {engine.epoch}, step {engine.step}")


def seed_epoch(engine: Engine, cfg: RunConfig, epoch: int, rank: int) -> None:
    """Each worker's random draws of an epoch (augmentations, permutations, dropout) follow
    from (seed, epoch, rank) alone: a checkpoint holds rank 0's generators only, and a
    resumed run must draw what a straight run draws."""
    engine.generator.manual_seed(derive_seed(cfg.train.seed, epoch, rank, 0))
    torch.manual_seed(derive_seed(cfg.train.seed, epoch, rank, 1))


def train_loop_per_worker(loop_config: dict) -> list[dict]:
    cfg, engine, rank = worker_engine(loop_config)
    restore(engine, loop_config, rank)
    resumed_from_step = engine.step  # 0 on a fresh run; reported so resumes are visible
    run_log = tracking.RunLog(cfg, loop_config.get("run_url"), rank)
    shard = ray.train.get_dataset_shard("train")
    drops = EpochDrops(loop_config.get("drop_counter"), cfg.data.train_split)
    probe = OnlineProbe.for_worker(cfg, engine.manifest, loop_config.get("data_root"), rank,
                                   loop_config.get("remote") or (None, None))
    # `stop_epoch` ends the run early, keeping the schedule of all `train.epochs`.
    stop_epoch = min(cfg.train.epochs, loop_config.get("stop_epoch") or cfg.train.epochs)
    for epoch in range(engine.epoch, stop_epoch):
        seed_epoch(engine, cfg, epoch, rank)
        bar = console.EpochProgress(epoch + 1, cfg.train.epochs, engine.steps_per_epoch,
                                    enabled=rank == 0 and loop_config.get("progress_bar", False))
        engine.on_step = lambda m: (bar.update(m), run_log.step(m))
        summary = engine.train_epoch(epoch_batches(shard, cfg, epoch, rank, engine.device))
        bar.close()
        summary.update(probe.at_epoch_end(engine, epoch))  # rank 0: probe_<label>
        summary["samples_per_s_total"] = all_reduce_sum([summary["samples_per_s"]])[0]
        summary["resumed_from_step"] = resumed_from_step
        summary["dropped_rows"] = drops.since_last()  # after the all-reduce: epoch complete
        last = epoch + 1 == stop_epoch
        if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as directory:
                saved = None
                if rank == 0:  # one copy of the (replicated) state is enough
                    write_checkpoint(directory, engine.state_dict(), cfg, engine.manifest)
                    saved = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(summary, checkpoint=saved)
        else:
            ray.train.report(summary)
        # Only now: an epoch line (and metrics.jsonl's row) means that epoch's checkpoint
        # is in storage.
        run_log.epoch(summary, engine.history)
        if rank == 0:
            console.log_epoch(summary, cfg.train.epochs)
    run_log.close()
    return engine.history
