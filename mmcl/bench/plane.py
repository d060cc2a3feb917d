"""The Ray Train worker loop of the data-plane benchmark: batch sources interleaved by epoch.

One TorchTrainer fit (same DDP workers, same Engine, model, batch and seed) trains epoch after
epoch from a schedule of batch sources, so the sources are compared inside the same run, in
rounds, on the same warm worker processes:

    "memory"        the training split read into memory once (before any clock runs), this
                    worker's equal share iterated with `mmcl.train.local.memory_batches`
    any other name  the Ray Data shard of that name (`ray.train.get_dataset_shard(name)`),
                    streamed exactly as `mmcl.train.worker.train_loop_per_worker` does: one
                    `EpochStream` over that source's epochs, started before the model is
                    built and running ahead across epochs (`iter_worker_batches` with the
                    run's shuffle buffer); the bench builds one dataset per Parquet reader
                    variant
    "*_per_epoch"   the same, but each epoch iterated only when it begins (what mmcl did
                    before the stream: every epoch waits for its execution to start)

Only where the batches come from differs. No checkpoints are written. Rank 0 writes one entry
per epoch (source, samples/s summed over workers, data wait averaged over workers, first-batch
latency, loss) as JSON to `loop_config["out"]`.
"""

from __future__ import annotations

import json
import time

PER_EPOCH = "_per_epoch"


class _FirstBatch:
    """Iterates `batches` and records how long the first batch took to arrive (the
    per-epoch start-up of the data stream)."""

    def __init__(self, batches):
        self.batches, self.first_batch_s = batches, None

    def __iter__(self):
        start = time.perf_counter()
        for batch in self.batches:
            if self.first_batch_s is None:
                self.first_batch_s = time.perf_counter() - start
            yield batch


def plane_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from mmcl.config import RunConfig
    from mmcl.data.pipeline import EpochStream
    from mmcl.data.shards import read_split
    from mmcl.train.local import memory_batches
    from mmcl.train.worker import all_reduce_sum, epoch_batches, worker_engine

    cfg = RunConfig.model_validate(loop_config["run"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    schedule: list[str] = loop_config["schedule"]
    shards = {name: ray.train.get_dataset_shard(name) for name in set(schedule)
              if name != "memory"}
    streams = {name: EpochStream(
        lambda e, shard=shard: epoch_batches(shard, cfg, e, rank, device),
        [e for e, source in enumerate(schedule) if source == name])
        for name, shard in shards.items() if not name.endswith(PER_EPOCH)}
    cfg, engine, rank = worker_engine(loop_config)
    world = ray.train.get_context().get_world_size()
    arrays = None
    if "memory" in schedule:
        split = read_split(loop_config["root"], cfg.data.train_split,
                           columns=loop_config["columns"])
        per_worker = len(split["id"]) // world
        arrays = {k: v[rank * per_worker:(rank + 1) * per_worker] for k, v in split.items()}

    history = []
    for epoch, source in enumerate(schedule):
        if source == "memory":
            batches = memory_batches(arrays, cfg.train.batch_size,
                                     cfg.train.seed * 7919 + rank, epoch)
        elif source in streams:
            batches = (batch for _, batch in streams[source].epoch(epoch))
        else:
            batches = epoch_batches(shards[source], cfg, epoch, rank, engine.device)
        timed = _FirstBatch(batches)
        summary = engine.train_epoch(timed)
        samples_per_s, wait, first = all_reduce_sum(
            [summary["samples_per_s"], summary["data_wait_fraction"], timed.first_batch_s or 0.0],
            engine.device)
        entry = {"epoch": epoch, "source": source, "steps": summary["steps"],
                 "samples_per_s_total": samples_per_s, "data_wait_fraction": wait / world,
                 "first_batch_s": first / world, "loss": summary.get("loss")}
        history.append(entry)
        ray.train.report({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    for stream in streams.values():
        stream.close()
    if rank == 0:
        with open(loop_config["out"], "w") as f:
            json.dump(history, f)
