"""`mmcl tune --strategy sweep`: a Ray Tune search over a YAML search space.

    tune file (run config + distributions + `sweep:`) -> validate every edge of the space
    -> prepare the data once -> start/join Ray, check the CPU budget (trials x (workers + 1))
    -> Tuner(trial driver): each trial launches one Ray Train run (mmcl.tune.trial), scored
       every epoch on the validation split; a searcher proposes configs (random/grid built
       in, Optuna's TPE optional), ASHA stops poor trials early
    -> the search folder: best_config.yaml (a ready run config), trials.csv / trials.md,
       summary.json, and every trial's run folder under runs/

`sweep:` settings (all optional):
    num_samples          trials to sample (random/tpe: default 8; grid: each grid point once)
    searcher             random | grid | tpe (Optuna's TPE) | any name of Ray Tune's
                         create_searcher: optuna, hyperopt, bohb, bayesopt, nevergrad, hebo,
                         zoopt, ax (each needs its package installed)
    searcher_options     keyword arguments for the searcher (metric, mode and the seed are set)
    scheduler            asha | none | any name of Ray Tune's create_scheduler: fifo,
                         async_hyperband, hyperband, median_stopping_rule, hb_bohb, pbt, pb2,
                         ... (time_attr is the epoch; metric and mode come from the search)
    scheduler_options    keyword arguments for the scheduler (e.g. pbt's hyperparam_mutations)
    metric               auto | probe | reward        (auto: probe if the data has a label)
    label                the probe's label column     (default: the first task label)
    max_concurrent_trials   default: as many as the cluster's CPUs allow
    grace_period, reduction_factor    ASHA's (in epochs)
    max_failures         Tune retries of a crashed trial (its Train run resumes); default 0
    eval_batch           candidates per retrieval batch of the reward R
    probe_rows           training rows the validation probe is fitted on
    seed                 the searcher's seed (default: train.seed)

The search folder is storage.path/storage.name (default name: the tune file's name).
Running the same command again resumes an interrupted sweep with `Tuner.restore`: unfinished
trials go on (each trial's Train run resumes from its own checkpoint), crashed trials stay
recorded as crashed, and a finished sweep only rewrites its outputs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmcl import config as config_mod
from mmcl.config import ConfigError
from mmcl.markdown import table
from mmcl.storage import join
from mmcl.train import launcher
from mmcl.tune import space as space_mod
from mmcl.tune import trust
from mmcl.tune.common import (search_name, section_config, short_error, trial_statuses,
                              write_output)
from mmcl.tune.space import TuneFile
from mmcl.tune.trial import (PG_RECORDS, ScoreSpec, TuneError, absolute_paths, ensure_ray,
                             finish_from_checkpoint, finite, make_janitor, resolve_metric,
                             restore_or_new_tuner, run_train_trial, trial_resources)



class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_samples: int | None = Field(None, ge=1)
    searcher: str = "random"
    searcher_options: dict = Field(default_factory=dict)
    scheduler: str = "asha"
    scheduler_options: dict = Field(default_factory=dict)
    metric: Literal["auto", "probe", "reward"] = "auto"
    label: str | None = None
    max_concurrent_trials: int | None = Field(None, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_failures: int = Field(0, ge=0)
    eval_batch: int = Field(256, ge=2)
    probe_rows: int = Field(2048, ge=16)
    seed: int | None = None


# ----------------------------------------------------------------------------- search


# mmcl's own names on top of Ray Tune's factories.
SEARCHER_ALIASES = {"tpe": "optuna", "grid": "random"}
SCHEDULER_ALIASES = {"asha": "async_hyperband", "none": None}
# What Tune's factories raise for a searcher or scheduler that cannot be built: a missing
# package (ImportError, or the searcher's own assert), a bad or missing option (TypeError,
# ValueError, TuneError). Built from the user's name and options only, so any of them is
# the user's to fix.
BUILD_ERRORS = (Exception,)


def _factory_error(kind: str, name: str, known, err: Exception | None = None) -> ConfigError:
    if err is None:
        return ConfigError(f"sweep.{kind}={name!r} is not a Ray Tune {kind}; choose one of: "
                           f"{', '.join(known)}")
    reason = " ".join(str(err).split()) or type(err).__name__
    return ConfigError(f"sweep.{kind}={name} cannot be built: {reason} (install the "
                       f"{kind}'s package, e.g. pip install optuna / hyperopt, or fix "
                       f"sweep.{kind}_options)")


def _check_options(kind: str, name: str, cls, options: dict) -> None:
    """Tune's factories drop the keyword arguments a class does not take; a user's option
    that would be dropped is a typo, said before Ray starts."""
    import inspect

    try:
        accepted = set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"sweep.{kind}_options: {name} takes no {unknown}; it takes "
                          f"{sorted(accepted - {'self', 'args', 'kwargs'})}")


def searcher_names() -> list[str]:
    from ray.tune.search import SEARCH_ALG_IMPORT

    return sorted({*SEARCH_ALG_IMPORT, *SEARCHER_ALIASES})


def scheduler_names() -> list[str]:
    from ray.tune.schedulers import SCHEDULER_IMPORT

    return sorted({*SCHEDULER_IMPORT, *SCHEDULER_ALIASES})


def build_searcher(settings: SweepConfig, seed: int, concurrent: int):
    """Any searcher Ray Tune ships, by its create_searcher name (or mmcl's alias). Tune's
    variant generator (random, grid) takes the concurrency limit itself."""
    from ray.tune.search import SEARCH_ALG_IMPORT, create_searcher

    name = settings.searcher.lower()
    tune_name = SEARCHER_ALIASES.get(name, name)
    if tune_name not in SEARCH_ALG_IMPORT:
        raise _factory_error("searcher", settings.searcher, searcher_names())
    # create_searcher passes on only the arguments a searcher accepts.
    options = {"metric": "score", "mode": "max", "seed": seed, "random_state": seed,
               "max_concurrent": concurrent, **settings.searcher_options}
    try:
        _check_options("searcher", settings.searcher, SEARCH_ALG_IMPORT[tune_name](),
                       settings.searcher_options)
        return create_searcher(tune_name, **options)
    except BUILD_ERRORS as err:
        raise _factory_error("searcher", settings.searcher, searcher_names(), err) from None


def build_scheduler(settings: SweepConfig, max_t: int):
    """Any trial scheduler Ray Tune ships, by its create_scheduler name (or mmcl's alias),
    on the trials' epoch count; None for `none`."""
    import inspect

    from ray.tune.schedulers import SCHEDULER_IMPORT, create_scheduler

    name = settings.scheduler.lower()
    tune_name = SCHEDULER_ALIASES.get(name, name)
    if tune_name is None:
        return None
    if tune_name not in SCHEDULER_IMPORT:
        raise _factory_error("scheduler", settings.scheduler, scheduler_names())
    options = {"time_attr": "epoch", "max_t": int(max_t),
               "grace_period": min(settings.grace_period, int(max_t)),
               "reduction_factor": settings.reduction_factor, **settings.scheduler_options}
    try:
        cls = SCHEDULER_IMPORT[tune_name]
        _check_options("scheduler", settings.scheduler,
                       cls() if inspect.isfunction(cls) else cls, settings.scheduler_options)
        return create_scheduler(tune_name, **options)
    except BUILD_ERRORS as err:
        raise _factory_error("scheduler", settings.scheduler, scheduler_names(), err) from None


def limits_its_own_concurrency(search_alg) -> bool:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return isinstance(search_alg, BasicVariantGenerator)


def build_search(tune_file: TuneFile, settings: SweepConfig, seed: int, concurrent: int):
    """(param_space, search_alg, num_samples) for the Tuner. The built-in generator takes the
    concurrency limit itself (Tune ignores max_concurrent_trials for a generator instance)."""
    name = settings.searcher.lower()
    grid = name == "grid"
    if grid:
        bad = [path for path, dist in tune_file.space.items()
               if dist.kind not in ("grid", "choice")]
        if bad:
            raise ConfigError(f"sweep.searcher=grid needs every searched field to list its "
                              f"values (grid or choice); {bad} are continuous. Use "
                              f"searcher: random or tpe, or give them values")
    param_space = {path: dist.to_tune(grid_choices=grid)
                   for path, dist in tune_file.space.items()}
    only_grids = all(dist.is_grid for dist in tune_file.space.values())  # nothing random
    num_samples = settings.num_samples or (1 if grid or only_grids else 8)
    search_alg = build_searcher(settings, seed, concurrent)
    if not limits_its_own_concurrency(search_alg):  # a model-based searcher proposes points
        grids = [path for path, dist in tune_file.space.items() if dist.is_grid]
        if grids:
            raise ConfigError(f"sweep.searcher={settings.searcher} cannot search grids "
                              f"({grids}); use choice")
        if not tune_file.space:
            raise ConfigError(f"sweep.searcher={settings.searcher} needs at least one "
                              f"searched field")
    return param_space, search_alg, num_samples


def mmcl_trial(params: dict, trial_spec: dict) -> None:
    """One sweep trial (runs in a Tune trial actor): the sampled run config, trained by one
    Ray Train run whose scored metrics reach Tune."""
    from ray import tune

    cfg = config_mod.from_dict(space_mod.with_values(trial_spec["base"], params),
                               source=f"sampled config {params}")
    run_train_trial(cfg, storage_path=trial_spec["runs"], score_spec=trial_spec["score"],
                    name=f"trial-{tune.get_context().get_trial_id()}",
                    pg_records=trial_spec["records"])


# ----------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    name: str
    url: str
    metric: str
    rows: list[dict]
    params: list[str]
    best: dict | None
    best_config_url: str | None
    elapsed_s: float = 0.0
    files: dict = field(default_factory=dict)
    interrupted: bool = False

    def table(self) -> str:
        return trials_markdown(self.rows, self.params)

    def summary(self) -> str:
        counts = {s: sum(r["status"] == s for r in self.rows)
                  for s in ("done", "early-stopped", "error", "unfinished")}
        state = (f"interrupted after {self.elapsed_s:.0f}s (run the same command again to "
                 f"resume)" if self.interrupted else f"finished in {self.elapsed_s:.0f}s")
        lines = [self.table(), "",
                 f"sweep '{self.name}' {state}: {len(self.rows)} trials ({counts['done']} "
                 f"done, {counts['early-stopped']} early-stopped, {counts['error']} crashed"
                 + (f", {counts['unfinished']} unfinished" if counts["unfinished"] else "")
                 + f"); objective: {self.metric} (score, higher is better)"]
        if self.best:
            lines.append(f"  best:        {self.best['trial']}  score {self.best['score']:.4f}"
                         f"  {self.best['params']}")
            lines.append(f"  best config: {self.best_config_url}   (mmcl pretrain -c ...)")
        for what, url in self.files.items():
            lines.append(f"  {what + ':':<12} {url}")
        return "\n".join(lines)


def _trial_id(path: str | None) -> str:
    """A trial's id from its folder name (`<trainable>_<id>_<index>_<params>_<date>`), for a
    trial that crashed before it reported anything."""
    name = Path(path or "").name
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", name)
    return match.group(1) if match else name


def trial_rows(results, tune_file: TuneFile,
               statuses: dict[str, tuple[str, dict]] | None = None) -> list[dict]:
    """One row per trial: status done | early-stopped | error | unfinished (an interrupted
    sweep), epochs run, scores, the sampled values and, for a crash, its error."""
    rows = []
    statuses = statuses or {}
    for result in results:
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or _trial_id(result.path)
        status, config = statuses.get(trial, ("TERMINATED", {}))
        params = {path: (result.config or config).get(path) for path in tune_file.space}
        try:
            epochs = tune_file.config_with(params).train.epochs
        except ConfigError:
            epochs = None
        ran = int(metrics.get("epoch") or 0)
        if result.error is not None or status == "ERROR":
            status = "error"
        elif status != "TERMINATED":
            status = "unfinished"
        elif epochs is not None and ran < epochs:
            status = "early-stopped"
        else:
            status = "done"
        rows.append({
            "trial": str(trial), "status": status, "epochs": ran, "max_epochs": epochs,
            "score": metrics.get("score", float("nan")),
            "val_probe": metrics.get("val_probe", float("nan")),
            "val_R": metrics.get("val_R", float("nan")),
            "loss": metrics.get("loss", float("nan")),
            "params": params,
            "checkpoint": metrics.get("checkpoint_path"),
            "error": (short_error(result.error) if result.error is not None else
                      "crashed" if status == "error" else ""),
        })
    rows.sort(key=lambda r: r["trial"])
    return rows


def best_row(rows: list[dict]) -> dict | None:
    """The best finished trial by score; early-stopped ones only if none finished."""
    for statuses in (("done",), ("early-stopped",)):
        scored = [r for r in rows if r["status"] in statuses and finite(r["score"])]
        if scored:
            return max(scored, key=lambda r: r["score"])
    return None


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def trials_markdown(rows: list[dict], params: list[str]) -> str:
    header = ["trial", "status", "epochs", "score", "val_probe", "val_R", "loss", *params,
              "error"]
    cells = [[r["trial"], r["status"], f"{r['epochs']}/{r['max_epochs']}", r["score"],
              r["val_probe"], r["val_R"], r["loss"], *[r["params"][p] for p in params],
              r["error"].replace("|", "/")] for r in rows]
    return table(header, [[_cell(c) for c in row] for row in cells])


def trials_csv(rows: list[dict], params: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "status", "epochs", "max_epochs", "score", "val_probe", "val_R",
                     "loss", *params, "checkpoint", "error"])
    for r in rows:
        writer.writerow([r["trial"], r["status"], r["epochs"], r["max_epochs"], r["score"],
                         r["val_probe"], r["val_R"], r["loss"],
                         *[json.dumps(r["params"][p]) for p in params], r["checkpoint"] or "",
                         r["error"]])
    return out.getvalue()


def best_config_text(tune_file: TuneFile, params: dict, name: str, header: str) -> str:
    """The best trial's config as a ready run config: the tune file's run config with the
    sampled values filled in (data, storage and scaling as the user wrote them)."""
    raw = tune_file.raw_with(params)
    raw.setdefault("storage", {})["name"] = name
    cfg = config_mod.from_dict(raw, source="best config")
    return header + config_mod.dump(cfg)


# -------------------------------------------------------------------------------- main


def run_sweep(tune_file: TuneFile, address: str | None = None,
              progress: Callable[[str], None] = print) -> SweepResult:
    from ray import tune

    start = time.perf_counter()
    settings = section_config(SweepConfig, tune_file.sections.get("sweep", {}), "sweep",
                              tune_file.source, tune_file.overrides)
    space_mod.validate(tune_file)
    user_tune_file, tune_file = tune_file, absolute_paths(tune_file)
    base = tune_file.base_config()
    name = search_name(tune_file, base)
    url = join(base.storage.path, name)
    root, manifest = launcher.prepare_data(base)
    resolved = resolve_metric(settings.metric, settings.label, base, manifest,
                              manifest.splits.get(base.data.val_split, 0))
    score = ScoreSpec(metric=resolved.metric, probe_label=resolved.probe_label,
                      reward=resolved.reward, eval_batch=settings.eval_batch,
                      probe_rows=settings.probe_rows, seed=base.train.seed,
                      reward_augment=resolved.reward_augment)
    seed = base.train.seed if settings.seed is None else settings.seed
    searched_epochs = (tune_file.space["train.epochs"].edge_values()
                       if "train.epochs" in tune_file.space else [])
    max_t = max([base.train.epochs, *searched_epochs])
    # A wrong searcher or scheduler (unknown name, missing package) fails before Ray starts.
    build_search(tune_file, settings, seed, 1)
    build_scheduler(settings, max_t)
    concurrent = ensure_ray(base, address, settings.max_concurrent_trials)
    param_space, search_alg, num_samples = build_search(tune_file, settings, seed, concurrent)

    trial_spec = {"base": tune_file.base, "runs": join(url, "runs"),
                  "records": join(url, PG_RECORDS), "score": score}
    trainable = tune.with_resources(tune.with_parameters(mmcl_trial, trial_spec=trial_spec),
                                    trial_resources())
    storage_path = launcher.storage_root(base)
    storage_fs = launcher.storage_filesystem(base)
    experiment = f"{storage_path.rstrip('/')}/{name}"
    scheduler = build_scheduler(settings, max_t)
    progress(f"[mmcl] sweep '{name}': {len(tune_file.space)} searched fields, {num_samples} "
             f"sample(s) with {settings.searcher} search, scheduler {settings.scheduler}, "
             f"objective {score.metric} on '{base.data.val_split}'; up to {concurrent} trials "
             f"at once ({launcher.cpus_needed(base)} CPUs each). Folder: {url}")
    janitor = make_janitor(trial_spec["records"], base)
    folder = trust.Folder(url, base.storage.endpoint_url, base.storage.region, what="sweep")
    tuner = restore_or_new_tuner(
        experiment, trainable, param_space, storage_fs,
        lambda: tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        # the built-in generator limits itself
                                        max_concurrent_trials=(
                                            None if limits_its_own_concurrency(search_alg)
                                            else concurrent),
                                        reuse_actors=False),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                callbacks=[janitor, trust.signature_keeper(folder)])),
        on_resume=lambda: progress(f"[mmcl] resuming the interrupted sweep in {url} "
                                   "(Tuner.restore)"),
        folder=folder)
    results = tuner.fit()  # Tune catches Ctrl-C: it saves the experiment and returns
    trust.sign(folder)  # what this driver's Tune wrote, before anything reads it back
    statuses = trial_statuses(experiment, storage_fs)
    rows = trial_rows(results, tune_file, statuses)
    expected = num_samples * math.prod(
        len(dist.values) for dist in tune_file.space.values()
        if dist.is_grid or (settings.searcher == "grid" and dist.kind == "choice"))
    interrupted = any(r["status"] == "unfinished" for r in rows) or len(rows) < expected
    for row in rows:  # ASHA ends a trial at its last report, before it writes its folder
        finish_from_checkpoint(row["checkpoint"],
                               join(trial_spec["runs"], f"trial-{row['trial']}"), base)
    params = list(tune_file.space)
    best = best_row(rows)
    files = {"trials": write_output(join(url, "trials.md"),
                                    trials_markdown(rows, params) + "\n", base),
             "csv": write_output(join(url, "trials.csv"), trials_csv(rows, params), base)}
    best_url = None
    if best is not None and not interrupted:
        header = (f"# Best trial {best['trial']} of sweep '{name}' (score {best['score']:.4f}, "
                  f"{score.metric} on '{base.data.val_split}'); searched: "
                  f"{json.dumps(best['params'])}\n")
        best_url = write_output(
            join(url, "best_config.yaml"),
            best_config_text(user_tune_file, best["params"], f"{name}-best", header), base)
    summary = {"name": name, "metric": score.metric, "label": score.probe_label,
               "searcher": settings.searcher, "scheduler": settings.scheduler,
               "space": {path: dist.describe() for path, dist in tune_file.space.items()},
               "interrupted": interrupted, "best": best, "trials": rows}
    files["summary"] = write_output(join(url, "summary.json"),
                                    json.dumps(summary, indent=2, default=str), base)
    trust.sign(folder)
    result = SweepResult(name, url, score.metric, rows, params, best, best_url,
                         time.perf_counter() - start, files, interrupted)
    if best is None and not interrupted:
        raise TuneError(f"no trial of sweep '{name}' produced a score; see {files['trials']}"
                        + (f" (first error: {rows[0]['error']})" if rows and rows[0]["error"]
                           else ""))
    return result
