"""Experiment tracking: step curves and epoch summaries, from rank 0, with Ray's integrations.

`tracking.backend` picks where they go:
- tensorboard (default): tensorboardX event files in the run folder's `tensorboard/`
  (`tensorboard --logdir RUN_FOLDER`). tensorboardX ships with ray[tune]. With S3 storage the
  events are written to a local folder and copied into the run folder after every epoch.
- mlflow: Ray Train's `setup_mlflow` (rank 0 only), a local file store in the run folder's
  `mlruns/` unless `tracking.tracking_uri` names a server. Optional extra (mlflow-skinny).
- wandb: offline by default (wandb.init into the run folder's `wandb/`; `wandb sync` uploads
  it later); online through Ray Train's `setup_wandb` (needs an API key). Optional extra.
- none: nothing.

Every `tracking.every_n_steps` steps: `train/loss`, `train/lr`, `train/samples_per_s`,
`train/data_wait_fraction` and every metric the objective returns (FactorCL's NCE/CLUB terms,
...), at the global step. After every epoch: the epoch means under `epoch/`. Ranks other than
0 get a tracker that does nothing. The same class runs in mmcl.train.local and in Ray workers.
"""

from __future__ import annotations

import math
import os
import tempfile

from mmcl.config import ConfigError, RunConfig, TrackingConfig
from mmcl.storage import filesystem, is_s3, join

# Epoch-summary fields that are bookkeeping, not curves.
NOT_CURVES = ("epoch", "step", "steps", "resumed_from_step")
EXTRAS = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}


def check_backend(cfg: TrackingConfig) -> None:
    """Before Ray starts: an optional backend that is not installed is one ConfigError."""
    if cfg.backend not in EXTRAS:
        return
    module, package = EXTRAS[cfg.backend]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"tracking.backend={cfg.backend} needs the {package} package: "
                          f"pip install {package} (or set tracking.backend=tensorboard)") from None


def scalars(metrics: dict, prefix: str) -> dict[str, float]:
    """The finite numeric entries of `metrics`, named prefix/key."""
    out = {}
    for k, v in metrics.items():
        if k in NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
    return out


class Tracker:
    """Does nothing: backend none, and every rank but 0."""

    def __init__(self, cfg: TrackingConfig | None = None):
        self.every = cfg.every_n_steps if cfg else 1

    def log_step(self, metrics: dict) -> None:
        step = int(metrics.get("step", 0))
        if step % self.every == 0:
            self.write(scalars(metrics, "train"), step)

    def log_epoch(self, summary: dict) -> None:
        self.write(scalars(summary, "epoch"), int(summary.get("step", 0)))
        self.flush()

    def write(self, values: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class TensorBoardTracker(Tracker):
    def __init__(self, cfg: TrackingConfig, run_url: str, storage: dict):
        super().__init__(cfg)
        from tensorboardX import SummaryWriter

        self.target = join(run_url, "tensorboard")
        self.storage = storage
        # S3: events go to a local folder first; flush() copies them into the run folder.
        self.local = tempfile.mkdtemp(prefix="mmcl-tb-") if is_s3(run_url) else self.target
        self.writer = SummaryWriter(self.local, flush_secs=30)

    def write(self, values, step):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self):
        self.writer.flush()
        if self.local != self.target:
            fs, path = filesystem(self.target, **self.storage)
            fs.put(self.local.rstrip("/") + "/", path, recursive=True)

    def close(self):
        self.flush()
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, cfg: TrackingConfig, run_cfg: RunConfig, run_url: str):
        super().__init__(cfg)
        uri = cfg.tracking_uri or f"file:{join(run_url, 'mlruns')}"
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; the file
            # store needs no server, which is what a local run wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # Ray's integration also works outside a Train session (mmcl.train.local, --no-ray).
        from ray.air.integrations.mlflow import setup_mlflow

        self.mlflow = setup_mlflow(config=_flat_config(run_cfg), tracking_uri=uri,
                                   experiment_name=cfg.experiment or "mmcl",
                                   run_name=run_cfg.storage.name,
                                   create_experiment_if_not_exists=True)

    def write(self, values, step):
        if values:
            self.mlflow.log_metrics(values, step=step)

    def close(self):
        self.mlflow.end_run()


class WandbTracker(Tracker):
    def __init__(self, cfg: TrackingConfig, run_cfg: RunConfig, run_url: str):
        super().__init__(cfg)
        settings = dict(config=_flat_config(run_cfg), project=cfg.experiment or "mmcl",
                        name=run_cfg.storage.name, mode=cfg.wandb_mode,
                        dir=None if is_s3(run_url) else run_url)
        if cfg.wandb_mode == "online":
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(**settings)
        else:  # Ray's setup_wandb insists on an API key, which offline mode never uses
            import wandb

            self.wandb = wandb.init(**settings)

    def write(self, values, step):
        if values:
            self.wandb.log(values, step=step)

    def close(self):
        self.wandb.finish()


def _flat_config(run_cfg: RunConfig) -> dict[str, object]:
    """The run config as dotted keys (what trackers show as parameters)."""
    flat: dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", run_cfg.model_dump(mode="json"))
    return flat


def open_tracker(run_cfg: RunConfig, run_url: str, rank: int = 0) -> Tracker:
    """The run's tracker on this rank (a no-op one except on rank 0)."""
    cfg = run_cfg.tracking
    if rank != 0 or cfg.backend == "none":
        return Tracker(cfg)
    if cfg.backend == "tensorboard":
        storage = {"endpoint_url": run_cfg.storage.endpoint_url,
                   "region": run_cfg.storage.region}
        return TensorBoardTracker(cfg, run_url, storage)
    if cfg.backend == "mlflow":
        return MLflowTracker(cfg, run_cfg, run_url)
    return WandbTracker(cfg, run_cfg, run_url)




def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under a local `logdir`: tag -> [(step,
    value)] in file order. Reads the TFRecord framing (length, crc, event, crc) with
    tensorboardX's protobuf classes, so no TensorBoard install is needed."""
    import glob
    import struct

    from tensorboardX.proto.event_pb2 import Event

    curves: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                                 recursive=True)):
        with open(name, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                curves.setdefault(value.tag, []).append((event.step, value.simple_value))
    return curves


# ------------------------------------------------------------------------------ live metrics


def write_metrics(run_url: str, history: list[dict], storage: dict) -> None:
    """metrics.jsonl: one JSON line per finished epoch, rewritten whole after every epoch so
    `tail -f` follows a run (object stores cannot append; the file is small). The write goes
    to a temporary name first, so a reader never sees half a file."""
    import json

    fs, path = filesystem(run_url, **storage)
    fs.makedirs(path, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in history)
    target, partial = join(path, "metrics.jsonl"), join(path, ".metrics.jsonl.partial")
    with fs.open(partial, "w") as f:
        f.write(text)
    fs.mv(partial, target)


class RunLog:
    """What rank 0 records while training: the tracker's step curves and epoch summaries,
    and metrics.jsonl after every epoch. Other ranks record nothing."""

    def __init__(self, run_cfg: RunConfig, run_url: str | None, rank: int = 0):
        self.run_url = run_url if rank == 0 else None
        self.storage = {"endpoint_url": run_cfg.storage.endpoint_url,
                        "region": run_cfg.storage.region}
        self.tracker = (open_tracker(run_cfg, run_url, rank) if self.run_url
                        else Tracker(run_cfg.tracking))

    def step(self, metrics: dict) -> None:
        self.tracker.log_step(metrics)

    def epoch(self, summary: dict, history: list[dict]) -> None:
        self.tracker.log_epoch(summary)
        if self.run_url:
            write_metrics(self.run_url, history, self.storage)

    def close(self) -> None:
        self.tracker.close()


__all__ = ["MLflowTracker", "RunLog", "TensorBoardTracker", "Tracker", "WandbTracker",
           "check_backend", "open_tracker", "read_scalars", "scalars", "write_metrics"]
