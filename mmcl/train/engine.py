"""One worker's training state and step, with no Ray in sight.

The Ray worker loop (mmcl.train.worker), the in-memory loop (mmcl.train.local) and the
benchmarks all drive the same `Engine`: the augmented views the objective declares it needs
(`Objective.num_views`) on the worker's device, the objective's loss (negatives gathered
across workers inside the loss), one backward, gradient clipping, one step of every optimiser
the objective asks for, warm-up + cosine schedules. The engine never looks at the objective's
name.

On CUDA a step never waits for the device: its metrics and the finiteness of its loss stay
on the device and are read every `tracking.every_n_steps` steps, at step checkpoints and at
the epoch's end (only `train.nonfinite_loss: skip` must decide before its optimiser step, so
it reads the loss every step).
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
    # The fused kernel updates every parameter in a few launches instead of a few per
    # parameter; on CUDA only, where it was measured (docs/performance.md, section 0).
    fused = bool(group.params) and all(p.is_cuda for p in group.params)
    return cls(param_groups, lr=lr, weight_decay=wd, fused=fused or None)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA unless train.mixed_precision is false; None (fp32) on every other device."""
    if device.type != "cuda" or train.mixed_precision is False:
        return None
    return torch.bfloat16


def use_fast_cuda_matmuls() -> None:
    """TF32 for the fp32 matmuls and convolutions left outside autocast (8x the fp32 rate
    on an H200, at fp32's range)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_finite(loss: Tensor) -> bool:
    """Every worker must agree to skip a batch, or DDP's gradient all-reduce deadlocks.
    The vote is a tensor on the loss's device: NCCL refuses host tensors."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if _distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class NonFiniteWatch:
    """The first step whose loss was NaN/inf, kept on the device (no host sync per step)
    and read with `check`, which every worker calls at the same steps."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def see(self, loss: Tensor, step: int) -> None:
        first = (self.step < 0) & ~torch.isfinite(loss.detach())
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.value = torch.where(first, loss.detach().float(), self.value)

    def check(self, epoch: int) -> None:
        seen = (self.step >= 0).to(torch.int32)
        if _distributed():  # all workers stop together, on the device's own tensors
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if not bool(seen.item()):
            return
        step = int(self.step.item())
        where = (f"the loss became {self.value.item()} at step {step}" if step >= 0
                 else "the loss became non-finite on another worker")
        raise NonFiniteLossError(
            f"{where} (epoch {epoch}); the last checkpoint is intact. Lower train.lr, check "
            f"the data for extreme values, or set train.nonfinite_loss=skip")


def _number(value: Tensor | float) -> float:
    return float(value.detach().double().cpu()) if isinstance(value, Tensor) else float(value)


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

    def means(self) -> dict[str, float]:
        """The mean of every metric over the tally's steps (one read from the device)."""
        return {k: _number(v) / max(self.steps, 1) for k, v in self.sums.items()}

    def state(self) -> dict:
        """Numbers only (the sums are read from the device): checkpoints hold this."""
        sums = {k: v * max(self.steps, 1) for k, v in self.means().items()}
        return {"batches": self.batches, "steps": self.steps, "rows": self.rows, "sums": sums}


class _Interval:
    """The steps since the last log: metric sums on the device, rows, data wait, time."""

    def __init__(self):
        self.start(time.perf_counter())

    def start(self, now: float) -> None:
        self.tally, self.wait, self.began = EpochTally(), 0.0, now

    def add(self, metrics: dict[str, Tensor] | None, rows: int, wait_s: float) -> None:
        self.tally.add(metrics, rows)
        self.wait += wait_s

    @property
    def steps(self) -> int:
        return self.tally.steps

    def read(self, step: int, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.began
        out = {**self.tally.means(), "step": step, "lr": lr,
               "samples_per_s": self.tally.rows / elapsed if elapsed else 0.0,
               "data_wait_fraction": self.wait / elapsed if elapsed else 0.0,
               "steps": self.tally.steps}
        self.start(now)
        return out


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
        if self.device.type == "cuda":
            use_fast_cuda_matmuls()
        if cfg.train.compile:
            for encoder in self.objective.encoder.encoders.values():
                encoder.compile()  # in place: state dict keys stay the same
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
        self.nonfinite = NonFiniteWatch(self.device)
        self.log_every = cfg.tracking.every_n_steps
        # Called every `log_every` steps and at the epoch's end with the mean metrics of the
        # steps since the last call, lr, step, samples/s and data-wait fraction (the progress
        # bar, experiment tracking); None: nothing is called.
        self.on_log: Callable[[dict], None] | None = None
        # Called after every step with no argument (step checkpoints); None: nothing.
        self.after_step: Callable[[], None] | None = None
        self.last_logged: dict[str, float] = {}
        self._interval = _Interval()
        dtype = autocast_dtype(cfg.train, self.device)
        self.autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype \
            else nullcontext

    @property
    def lr(self) -> float:
        return self.optimizers["main"].param_groups[0]["lr"]

    def views(self, batch: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """The augmented views the objective contrasts, and no more (each costs one pass of
        every encoder)."""
        return [self.augmenter(batch, self.generator) for _ in range(self.objective.num_views)]

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """One optimisation step; returns the step's metrics as tensors on the device (read
        them when you log, not every step), or None for a skipped batch. A non-finite loss
        is raised by `check_finite` (train.nonfinite_loss=fail) or skips the batch here."""
        self.model.train()
        batch = self.prepare(to_device(batch, self.device))  # dtypes, masks, standardising
        views = self.views(batch)
        with self.autocast():
            out = self.model(views, batch, generator=self.generator)
        if self.cfg.train.nonfinite_loss == "skip":
            if not _all_ranks_finite(out.loss):
                self.skipped_batches += 1
                return None
        else:
            self.nonfinite.see(out.loss, self.step)
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
        return {"loss": out.loss.detach(), **out.metrics}

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a step's loss was NaN/inf (every worker together)."""
        self.nonfinite.check(self.epoch)

    @property
    def finished(self) -> bool:
        """The run has taken all its steps (train.epochs or train.max_steps)."""
        return self.step >= self.total_steps

    def train_epoch(self, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
        """Runs one epoch over `batches` (or what is left of it: a run resumed mid-epoch
        passes the batches after those in `self.tally`, which it goes on from); stops early
        once the run has taken all its steps. Returns mean metrics, throughput and data wait
        of the whole epoch. `self.on_log` gets the metrics of every `log_every` steps (see
        `log_now`), `self.after_step` is called after every step."""
        tally = self.tally
        rows, wait = 0, 0.0  # this process's share, for throughput and data wait
        stream = iter(batches)
        start = tick = time.perf_counter()
        self._interval.start(tick)
        while not self.finished:  # never pull a batch the run will not train on
            batch = next(stream, None)
            if batch is None:
                break
            fetched = time.perf_counter()
            wait += fetched - tick
            metrics = self.train_step(batch)
            batch_rows = len(next(iter(batch.values())))
            tally.add(metrics, batch_rows)
            self._interval.add(metrics, batch_rows, fetched - tick)
            if metrics is not None:
                rows += batch_rows
                if self.step % self.log_every == 0:
                    self.log_now()
                if self.after_step is not None:
                    self.after_step()
            tick = time.perf_counter()
        self.log_now()
        elapsed = time.perf_counter() - start
        self.epoch += 1
        self.tally = EpochTally()
        summary = tally.means()
        summary.update(epoch=self.epoch, step=self.step, steps=tally.steps, lr=self.lr,
                       samples_per_s=rows / elapsed if elapsed else 0.0,
                       data_wait_fraction=wait / elapsed if elapsed else 0.0,
                       skipped_batches=self.skipped_batches)
        self.history.append(summary)
        return summary

    def log_now(self) -> dict[str, float]:
        """Read the steps since the last log from the device (one wait for it), stop on a
        non-finite loss, hand their mean metrics to `on_log`; returns the latest logged
        metrics. Every worker calls this at the same steps (the finiteness check is a
        collective)."""
        self.check_finite()
        if self._interval.steps:
            self.last_logged = self._interval.read(self.step, self.lr)
            if self.on_log is not None:
                self.on_log(self.last_logged)
        return self.last_logged

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
