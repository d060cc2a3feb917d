"""Training in one process on in-memory tensors: no Ray.

For debugging, tiny data, the objectives' own tests, and as the in-memory baseline that the
benchmark compares the Ray data path against. Same Engine as the Ray workers.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from mmcl.config import RunConfig
from mmcl.data.schema import DataError, Manifest
from mmcl.train.engine import Engine


def memory_batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
                   epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled full batches (drop_last) of in-memory columns; a new order every epoch."""
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in arrays.items()}


def steps_per_epoch(rows: int, batch_size: int, workers: int = 1) -> int:
    steps = (rows // workers) // batch_size
    if steps < 1:
        raise DataError(
            f"the training split has {rows} rows, fewer than one batch per worker "
            f"({workers} worker(s) x train.batch_size={batch_size}); lower train.batch_size "
            f"or scaling.num_workers, or use more data")
    return steps


def fit_in_memory(cfg: RunConfig, manifest: Manifest, train: Mapping[str, np.ndarray],
                  device: str = "cpu",
                  on_epoch: Callable[[dict], None] | None = None,
                  init_weights: Mapping[str, torch.Tensor] | None = None,
                  extra_metrics: Mapping[str, float] | None = None,
                  run_log=None) -> Engine:
    """Train for cfg.train.epochs (or cfg.train.max_steps) on in-memory columns (modalities + labels), from
    `init_weights` (the objective's state dict) if given; `extra_metrics` join every
    epoch's summary. `run_log` (a mmcl.train.tracking.RunLog) records step curves and
    metrics.jsonl as a Ray run does."""
    rows = len(next(iter(train.values())))
    engine = Engine(cfg, manifest, steps_per_epoch(rows, cfg.train.batch_size), device)
    if init_weights is not None:
        engine.objective.load_state_dict(init_weights)
    engine.on_log = run_log.step if run_log else None
    for epoch in range(cfg.train.epochs):
        summary = engine.train_epoch(
            memory_batches(train, cfg.train.batch_size, cfg.train.seed, epoch))
        summary.update(extra_metrics or {})
        if run_log:
            run_log.epoch(summary, engine.history)
        if on_epoch:
            on_epoch(summary)
        if engine.finished:  # train.max_steps, mid-epoch if need be
            break
    return engine
