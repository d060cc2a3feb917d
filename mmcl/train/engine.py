"""One worker's training state and step, with no Ray in sight.

The Ray worker loop (mmcl.train.worker), the in-memory loop (mmcl.train.local) and the
benchmarks all drive the same `Engine`: two augmented views on the worker's device, the
objective's loss (negatives gathered across workers inside the loss), one backward, gradient
clipping, one step of every optimiser the objective asks for, warm-up + cosine schedules.
The engine never looks at the objective's name.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmcl.config import RunConfig, TrainConfig
from mmcl.data.augment import Augmenter
from mmcl.data.prepare import Preparer
from mmcl.data.schema import Manifest
from mmcl.objectives import Objective, OptimGroup, build_objective


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is intact."""


def warmup_cosine(total_steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 (or constant)."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(group: OptimGroup, train: TrainConfig,
                   lr_scales: Mapping[nn.Parameter, float] | None = None) -> torch.optim.Optimizer:
    """One optimiser for `group`; parameters with an lr multiplier in `lr_scales` (hf
    backbones) go into torch parameter groups of their own, lr = group lr * multiplier.
    The unscaled group comes first, so param_groups[0] always carries the run's lr."""
    lr = group.lr if group.lr is not None else train.lr
    wd = group.weight_decay if group.weight_decay is not None else train.weight_decay
    by_scale: dict[float, list[nn.Parameter]] = {1.0: []}
    for p in group.params:
        by_scale.setdefault((lr_scales or {}).get(p, 1.0), []).append(p)
    param_groups = [{"params": ps, "lr": lr * scale, "lr_scale": scale}
                    for scale, ps in by_scale.items() if ps or scale == 1.0]
    if train.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=wd)
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=lr, weight_decay=wd)


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _all_ranks_finite(loss: Tensor) -> bool:
    """Every worker must agree to skip a batch, or DDP's gradient all-reduce deadlocks."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


@dataclass
class EpochTally:
    """What the epoch in progress has done so far: batches taken from the stream (skipped
    ones included: a resumed run skips exactly these), steps, rows and metric sums. It
    travels in mid-epoch checkpoints, so that a resumed epoch's summary is the one a
    straight run reports."""

    batches: int = 0
    steps: int = 0
    rows: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, metrics: dict[str, float] | None, rows: int) -> None:
        self.batches += 1
        if metrics is None:
            return
        self.steps += 1
        self.rows += rows
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state(self) -> dict:
        return {"batches": self.batches, "steps": self.steps, "rows": self.rows,
                "sums": dict(self.sums)}


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of the whole run: train.epochs epochs, or train.max_steps if that comes first
    (the LR schedule spans this length)."""
    total = train.epochs * steps_per_epoch
    return min(total, train.max_steps) if train.max_steps else total


def epochs_needed(train: TrainConfig, steps_per_epoch: int) -> int:
    """Epochs (the last one possibly partial) that the run's total steps take."""
    return math.ceil(total_steps(train, steps_per_epoch) / steps_per_epoch)


class Engine:
    def __init__(self, cfg: RunConfig, manifest: Manifest, steps_per_epoch: int,
                 device: torch.device | str = "cpu", rank: int = 0,
                 wrap: Callable[[nn.Module], nn.Module] | None = None):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")
        self.cfg, self.manifest = cfg, manifest
        self.device = torch.device(device)
        self.steps_per_epoch = steps_per_epoch
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
        self.objective: Objective = build_objective(cfg, manifest).to(self.device)
        self.model = wrap(self.objective) if wrap else self.objective
        self.augmenter = Augmenter(manifest.modalities, cfg.augment)
        self.prepare = Preparer.for_run(manifest, cfg.data)
        groups = self.objective.optimizer_groups()
        scales = self.objective.encoder.lr_scales()
        self.optimizers = {name: make_optimizer(g, cfg.train, scales)
                           for name, g in groups.items()}
        self.total_steps = total = total_steps(cfg.train, steps_per_epoch)
        warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(
                opt, warmup_cosine(total, warmup, cfg.train.schedule))
            for name, opt in self.optimizers.items()}
        self.params = [p for g in groups.values() for p in g.params]
        # Each worker draws different augmentations and permutations, repeatably.
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 1000 + rank)
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []  # one entry per finished epoch; travels in checkpoints
        self.tally = EpochTally()  # the epoch in progress; travels in checkpoints
        self.skipped_batches = 0
        # Called after every step with its metrics, lr, step, samples/s and data-wait
        # fraction (the progress bar, experiment tracking); None: nothing is called.
        self.on_step: Callable[[dict], None] | None = None
        use_amp = cfg.train.mixed_precision and self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp \
            else nullcontext

    @property
    def lr(self) -> float:
        return self.optimizers["main"].param_groups[0]["lr"]

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, float] | None:
        """One optimisation step; returns the step's metrics, or None for a skipped batch."""
        self.model.train()
        batch = self.prepare(to_device(batch, self.device))  # dtypes, masks, standardising
        view1 = self.augmenter(batch, self.generator)
        view2 = self.augmenter(batch, self.generator)
        with self.autocast():
            out = self.model(view1, view2, batch, generator=self.generator)
        if not _all_ranks_finite(out.loss):
            if self.cfg.train.nonfinite_loss == "fail":
                raise NonFiniteLossError(
                    f"the loss became {out.loss.item()} at step {self.step} (epoch "
                    f"{self.epoch}); the last checkpoint is intact. Lower train.lr, check the "
                    f"data for extreme values, or set train.nonfinite_loss=skip")
            self.skipped_batches += 1
            return None
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        for opt in self.optimizers.values():
            opt.step()
        for sched in self.schedulers.values():
            sched.step()
        self.step += 1
        return {"loss": out.loss.detach().item(), **out.metrics}

    @property
    def finished(self) -> bool:
        """The run has taken all its steps (train.epochs or train.max_steps)."""
        return self.step >= self.total_steps

    def train_epoch(self, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
        """Runs one epoch over `batches` (or what is left of it: a run resumed mid-epoch
        passes the batches after those in `self.tally`, which it goes on from); stops early
        once the run has taken all its steps. Returns mean metrics, throughput and data wait
        of the whole epoch. `self.on_step`, when set, gets every step's metrics (see
        `_step_metrics`) after the tally holds that step."""
        tally = self.tally
        rows, wait = 0, 0.0  # this process's share, for throughput and data wait
        stream = iter(batches)
        start = tick = time.perf_counter()
        while not self.finished:  # never pull a batch the run will not train on
            batch = next(stream, None)
            if batch is None:
                break
            fetched = time.perf_counter()
            wait += fetched - tick
            metrics = self.train_step(batch)
            batch_rows = len(next(iter(batch.values())))
            tally.add(metrics, batch_rows)
            if metrics is not None:
                rows += batch_rows
                if self.on_step is not None:
                    self.on_step(self._step_metrics(metrics, batch_rows, fetched - tick,
                                               time.perf_counter() - tick))
            tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        self.epoch += 1
        self.tally = EpochTally()
        summary = {k: v / max(tally.steps, 1) for k, v in tally.sums.items()}
        summary.update(epoch=self.epoch, step=self.step, steps=tally.steps, lr=self.lr,
                       samples_per_s=rows / elapsed if elapsed else 0.0,
                       data_wait_fraction=wait / elapsed if elapsed else 0.0,
                       skipped_batches=self.skipped_batches)
        self.history.append(summary)
        return summary

    def _step_metrics(self, metrics: dict, rows: int, wait_s: float, total_s: float) -> dict:
        return {**metrics, "step": self.step, "lr": self.lr,
                "samples_per_s": rows / total_s if total_s else 0.0,
                "data_wait_fraction": wait_s / total_s if total_s else 0.0}

    # -- checkpoint state: tensors, numbers, strings, lists and dicts only, so that it loads
    #    with torch.load(weights_only=True)
    def state_dict(self) -> dict:
        return {
            "objective": self.objective.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout and other global draws
            "step": self.step, "epoch": self.epoch, "history": self.history,
            "skipped_batches": self.skipped_batches, "tally": self.tally.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.generator.set_state(state["generator"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = list(state["history"])
        self.skipped_batches = state.get("skipped_batches", 0)
        self.tally = EpochTally(**state.get("tally", {}))
