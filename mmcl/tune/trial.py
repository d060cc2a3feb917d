"""What a Tune trial is in mmcl: a driver function that launches one Ray Train run.

Ray Train V2 cannot be handed to a Tuner; the documented pattern (Ray's "Hyperparameter Tuning
with Ray Tune" guide) is a Tune function that builds a TorchTrainer and calls fit(), with
`ray.tune.integration.ray_train.TuneReportCallback` forwarding each Train report to Tune.
mmcl's trial adds, on top of that pattern:

- Scoring: `ScoreReportCallback` extends TuneReportCallback. Every report carries a checkpoint
  (trials checkpoint every epoch); the callback, which runs in the Train controller beside the
  trial driver, loads the weights and adds the search objective to the metrics before they
  go to Tune: `val_probe` (a linear probe fitted on (a sample of) the training split's
  embeddings, L2 chosen on the validation split, scored on it: balanced accuracy or R²),
  `val_R` and `val_A_<modality>` (TupleInfoNCE's reward on two views of the validation
  tuples, drawn with the search's base augmentation and the same seeds for every trial),
  and `score`, the one the search maximises. The test split is never touched.
- Resources: the trial driver itself reserves no CPU (a small memory bundle), because it only
  waits for Train; the Train workers get their own placement group from Ray Train, and Ray
  Data's read tasks run outside both (Ray Data schedules its tasks with its own strategy).
  So a trial costs exactly what a `mmcl pretrain` run costs, workers x CPUs + 1 CPU for Ray
  Data (`launcher.cpus_needed`), and the number of concurrent trials is the cluster's CPUs
  divided by that, checked before the search starts (`ensure_ray`).
- Early stopping without leaks: when a scheduler (ASHA) stops a trial, Tune ends the trial
  driver and with it the Train controller, but the workers' placement group, which belongs to
  the job, outlives them (Ray Train's own cleaner needs the dashboard's state API, which local
  Ray started by mmcl does not run). Each run's rank 0 records its placement group;
  `PlacementGroupJanitor`, a Tune callback in the search driver, removes the groups of
  finished trials, so a long ASHA sweep does not run out of CPUs.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mmcl import config as config_mod
from mmcl.config import ConfigError, RunConfig
from mmcl.data.schema import ID_COLUMN, DataError, Manifest, length_column, present_column
from mmcl.storage import filesystem, join
from mmcl.train import launcher
from mmcl.train.launcher import LaunchError

# The trial driver only waits for its Train run: no CPU, a token of memory so that Tune has a
# non-empty bundle to place it with.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 1024 ** 2}
PG_RECORDS = "_placement_groups"


class TuneError(LaunchError):
    """A search cannot run as configured; the message says what to change."""


# --------------------------------------------------------------------------- resources


def absolute_paths(tune_file):
    """A copy of a TuneFile whose local storage and data paths are absolute: Tune runs each
    trial in its own working directory, where a relative path points somewhere else."""
    import dataclasses

    from mmcl.paths import resolve_raw

    return dataclasses.replace(tune_file, base=resolve_raw(tune_file.base))


def trial_resources() -> dict:
    return dict(TRIAL_DRIVER_RESOURCES)


def ensure_ray(cfg: RunConfig, address: str | None, max_concurrent: int | None) -> int:
    """Start local Ray (sized for `max_concurrent` trials, at least one) or join a cluster;
    check that one trial's Train run fits and return how many trials may run at once."""
    return launcher.connect_for(cfg, address, max_concurrent, job="trial", error=TuneError)


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ScoreSpec:
    """What a trial reports besides Train's metrics, and which of it is `score`."""

    metric: str = "reward"              # "probe" or "reward"
    probe_label: str | None = None      # label column of the probe (None: no probe)
    reward: bool = True                 # compute val_R (fused objectives only)
    eval_batch: int = 256               # candidates per retrieval batch of R
    # The views R is computed on: the search's base augmentation (an AugmentConfig dump),
    # not the trial's, whose strength may be searched: a trial must not score itself on
    # easier views.
    reward_augment: dict | None = None
    probe_rows: int = 2048              # training rows the probe is fitted on (a seeded sample)
    seed: int = 0

    @property
    def score_key(self) -> str:
        return "val_probe" if self.metric == "probe" else "val_R"


def default_probe_label(manifest: Manifest) -> str | None:
    """The label a validation probe scores: the first task label (role "label"),
    classification first."""
    labels = [lab for lab in manifest.labels if lab.role == "label"]
    labels.sort(key=lambda lab: lab.task != "classification")
    return labels[0].name if labels else None


def reward_available(cfg: RunConfig) -> bool:
    """R needs a fused objective (one tuple embedding from any subset of modalities)."""
    from mmcl.objectives import OBJECTIVES
    from mmcl.objectives.base import FusedObjective

    return issubclass(OBJECTIVES[cfg.objective.name], FusedObjective)


def resolve_metric(metric: str, label: str | None, cfg: RunConfig, manifest: Manifest,
                   val_rows: int) -> ScoreSpec:
    """The ScoreSpec of a search: `metric` auto|probe|reward; `label` the probe's column."""
    if val_rows == 0:
        raise TuneError(f"the '{cfg.data.val_split}' split of the data set is empty; a search "
                        f"scores every trial on it (set data.val_split to a non-empty split)")
    if label is not None:
        names = [lab.name for lab in manifest.labels]
        if label not in names:
            raise ConfigError(f"sweep.label: {label!r} is not a label column of the data "
                              f"set; it has {names}")
    probe_label = label or default_probe_label(manifest)
    can_reward = reward_available(cfg)
    if metric == "auto":
        metric = "probe" if probe_label else "reward"
    if metric == "probe" and probe_label is None:
        raise ConfigError("metric 'probe' needs a label column and the data set has none; "
                          "use metric: reward (label-free)")
    if metric == "reward" and not can_reward:
        raise ConfigError(f"metric 'reward' (TupleInfoNCE's R) needs a fused objective; "
                          f"'{cfg.objective.name}' has no single tuple embedding. Use "
                          f"metric: probe")
    return ScoreSpec(metric=metric, probe_label=probe_label, reward=can_reward,
                     reward_augment=cfg.augment.model_dump(), seed=cfg.train.seed)


def read_rows(root: str, split: str, columns: list[str], manifest: Manifest,
              max_rows: int | None = None, seed: int = 0, remote: Mapping | None = None
              ) -> dict[str, np.ndarray]:
    """Columns of a split in memory, in file order; with `max_rows`, a seeded sample of that
    many rows read shard by shard (the whole split is never loaded). Rows with NaN/inf in a
    modality are left out."""
    from mmcl.data.shards import iter_batches, tensor_to_numpy

    remote = dict(remote or {})
    parts: dict[str, list[np.ndarray]] = {c: [] for c in [ID_COLUMN, *columns]}
    rows = 0
    limit = None if max_rows is None else 4 * max_rows  # read a few times more, then sample
    for _, batch in iter_batches(root, split, [ID_COLUMN, *columns], **remote):
        keep = np.ones(batch.num_rows, dtype=bool)
        arrays = {ID_COLUMN: batch.column(ID_COLUMN).to_numpy().astype(np.int64)}
        for c in columns:
            if c in manifest.modality_names:
                values, valid = tensor_to_numpy(batch.column(c), manifest.modality(c).shape)
                keep &= valid & np.isfinite(values.reshape(len(values), -1)).all(axis=1)
                arrays[c] = values
            else:
                arrays[c] = batch.column(c).to_numpy(zero_copy_only=False)
        for c, values in arrays.items():
            parts[c].append(values[keep])
        rows += int(keep.sum())
        if limit is not None and rows >= limit:
            break
    out = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in parts.items()}
    n = len(out[ID_COLUMN])
    if max_rows is not None and n > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
        out = {c: v[pick] for c, v in out.items()}
    return out


def model_input_columns(manifest: Manifest) -> list[str]:
    """The stored columns a model's input is prepared from: every modality and its
    `<m>__len` / `<m>__present` companions."""
    columns = []
    for modality in manifest.modalities:
        columns.append(modality.name)
        if modality.variable_length:
            columns.append(length_column(modality.name))
        if modality.nullable:
            columns.append(present_column(modality.name))
    return columns


class Scorer:
    """Scores a model's weights on the validation split: probe and/or reward R. Stored rows
    go through the run's data Preparer (standardisation, masks, presence), as in training."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, root: str, score_spec: ScoreSpec):
        from mmcl.data.prepare import Preparer

        self.cfg, self.manifest, self.root = cfg, manifest, root
        self.score_spec = score_spec
        self.prepare = Preparer.for_run(manifest, cfg.data)
        self._val: dict | None = None
        self._train: dict | None = None
        self._objective = None   # built once, then loaded with each report's weights
        self._augmenter = None

    def _remote(self) -> dict:
        return launcher.remote(self.cfg)

    def val(self) -> dict:
        if self._val is None:
            cols = model_input_columns(self.manifest) + \
                ([self.score_spec.probe_label] if self.score_spec.probe_label else [])
            self._val = read_rows(self.root, self.cfg.data.val_split, cols, self.manifest,
                                  remote=self._remote())
        return self._val

    def train_sample(self) -> dict:
        if self._train is None:
            cols = model_input_columns(self.manifest) + [self.score_spec.probe_label]
            self._train = read_rows(self.root, self.cfg.data.train_split, cols, self.manifest,
                                    max_rows=self.score_spec.probe_rows, seed=self.score_spec.seed,
                                    remote=self._remote())
        return self._train

    def objective(self, weights: dict | None = None):
        """The run's objective with `weights`, or with the initial weights a run starts from
        (the Engine seeds torch with train.seed before building it)."""
        import torch

        from mmcl.objectives import build_objective

        if weights is None:
            torch.manual_seed(self.cfg.train.seed)
            return build_objective(self.cfg, self.manifest).eval()
        if self._objective is None:
            self._objective = build_objective(self.cfg, self.manifest)
        self._objective.load_state_dict(weights)
        return self._objective.eval()

    def _tensors(self, arrays: dict, rows: slice) -> dict:
        """Rows of the stored columns as the model receives them (the Preparer's output)."""
        import torch

        return self.prepare({c: torch.as_tensor(np.ascontiguousarray(arrays[c][rows]))
                             for c in model_input_columns(self.manifest)})

    def reward(self, objective) -> dict[str, float]:
        """R = sum_k A^k on the validation tuples, averaged over full batches of
        `eval_batch` candidates (one smaller batch when the split is smaller). The two views
        of each batch are drawn with the search's base augmentation from a generator seeded by
        the search seed and the batch, so every trial is scored on the same views."""
        import torch

        from mmcl.config import AugmentConfig
        from mmcl.data.augment import Augmenter
        from mmcl.objectives.base import FusedObjective
        from mmcl.objectives.tuple_infonce import disturbed_retrieval_reward

        val = self.val()
        n = len(val[ID_COLUMN])
        size = min(self.score_spec.eval_batch, n)
        if size < 2:
            return {"val_R": float("nan")}
        reward = getattr(objective, "reward", None)
        if reward is None:
            if not isinstance(objective, FusedObjective):
                return {"val_R": float("nan")}
            reward = functools.partial(disturbed_retrieval_reward, objective)
        if self._augmenter is None:
            augment = (AugmentConfig.model_validate(self.score_spec.reward_augment)
                       if self.score_spec.reward_augment is not None else self.cfg.augment)
            self._augmenter = Augmenter(self.manifest.modalities, augment)
        augmenter = self._augmenter
        totals: dict[str, float] = {}
        batches = 0
        for start in range(0, n - size + 1, size):
            batch = self._tensors(val, slice(start, start + size))
            generator = torch.Generator().manual_seed(self.score_spec.seed * 100_003 + batches)
            view1, view2 = augmenter(batch, generator), augmenter(batch, generator)
            for k, v in reward(view1, view2).items():
                totals[k] = totals.get(k, 0.0) + v
            batches += 1
        return {f"val_{k}": v / batches for k, v in totals.items()}

    def embed(self, objective, arrays: dict, batch: int = 1024) -> np.ndarray:
        import torch

        n = len(arrays[ID_COLUMN])
        with torch.no_grad():
            parts = [objective.embed(self._tensors(arrays, slice(s, s + batch))).cpu().numpy()
                     for s in range(0, n, batch)]
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)

    def probe(self, objective) -> dict[str, float]:
        from mmcl.evaluate.probe import score, select_l2

        label = self.manifest.label(self.score_spec.probe_label)
        train, val = self.train_sample(), self.val()
        x_tr, x_va = self.embed(objective, train), self.embed(objective, val)
        y_tr, y_va = train[label.name], val[label.name]
        if label.task == "classification":
            probe = select_l2(x_tr, y_tr, x_va, y_va, "classification", label.num_classes,
                              max_iter=50)
            return {"val_probe": score(probe, x_va, y_va)["balanced_accuracy"]}
        probe = select_l2(x_tr, y_tr, x_va, y_va, "regression")
        return {"val_probe": score(probe, x_va, y_va)["r2"]}

    def score(self, objective) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.score_spec.reward:
            out.update(self.reward(objective))
        if self.score_spec.probe_label:
            out.update(self.probe(objective))
        out["score"] = out.get(self.score_spec.score_key, float("nan"))
        return out


def _score_callback_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReportCallback(TuneReportCallback):
        """TuneReportCallback that first scores the reported checkpoint (see module doc)."""

        def __init__(self, cfg_json: dict, manifest_json: str, root: str,
                     score_spec: ScoreSpec):
            super().__init__()
            self._args = (cfg_json, manifest_json, root, score_spec)
            self._scorer: Scorer | None = None

        def _get_scorer(self) -> Scorer:
            if self._scorer is None:
                cfg_json, manifest_json, root, score_spec = self._args
                self._scorer = Scorer(RunConfig.model_validate(cfg_json),
                                      Manifest.from_json(manifest_json), root, score_spec)
            return self._scorer

        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                from mmcl.train.checkpoint import read_checkpoint_state

                start = time.perf_counter()
                try:
                    with checkpoint.as_directory() as directory:
                        state = read_checkpoint_state(directory)
                    scores = self._get_scorer().score(
                        self._get_scorer().objective(state["objective"]))
                except Exception as err:  # noqa: BLE001 - a failed score must not kill the run
                    print(f"[mmcl] scoring the checkpoint failed: {type(err).__name__}: {err}",
                          flush=True)
                    scores = {"score": float("nan")}
                scores["score_seconds"] = time.perf_counter() - start
                metrics = [{**metrics[0], **scores}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return ScoreReportCallback


# ------------------------------------------------------------------ placement groups


def tune_worker_loop(loop_config: dict, extra: dict) -> list[dict]:
    """mmcl's worker loop, with `extra` keys added to its config (start_checkpoint,
    stop_epoch); rank 0 first records its placement group for the janitor."""
    import ray
    import ray.train

    from mmcl.train.worker import train_loop_per_worker

    records = extra.get("pg_records")
    if records and ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            fs, path = filesystem(records, *extra.get("remote", (None, None)))
            fs.makedirs(path, exist_ok=True)
            with fs.open(join(path, f"{extra['trial_id']}.{pg.id.hex()}"), "w") as f:
                f.write("")
    keys = ("start_checkpoint", "stop_epoch")
    return train_loop_per_worker({**loop_config, **{k: extra[k] for k in keys if k in extra}})


def _janitor_class():
    from ray import tune

    class PlacementGroupJanitor(tune.Callback):
        """Removes the Train workers' placement groups of trials that ended (see module
        doc). Runs in the search driver, every few seconds and at the end."""

        def __init__(self, records: str, remote: tuple = (None, None), every_s: float = 3.0):
            self.records, self.remote, self.every_s = records, remote, every_s
            self.ended: set[str] = set()
            self._last = 0.0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)

        def on_step_begin(self, iteration, trials, **info):
            if self.ended and time.monotonic() - self._last > self.every_s:
                self._last = time.monotonic()
                self.sweep()

        def on_experiment_end(self, trials, **info):
            self.ended.update(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))
            self.sweep()

        def sweep(self) -> None:
            import ray
            from ray.util.placement_group import PlacementGroup

            fs, path = filesystem(self.records, *self.remote)
            try:
                names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
            except FileNotFoundError:
                return
            for name in names:
                trial_id, _, pg_hex = name.partition(".")
                if trial_id not in self.ended:
                    continue
                try:
                    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
                    if ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
                        ray.util.remove_placement_group(pg)
                except Exception as err:  # noqa: BLE001 - already gone or never made
                    print(f"[mmcl] placement group {pg_hex}: {err}", flush=True)
                fs.rm(join(path, name))

    return PlacementGroupJanitor


def make_janitor(records: str, cfg: RunConfig):
    return _janitor_class()(records, (cfg.storage.endpoint_url, cfg.storage.region))


# ------------------------------------------------------------------------ the trial


def trial_run_config(cfg: RunConfig, root: str, storage_path: str, name: str) -> RunConfig:
    """A trial's own run config: its data set resolved, its run folder inside the search's
    folder, and a checkpoint every epoch and no mid-epoch ones (each report is scored from
    its checkpoint)."""
    raw = cfg.model_dump(mode="json")
    raw["data"]["path"] = root
    raw["storage"].update(path=storage_path, name=name)
    raw["train"]["checkpoint_every"] = 1
    raw["train"]["checkpoint_every_steps"] = None  # Tune scores every report: epochs only
    return config_mod.from_dict(raw, source="trial config")


def run_train_trial(cfg: RunConfig, *, storage_path: str, name: str, score_spec: ScoreSpec,
                    pg_records: str, start_checkpoint=None, stop_epoch: int | None = None
                    ) -> dict:
    """Inside a Tune trial: prepare the data, run one Ray Train run named `name` in
    `storage_path` (rerunning a name resumes it), forward its scored metrics to Tune, and
    leave a standard run folder (model/, config.yaml, metrics.jsonl). Returns the final
    engine state."""
    import ray.data
    import ray.train
    from ray import tune

    from mmcl.train.checkpoint import read_checkpoint_state
    from mmcl.train.failures import no_retry_when_disk_full

    root, manifest = launcher.prepare_data(cfg)
    run_cfg = trial_run_config(cfg, root, storage_path, name)
    steps = launcher.train_steps(run_cfg, manifest, run_cfg.scaling.num_workers, root)
    finished = report_finished_trial(run_cfg, manifest, root, storage_path, name, steps,
                                     score_spec, stop_epoch)
    if finished is not None:
        return finished
    context = ray.data.DataContext.get_current()  # the dataset carries it to Ray Data
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    extra = {"pg_records": pg_records, "trial_id": tune.get_context().get_trial_id(),
             "remote": (cfg.storage.endpoint_url, cfg.storage.region)}
    if start_checkpoint is not None:
        extra["start_checkpoint"] = start_checkpoint
    if stop_epoch is not None:
        extra["stop_epoch"] = int(stop_epoch)
    trainer = launcher.make_trainer(run_cfg, root, manifest, steps, name,
                                    loop=functools.partial(tune_worker_loop, extra=extra))
    trainer.run_config.callbacks.append(_score_callback_class()(
        run_cfg.model_dump(mode="json"), manifest.to_json(), root, score_spec))
    try:
        with no_retry_when_disk_full():  # a full disk fails every retry alike
            result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise launcher.user_error(err) from err
    with result.checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
    launcher.finish_run(run_cfg, manifest, join(storage_path, name), state)
    return state


def report_finished_trial(run_cfg: RunConfig, manifest: Manifest, root: str,
                          storage_path: str, name: str, steps: int, score_spec: ScoreSpec,
                          stop_epoch: int | None = None) -> dict | None:
    """A trial whose Train run already holds the complete checkpoint of its last epoch: its
    driver was killed after the last epoch line, before Tune recorded the result. Training
    it again would report nothing, and Tune would fail the resumed trial ("did not include
    the specified metric(s) 'score'"). Instead its last epoch is scored from that checkpoint
    and reported to Tune as the first time, and its run folder is finished. Returns the final
    state, or None when epochs are left to train (the usual resume)."""
    from ray import tune

    from mmcl.train.checkpoint import newest_complete_checkpoint
    from mmcl.train.worker import stop_epoch_of

    url = launcher.checkpoint_url(run_cfg, f"{launcher.storage_root(run_cfg)}/{name}")
    found = newest_complete_checkpoint(url, run_cfg.storage.endpoint_url, run_cfg.storage.region)
    stop = stop_epoch_of(run_cfg, {"steps_per_epoch": steps, "stop_epoch": stop_epoch})
    if found is None or found.epoch < stop:
        return None
    state = found.state
    history = list(state.get("history") or [])
    last = dict(history[-1]) if history else {"epoch": found.epoch}
    scorer = Scorer(run_cfg, manifest, root, score_spec)
    scored = time.perf_counter()
    scores = scorer.score(scorer.objective(state["objective"]))
    scores["score_seconds"] = time.perf_counter() - scored
    tune.report({**last, **scores})
    launcher.finish_run(run_cfg, manifest, join(storage_path, name), state)
    return state


def in_process_resources(cfg: RunConfig) -> dict:
    """A trial that trains itself (`run_in_process_trial`) holds its worker's CPUs."""
    return {"CPU": cfg.scaling.cpus_per_worker, "memory": TRIAL_DRIVER_RESOURCES["memory"]}


def write_run_checkpoint(url: str, state: dict, cfg: RunConfig, manifest: Manifest) -> str:
    """A checkpoint folder at `url`, written in place on local storage (uploaded from a
    temporary folder to S3). Returns its path as Ray Train reports one (bucket/prefix/...
    on S3), so that `ray.train.Checkpoint(path, filesystem=...)` opens it."""
    import shutil
    import tempfile

    from mmcl.storage import is_remote
    from mmcl.train.checkpoint import write_checkpoint

    fs, path = filesystem(url, cfg.storage.endpoint_url, cfg.storage.region)
    if not is_remote(url):
        shutil.rmtree(path, ignore_errors=True)  # a rerun of a cut-off trial
        write_checkpoint(path, state, cfg, manifest)
        return path
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, state, cfg, manifest)
        fs.put(directory + "/", path, recursive=True)
    return path


def run_in_process_trial(cfg: RunConfig, *, storage_path: str, name: str,
                         score_spec: ScoreSpec, start_checkpoint=None,
                         stop_epoch: int | None = None) -> dict:
    """Inside a Tune trial, for a one-worker run: the Engine trains in the trial's own
    process on the training split read into memory (a sample-optimization candidate's data;
    a one-worker Ray Train run adds a controller, a worker process and a Ray Data pipeline
    that cost far more than its epoch here: docs/fidelity.md, "Share of a round spent
    outside training"). Same schedule, seeding per batch and checkpoint contents as
    `run_train_trial`; each epoch is scored from the weights in memory and reported to Tune
    with the path of its checkpoint (written once, in the run folder, with config.yaml and
    metrics.jsonl beside it; no model/ export). A cut-off trial starts again from
    `start_checkpoint`. Returns the final engine state."""
    import torch
    from ray import tune

    from mmcl.train.checkpoint import read_checkpoint_state
    from mmcl.train.engine import Engine
    from mmcl.train.local import memory_batches
    from mmcl.train.worker import seeded, stop_epoch_of

    root, manifest = launcher.prepare_data(cfg)
    run_cfg = trial_run_config(cfg, root, storage_path, name)
    steps = launcher.train_steps(run_cfg, manifest, 1, root)
    columns = model_input_columns(manifest) + [
        lab.name for lab in manifest.labels if lab.role == "label"]
    rows = read_rows(root, run_cfg.data.train_split, columns, manifest,
                     remote=launcher.remote(run_cfg))
    torch.set_num_threads(max(1, run_cfg.scaling.cpus_per_worker))
    engine = Engine(run_cfg, manifest, steps, "cpu")
    if start_checkpoint is not None:
        with start_checkpoint.as_directory() as directory:
            engine.load_state_dict(read_checkpoint_state(directory))
    resumed_from_step = engine.step
    stop = stop_epoch_of(run_cfg, {"steps_per_epoch": steps, "stop_epoch": stop_epoch})
    scorer = Scorer(run_cfg, manifest, root, score_spec)
    run_url = join(storage_path, name)
    if start_checkpoint is not None and engine.epoch >= stop:
        # Killed after its last epoch's report, before Tune recorded it: nothing is left to
        # train, so that epoch is scored from the restored weights and reported again (an
        # empty run would report nothing, and Tune fails a trial without 'score').
        last = dict(engine.history[-1]) if engine.history else {"epoch": engine.epoch}
        scored = time.perf_counter()
        scores = scorer.score(engine.objective.eval())
        scores["score_seconds"] = time.perf_counter() - scored
        tune.report({**last, **scores, "checkpoint_path": start_checkpoint.path})
    for epoch in range(engine.epoch, stop):
        batches = enumerate(memory_batches(rows, run_cfg.train.batch_size,
                                           run_cfg.train.seed, epoch))
        summary = engine.train_epoch(seeded(engine, run_cfg, batches, epoch, 0))
        summary["resumed_from_step"] = resumed_from_step
        checkpoint = write_run_checkpoint(join(run_url, f"checkpoint_epoch{engine.epoch:04d}"),
                                          engine.state_dict(), run_cfg, manifest)
        scored = time.perf_counter()
        scores = scorer.score(engine.objective.eval())
        scores["score_seconds"] = time.perf_counter() - scored
        tune.report({**summary, **scores, "checkpoint_path": checkpoint})
        if engine.finished:
            break
    launcher.write_run_record(run_cfg, run_url, engine.history)
    return engine.state_dict()


def finish_from_checkpoint(checkpoint_path: str, run_url: str, base: RunConfig) -> bool:
    """Write a trial's standard run folder (model/, config.yaml, metrics.jsonl) from its last
    checkpoint, when the trial itself could not (a scheduler stops a trial as soon as its
    last result arrives). False when there is nothing to do."""
    import ray.train

    from mmcl.train.checkpoint import CONFIG, MANIFEST, read_checkpoint_state

    fs, path = filesystem(join(run_url, "model", "weights.pt"), base.storage.endpoint_url,
                          base.storage.region)
    if not checkpoint_path or fs.exists(path):
        return False
    checkpoint = ray.train.Checkpoint(checkpoint_path,
                                      filesystem=launcher.storage_filesystem(base))
    with checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
        cfg = config_mod.load(os.path.join(directory, CONFIG))
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = Manifest.from_json(f.read())
    launcher.finish_run(cfg, manifest, run_url, state)
    return True


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)



def restore_or_new_tuner(experiment: str, trainable, param_space: dict, storage_fs,
                         new_tuner, on_resume=None, folder=None):
    """The Tuner of `experiment`: restored with its unfinished trials when an interrupted
    one is there (crashed trials stay recorded as crashed), else `new_tuner()`. `folder`
    (a trust.Folder of the experiment) is verified first: nothing is unpickled from a folder
    whose signatures do not verify (see mmcl.tune.trust)."""
    from ray import tune

    if folder is not None:
        from mmcl.tune import trust

        trust.verify(folder)
    if not tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        return new_tuner()
    if on_resume:
        on_resume()
    return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False,
                              param_space=param_space, storage_filesystem=storage_fs)


__all__ = ["TuneError", "ScoreSpec", "restore_or_new_tuner", "Scorer", "ensure_ray",
           "resolve_metric", "run_train_trial", "make_janitor", "trial_resources", "read_rows",
           "DataError"]
