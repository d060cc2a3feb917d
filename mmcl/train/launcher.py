"""`mmcl pretrain` and `ray_jobs/pretrain.py`: from a validated config to a finished run folder.

    resolve data (generate the controlled set when no path is given) -> check the shards
    -> start or join Ray, with a CPU budget that leaves Ray Data at least one CPU
    -> Ray Data streams the training split to a TorchTrainer -> export the final model

A run folder (storage.path/storage.name) holds Ray Train's checkpoints plus, at the end,
    model/          weights.pt, config.yaml, manifest.json  (mmcl.load opens it, no Ray)
    config.yaml     the resolved config
    metrics.jsonl   one JSON line per epoch
    driver.lease    while a driver runs it (mmcl.train.lease): one driver per run folder
Rerunning an unfinished run (same storage path and name) resumes from its newest complete
checkpoint. A finished run (model/weights.pt written) is never changed: rerunning it is
refused; `--continue-from RUN` trains a new run from its weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from mmcl import config as config_mod
from mmcl.cluster import DATA_CPUS, LaunchError, connect  # noqa: F401  (LaunchError: re-exported)
from mmcl.config import RunConfig
from mmcl.data.schema import DataError, Manifest
from mmcl.data.shards import read_manifest, validate
from mmcl.paths import resolve_config, resolve_path
from mmcl.storage import filesystem, is_remote, is_s3, join, pyarrow_filesystem
from mmcl.train.local import steps_per_epoch
from mmcl.train.tracking import check_backend


class RunFinishedError(LaunchError):
    """The run folder holds a finished run, which is never changed."""


@dataclass
class RunResult:
    run_url: str
    checkpoint_url: str | None
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def model_url(self) -> str:
        return join(self.run_url, "model")

    def summary(self) -> str:
        last = self.history[-1] if self.history else {}
        dropped = max([h.get("dropped_rows", 0) for h in self.history], default=0)
        lines = [f"finished in {self.elapsed_s:.1f}s: {len(self.history)} epochs, "
                 f"final loss {last.get('loss', float('nan')):.4f}",
                 f"  run:        {self.run_url}",
                 f"  model:      {self.model_url}   (mmcl.load(path) opens it)",
                 f"  metrics:    {join(self.run_url, 'metrics.jsonl')}"]
        if self.checkpoint_url:
            lines.append(f"  checkpoint: {self.checkpoint_url}")
        if dropped:
            lines.append(f"  dropped:    {dropped} training rows per epoch with NaN, inf or "
                         f"null values (data.nonfinite=drop; metrics.jsonl: dropped_rows)")
        incomplete = max([h.get("dropped_missing_rows", 0) for h in self.history], default=0)
        if incomplete:
            lines.append(f"  dropped:    {incomplete} training tuples per epoch lacking a "
                         f"modality (data.missing=drop; metrics.jsonl: dropped_missing_rows)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- data


def remote(cfg: RunConfig) -> dict:
    """Where s3:// data and runs live when not on AWS itself (MinIO, Ceph, ...)."""
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


def training_columns(manifest: Manifest) -> list[str]:
    """Modalities and task labels; the controlled data's latent factors stay on disk."""
    return manifest.modality_names + [lab.name for lab in manifest.labels
                                      if lab.role == "label"]


def resolve_data(cfg: RunConfig) -> str:
    """The data set's URL; the controlled data set is generated once into storage/_data."""
    if cfg.data.path:
        return cfg.data.path
    from mmcl.data.synth import generate

    synth = cfg.data.synth
    root = join(cfg.storage.path, "_data", f"{synth.preset}-n{synth.n}-seed{synth.seed}")
    fs, path = filesystem(root, cfg.storage.endpoint_url, cfg.storage.region)
    if not fs.exists(join(path, "manifest.json")):
        print(f"[mmcl] generating the controlled '{synth.preset}' data set ({synth.n} tuples) "
              f"at {root}", flush=True)
        generate(synth.preset, root, n=synth.n, seed=synth.seed, overwrite=True, **remote(cfg))
    return root


def prepare_data(cfg: RunConfig) -> tuple[str, Manifest]:
    """Validate the shards against the manifest and restrict it to the run's columns."""
    # The run storage first: a missing bucket, refused credentials, an unreachable endpoint
    # or a local folder that cannot be written is one StorageError before Ray starts.
    from mmcl.train.checkpoint import check_storage_writable

    check_storage_writable(cfg.storage.path, cfg.storage.endpoint_url, cfg.storage.region)
    root = resolve_data(cfg)
    validate(root, splits=[cfg.data.train_split], **remote(cfg))
    manifest = read_manifest(root, **remote(cfg)).select(cfg.data.modalities,
                                                         cfg.data.label_columns)
    if manifest.splits.get(cfg.data.train_split, 0) == 0:
        raise DataError(f"the '{cfg.data.train_split}' split of {root} is empty")
    # The objective and model must fit the data (FactorCL takes 2 modalities, SupCon a class
    # label, encoder kinds the modality kinds): built once here, before Ray starts, instead
    # of failing in every Train worker (and again on each of scaling.max_failures restarts).
    from mmcl.objectives import build_objective

    build_objective(cfg, manifest)
    return root, manifest


# -------------------------------------------------------------------------------- ray


def cpus_needed(cfg: RunConfig) -> int:
    return cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + DATA_CPUS


def start_ray(cfg: RunConfig, address: str | None, verbose: bool = True) -> None:
    """Start local Ray sized so Ray Data keeps a CPU, or join a cluster and check it fits;
    shares this environment's S3 credentials with the workers."""
    connect_for(cfg, address, verbose=verbose)


def connect_for(cfg: RunConfig, address: str | None, concurrent: int | None = 1,
                job: str = "run", error: type[Exception] = LaunchError,
                verbose: bool = True) -> int:
    """mmcl.cluster.connect for jobs that are each one Ray Train run of `cfg`: how many of
    them fit at once (`concurrent`, or as many as fit when None). Not verbose: the driver's
    `ray` logger prints warnings and errors only."""
    from mmcl.train import console

    workers, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    fit = connect(address, cpus_needed(cfg), concurrent,
                  gpus_per_job=workers if cfg.scaling.use_gpu else 0, job=job,
                  cost=f"{workers} workers x {cpus} CPU + {DATA_CPUS} for Ray Data",
                  advice="Lower scaling.num_workers or scaling.cpus_per_worker, or add nodes",
                  error=error, init_kwargs=console.driver_init_kwargs(verbose))
    check_storage_reachable(cfg, error)
    return fit


def check_storage_reachable(cfg: RunConfig, error: type[Exception] = LaunchError) -> None:
    """Workers on every node write checkpoints to storage.path: a local folder only works
    on one node, or where the user says every node mounts it (storage.shared)."""
    import ray

    if is_remote(cfg.storage.path) or cfg.storage.shared:
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        raise error(f"storage.path {cfg.storage.path!r} is a local folder, but the Ray cluster "
                    f"has {nodes} nodes: workers on the other nodes cannot write their "
                    "checkpoints there. Use s3://bucket/prefix (or another URL every node "
                    "reaches), or set storage.shared=true if every node mounts that folder")


def run_name(cfg: RunConfig) -> str:
    return cfg.storage.name or f"{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_filesystem(cfg: RunConfig):
    """A pyarrow filesystem for Ray Train when storage is on S3: it carries the endpoint and
    region; credentials reach the workers through mmcl.storage (in memory, never pickled)."""
    if not is_s3(cfg.storage.path):
        return None
    return pyarrow_filesystem(cfg.storage.path, cfg.storage.endpoint_url, cfg.storage.region)[1]


def storage_root(cfg: RunConfig) -> str:
    """Ray's storage_path: absolute for local folders, bucket/prefix for a custom filesystem."""
    if is_s3(cfg.storage.path):
        return cfg.storage.path.split("://", 1)[1].rstrip("/")
    return os.path.abspath(os.path.expanduser(cfg.storage.path))


def checkpoint_url(cfg: RunConfig, path: str) -> str:
    """A checkpoint path from Ray (bucket/prefix/... for S3 storage) as a URL."""
    return f"s3://{path}" if is_s3(cfg.storage.path) and "://" not in path else path


# ------------------------------------------------------------------------------ outputs


def finish_run(cfg: RunConfig, manifest: Manifest, run_url: str, state: dict) -> None:
    """Write what a user reads without Ray: model/, config.yaml, metrics.jsonl."""
    from mmcl.train.checkpoint import export_model

    export_model(state, cfg, manifest, join(run_url, "model"), cfg.storage.endpoint_url,
                 cfg.storage.region)
    write_run_record(cfg, run_url, state["history"])


def write_run_record(cfg: RunConfig, run_url: str, history: list[dict]) -> None:
    """A run folder's config.yaml and metrics.jsonl (one row per epoch)."""
    fs, path = filesystem(run_url, cfg.storage.endpoint_url, cfg.storage.region)
    with fs.open(join(path, "config.yaml"), "w") as f:
        f.write(config_mod.dump(cfg))
    with fs.open(join(path, "metrics.jsonl"), "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------- main


def train_steps(cfg: RunConfig, manifest: Manifest, workers: int,
                root: str | None = None) -> int:
    """Steps per epoch of every worker: an equal split of the training rows, full batches.
    With data.missing=drop (and `root`) only the complete tuples count: the LR schedule and
    the progress bar then fit the epochs the workers really take. A train.max_steps that
    train.epochs would never reach is refused (the run would end short of it)."""
    rows = manifest.splits[cfg.data.train_split]
    if root is not None and cfg.data.missing == "drop":
        from mmcl.data.pipeline import complete_rows

        rows = complete_rows(root, cfg.data.train_split, manifest, manifest.modality_names,
                             **remote(cfg))
    steps = steps_per_epoch(rows, cfg.train.batch_size, workers)
    if cfg.train.max_steps and cfg.train.max_steps > cfg.train.epochs * steps:
        raise config_mod.ConfigError(
            f"train.max_steps={cfg.train.max_steps} is more than train.epochs="
            f"{cfg.train.epochs} epochs of {steps} steps take ({cfg.train.epochs * steps}); "
            f"raise train.epochs (the run ends at whichever comes first)")
    return steps


def is_finished(run_url: str, cfg: RunConfig) -> bool:
    """A run is finished once its model is exported (weights.pt is written last)."""
    fs, path = filesystem(run_url, cfg.storage.endpoint_url, cfg.storage.region)
    return fs.exists(join(path, "model", "weights.pt"))


def refuse_finished(cfg: RunConfig, run_url: str) -> None:
    if is_finished(run_url, cfg):
        raise RunFinishedError(
            f"the run {run_url} is finished; a finished run is never changed. To train more, "
            f"start a new run: another name (--set storage.name=NEW), or from this run's "
            f"weights: mmcl pretrain --continue-from {run_url} --set storage.name=NEW")


def continued_weights(cfg: RunConfig, manifest: Manifest, source: str) -> str:
    """The weights.pt URL of the finished run `source` (its folder or its model/ folder),
    checked to fit the model `cfg` builds."""
    from mmcl.objectives import build_objective
    from mmcl.train.checkpoint import CheckpointError, check_weights_fit, safe_load

    remote_opts = (cfg.storage.endpoint_url, cfg.storage.region)
    for folder in (join(source, "model"), source):
        fs, path = filesystem(folder, *remote_opts)
        if fs.exists(join(path, "weights.pt")):
            url = join(folder, "weights.pt")
            weights = safe_load(fs.cat_file(join(path, "weights.pt")), url)
            check_weights_fit(build_objective(cfg, manifest).state_dict(), weights, url,
                              "this run's config")
            return url
    raise CheckpointError(f"--continue-from {source}: no finished run there (no "
                          f"model/weights.pt); pass the folder of a run `mmcl pretrain` "
                          f"finished")


def pretrain(cfg: RunConfig, address: str | None = None, in_process: bool = False,
             continue_from: str | None = None, verbose: bool = False) -> RunResult:
    """Train the run storage.path/storage.name: a new one, or an unfinished one resumed.
    `continue_from`: a finished run whose weights initialise this (new) run."""
    from mmcl.train.lease import run_lease

    start = time.perf_counter()
    # Workers run in another working directory: every path the user gave, made absolute
    # here (a missing one refused naming its field), before anything is shipped to Ray.
    cfg = resolve_config(cfg)
    continue_from = resolve_path(continue_from, "--continue-from")
    name = run_name(cfg)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"name": name})})
    run_url = join(cfg.storage.path, name)
    check_backend(cfg.tracking)  # a missing optional extra: one error before anything runs
    # The config and data are checked first (an error there is the one to fix), then whether
    # the run is finished; neither writes into the run folder.
    root, manifest = prepare_data(cfg)
    init = continued_weights(cfg, manifest, continue_from) if continue_from else None
    refuse_finished(cfg, run_url)
    steps = train_steps(cfg, manifest, 1 if in_process else cfg.scaling.num_workers, root)
    with run_lease(run_url, cfg.storage.endpoint_url, cfg.storage.region):
        refuse_finished(cfg, run_url)  # finished by another driver before the lease
        if init:
            print(f"[mmcl] starting from the weights of {continue_from}", flush=True)
        try:
            if in_process:
                state = _pretrain_in_process(cfg, root, manifest, init)
                checkpoint_url = None
            else:
                state, checkpoint_url = _pretrain_on_ray(cfg, address, root, manifest,
                                                         steps, name, init, verbose)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(interrupted(cfg, run_url, in_process)) from None
        finish_run(cfg, manifest, run_url, state)
    return RunResult(run_url, checkpoint_url, list(state["history"]),
                     time.perf_counter() - start)


def interrupted(cfg: RunConfig, run_url: str, in_process: bool) -> str:
    """What `mmcl pretrain` says when Ctrl-C stops it: where the run and its newest
    checkpoint are, and how to resume."""
    if in_process:
        return (f"the run {run_url} was stopped before its model was written (--no-ray keeps "
                f"no checkpoints); run the same command again to train it from the start")
    from mmcl.train.checkpoint import newest_complete_checkpoint

    try:
        found = newest_complete_checkpoint(run_url, cfg.storage.endpoint_url,
                                           cfg.storage.region)
    except Exception:  # noqa: BLE001 - the message must come even if storage is gone
        found = None
    if found is None:
        return (f"the run {run_url} was stopped before its first checkpoint; run the same "
                f"command again to start it afresh")
    return (f"the run {run_url} was stopped; its newest checkpoint is {found.url} (epoch "
            f"{found.epoch}): run the same command again to resume from it")


@contextlib.contextmanager
def interrupt_on_sigint(trainer):
    """While in this block, Ctrl-C during `trainer.fit()` raises KeyboardInterrupt in the
    driver (after asking Ray Train's controller to stop the workers), instead of Ray Train's
    own handler, which exits the process with status 1 and no word. The handler before it
    comes back afterwards."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None

    def register(controller) -> None:
        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one: at once
            try:
                controller.abort.remote()
            except Exception:  # noqa: BLE001 - the controller may be gone already
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    trainer._register_sigint_handler = register
    try:
        yield trainer
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _pretrain_in_process(cfg: RunConfig, root: str, manifest: Manifest,
                         init_weights: str | None = None) -> dict:
    from mmcl.data.shards import read_split
    from mmcl.train.checkpoint import safe_load
    from mmcl.train.local import fit_in_memory

    columns = training_columns(manifest)
    train = read_split(root, cfg.data.train_split, columns=columns, **remote(cfg),
                       nonfinite=cfg.data.nonfinite, missing=cfg.data.missing)
    # read_split drops rows with NaN/inf/null (data.nonfinite=drop) and incomplete tuples
    # (data.missing=drop); the manifest counts all. Counted apart, as on the Ray path.
    complete = manifest.splits[cfg.data.train_split]
    if cfg.data.missing == "drop":
        from mmcl.data.pipeline import complete_rows

        complete = complete_rows(root, cfg.data.train_split, manifest,
                                 manifest.modality_names, **remote(cfg))
    dropped = {"dropped_rows": complete - len(train["id"]),
               "dropped_missing_rows": manifest.splits[cfg.data.train_split] - complete}
    weights = None
    if init_weights:
        fs, path = filesystem(init_weights, cfg.storage.endpoint_url, cfg.storage.region)
        weights = safe_load(fs.cat_file(path), init_weights)

    from mmcl.train.console import epoch_line
    from mmcl.train.tracking import RunLog

    def log(summary):
        print(epoch_line(summary, cfg.train.epochs), flush=True)

    run_log = RunLog(cfg, join(cfg.storage.path, cfg.storage.name))
    try:
        return fit_in_memory(cfg, manifest, train, on_epoch=log, init_weights=weights,
                             extra_metrics=dropped,
                             run_log=run_log).state_dict()
    finally:
        run_log.close()


def make_trainer(cfg: RunConfig, root: str, manifest: Manifest, steps: int, name: str,
                 loop: Callable[[dict], object] | None = None, init_weights: str | None = None):
    """The TorchTrainer of a run: Ray Data streams the training split to `num_workers` DDP
    workers that run `loop` (default: mmcl's train_loop_per_worker). Same storage path and
    name = the same run: fit() then resumes from its newest complete checkpoint, and the
    dataset starts at that checkpoint's epoch (each epoch's file order is the one a straight
    run reads). `init_weights`: weights.pt of a finished run, for a new run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmcl.data.pipeline import DropCounter, build_dataset, train_data_config
    from mmcl.train import console
    from mmcl.train.checkpoint import newest_complete_checkpoint
    from mmcl.train.worker import train_loop_per_worker

    # Absolute: Ray Train workers do not run in the driver's working directory.
    run_url = checkpoint_url(cfg, f"{storage_root(cfg)}/{name}")
    found = newest_complete_checkpoint(run_url, cfg.storage.endpoint_url, cfg.storage.region)
    drops = (DropCounter.create() if "drop" in (cfg.data.nonfinite, cfg.data.missing)
             else None)
    dataset = build_dataset(root, cfg.data.train_split, manifest, training_columns(manifest),
                            seed=cfg.train.seed, epoch=found.epoch if found else 0,
                            nonfinite=cfg.data.nonfinite, missing=cfg.data.missing,
                            drop_counter=drops, **remote(cfg))
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={"run": cfg.model_dump(mode="json"), "manifest": manifest.to_json(),
                           "steps_per_epoch": steps, "progress_bar": console.show_bar(),
                           "run_url": run_url, "data_root": root,  # the online probe's
                           "remote": (cfg.storage.endpoint_url, cfg.storage.region),
                           "drop_counter": drops, "init_weights": init_weights},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_root(cfg),
            storage_filesystem=storage_filesystem(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=console.train_logging()),  # the driver's --verbose
        datasets={"train": dataset},
        dataset_config=train_data_config(),
    )


def user_error(err: Exception) -> Exception:
    """The error a user can act on behind a failed run: a worker's DataError, ObjectiveError
    or NonFiniteLossError (their messages say what to change), else the run's own error."""
    from mmcl.data.pipeline import find_data_error
    from mmcl.objectives.base import ObjectiveError
    from mmcl.train.checkpoint import unwritable
    from mmcl.train.engine import NonFiniteLossError
    from mmcl.train.failures import disk_full_error

    full = disk_full_error(err)  # not retried (mmcl.train.failures): the disk is named
    if full is not None:
        return unwritable(str(full.filename or "the run's storage"), full)
    for failure in getattr(err, "worker_failures", {}).values():
        cause = failure
        while cause is not None:
            if isinstance(cause, (DataError, ObjectiveError, NonFiniteLossError)):
                return cause
            cause = cause.__cause__
        data_error = find_data_error(failure)
        if data_error is not None:
            return data_error
    return err


def _pretrain_on_ray(cfg: RunConfig, address, root, manifest, steps, name, init=None,
                     verbose=False):
    from mmcl.train import console
    from mmcl.train.checkpoint import read_checkpoint_state
    from mmcl.train.failures import no_retry_when_disk_full

    import ray.train

    console.set_verbose(verbose)
    console.quiet_driver(verbose)  # before ray.init, which logs the first notices
    start_ray(cfg, address, verbose)
    console.filter_worker_logs(verbose)
    console.quiet_data(verbose)
    try:
        trainer = make_trainer(cfg, root, manifest, steps, name, init_weights=init)
        forget_listings(cfg)  # Ray's restore must see storage as it is now
        with interrupt_on_sigint(trainer), no_retry_when_disk_full():
            result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise user_error(err) from err
    forget_listings(cfg)
    with result.checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
    return state, checkpoint_url(cfg, result.checkpoint.path)


def forget_listings(cfg: RunConfig) -> None:
    """s3fs caches folder listings per filesystem instance, and Ray's storage filesystem is
    that same cached instance: a listing this driver made before training (the lease, the
    newest-checkpoint search) would hide the checkpoints the workers wrote since."""
    if is_s3(cfg.storage.path):
        fs, _ = filesystem(cfg.storage.path, cfg.storage.endpoint_url, cfg.storage.region)
        fs.invalidate_cache()
