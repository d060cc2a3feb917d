"""`mmcl tune --strategy sample-opt`: TupleInfoNCE's sample optimization (docs/methods.md).

The paper's single-pass bilevel search, with Ray Tune running the candidates:

    policy  N(mu, diag(sigma^2)) over x = (log alpha_k, beta_k) per modality k: alpha_k the
            weight of k-disturbed negatives, beta_k the strength of one augmentation of k
            (`augment_field`, default noise). mu starts at the run config's values.
    round r = 1..rounds:
        sample B candidates x_i ~ N(mu, sigma^2)              (seeded by (seed, r))
        train each from the round's shared checkpoint for E epochs, in parallel as Tune
            trials (alpha_k = exp(x), beta_k = clip(x, 0, 1)): a one-worker candidate trains
            in its trial's process, a multi-worker one launches its Ray Train run
        score each by R = sum_k A^k on the validation tuples (the objective's `reward`:
            top-1 retrieval of a tuple's second view among its k-disturbed versions, on
            views drawn with the search's starting augmentation, or mmcl's default one
            (`reward_views: default`), the same for every candidate; see
            TupleInfoNCE.reward for why not modality k alone)
        mu += lr * mean_i( Ahat_i * g_i ),  Ahat_i = (R_i - mean R) / std R  (REINFORCE on
            standardised advantages), g_i = sigma^2 * grad_mu log p(x_i) = x_i - mu
            ("natural", the default: one lr fits coordinates of different sigma) or
            g_i = (x_i - mu) / sigma^2 (`gradient: vanilla`, the plain REINFORCE gradient);
            mu is then kept in bounds (log alpha in log_alpha_bounds, beta in [0, 1])
        the best candidate's checkpoint starts round r + 1

Every candidate of a search is one learning-rate schedule: `train.epochs` is set to
pretrain_epochs + rounds x E and each round's runs stop after their E epochs, so the cosine
decays once over the whole search instead of restarting every round.

`sample_opt:` settings (B, E, rounds, sigma and lr are the paper's):
    candidates (B), epochs_per_round (E), rounds, sigma ({log_alpha, beta} or one number),
    lr, gradient (natural|vanilla), search ([alpha, beta]), modalities (default: all),
    augment_field (noise|dropout|mixup|...), pretrain_epochs (epochs at mu before round 1),
    reward_views (start|default), eval_batch (candidates per retrieval batch of R),
    max_concurrent_trials, seed.

Code: `run_sample_opt` resolves the search (`resolve_search`, every user error before Ray
starts), loads or starts its `SearchState` (`load_state`), and per round trains the candidates
(`run_round`) and moves mu (`update_policy`); `write_outputs` writes the files at the end.

State. After every round the search folder's `sample_opt_state.json` (`SearchState.record()`)
holds mu, the round, the shared checkpoint and the trajectory (the candidates of a round are
written there before they start). Running the same command again resumes at the next round; a round that was cut off
goes on with `Tuner.restore` and the same candidates. Outputs: trajectory.json (mu and R per
round), trajectory.png (with matplotlib), model/ (the final best candidate: `mmcl.load` opens
the search folder), and policy_config.yaml (the run config at the final mu).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmcl.plotting import agg_pyplot_or_none
from mmcl import config as config_mod
from mmcl.config import AugmentConfig, ConfigError, ModalityAugment, RunConfig
from mmcl.data.schema import Manifest
from mmcl.storage import filesystem, join
from mmcl.train import launcher
from mmcl.tune import space as space_mod
from mmcl.tune import trust
from mmcl.tune.space import TuneFile
from mmcl.tune.common import (search_name, section_config, short_error, trial_statuses,
                              write_output)
from mmcl.tune.trial import (PG_RECORDS, ScoreSpec, Scorer, TuneError, absolute_paths,
                             ensure_ray, finite, make_janitor, resolve_metric,
                             in_process_resources, restore_or_new_tuner,
                             run_in_process_trial, run_train_trial, trial_resources)

STATE_NAME = "sample_opt_state.json"
FORMAT = 1
# The strengths in [0, 1] (not the text settings mask_token_id / keep_ends).
AUGMENT_FIELDS = tuple(n for n, f in ModalityAugment.model_fields.items()
                       if f.annotation is float)


class Sigma(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    log_alpha: float = Field(0.5, gt=0, description="std of log alpha_k")
    beta: float = Field(0.05, gt=0, description="std of beta_k (strengths are in [0, 1])")


class SampleOptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    candidates: int = Field(4, ge=2, description="B: candidates per round (>= 2: advantages "
                            "are standardised over them)")
    epochs_per_round: int = Field(1, ge=1, description="E: epochs each candidate trains")
    rounds: int = Field(5, ge=1)
    sigma: Sigma = Sigma()
    lr: float = Field(1.0, gt=0, description="policy learning rate")
    gradient: Literal["natural", "vanilla"] = "natural"
    search: list[Literal["alpha", "beta"]] = ["alpha", "beta"]
    modalities: list[str] | None = None
    augment_field: str = "noise"
    pretrain_epochs: int = Field(0, ge=0, description="epochs at mu before round 1")
    log_alpha_bounds: tuple[float, float] = (-6.0, 6.0)
    metric: Literal["reward", "probe"] = Field(
        "reward", description="what the policy maximises: R (the paper's) or the validation "
        "probe of `label`")
    label: str | None = None
    reward_views: Literal["start", "default"] = Field(
        "start", description="the augmentation R's two views are drawn with: the search's "
        "starting one, or mmcl's default (AugmentConfig()). Views as strong as a strong "
        "start favour candidates trained at least that strongly (docs/fidelity.md)")
    eval_batch: int = Field(256, ge=2)
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int | None = None

    @field_validator("sigma", mode="before")
    @classmethod
    def _one_number(cls, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {"log_alpha": v, "beta": v}
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("list alpha and/or beta, each once")
        return v

    @field_validator("augment_field")
    @classmethod
    def _field(cls, v):
        if v not in AUGMENT_FIELDS:
            raise ValueError(f"must be one of {AUGMENT_FIELDS}")
        return v

    @field_validator("log_alpha_bounds")
    @classmethod
    def _bounds(cls, v):
        if not v[0] < v[1]:
            raise ValueError("give (low, high) with low < high")
        return v


# ------------------------------------------------------------------------------ policy


@dataclass
class Policy:
    """N(mu, diag(sigma^2)) over named coordinates `log_alpha.<m>` and `beta.<m>`. mu stays
    inside [low, high] (log alpha bounds; beta in [0, 1]): outside, every sample would be
    clipped to the same value and the gradient would carry no signal."""

    names: list[str]
    mu: np.ndarray
    sigma: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.mu + self.sigma * rng.standard_normal((n, len(self.names)))

    def update(self, x: np.ndarray, rewards: np.ndarray, lr: float,
               gradient: str) -> tuple[np.ndarray, np.ndarray]:
        """REINFORCE on standardised advantages; returns (new mu, advantages)."""
        std = rewards.std()
        adv = (rewards - rewards.mean()) / std if std > 0 else np.zeros_like(rewards)
        grad = x - self.mu if gradient == "natural" else (x - self.mu) / self.sigma ** 2
        mu = self.mu + lr * (adv[:, None] * grad).mean(axis=0)
        if self.low is not None and self.high is not None:
            mu = np.clip(mu, self.low, self.high)
        return mu, adv

    def named(self, values: np.ndarray) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, values)}


def coordinates(options: SampleOptConfig, modalities: list[str]) -> list[str]:
    return [f"log_alpha.{m}" for m in modalities if "alpha" in options.search] + \
           [f"beta.{m}" for m in modalities if "beta" in options.search]


def initial_mu(cfg: RunConfig, names: list[str], options: SampleOptConfig) -> np.ndarray:
    mu = []
    for name in names:
        kind, m = name.split(".", 1)
        if kind == "log_alpha":
            w = cfg.objective.negative_weights.get(m, cfg.objective.default_negative_weight)
            if not w > 0:
                raise ConfigError(
                    f"sample optimization searches log alpha, but objective.negative_weights"
                    f".{m} is {w} (0 switches {m}'s disturbed negatives off); give it a "
                    f"positive starting weight or drop 'alpha' from sample_opt.search")
            mu.append(math.log(w))
        else:
            mu.append(float(getattr(cfg.augment.for_modality(m), options.augment_field)))
    return np.asarray(mu, dtype=np.float64)


def candidate_params(cfg: RunConfig, names: list[str], x: np.ndarray, options: SampleOptConfig,
                     total_epochs: int) -> tuple[dict, dict, dict]:
    """(config overrides by dotted path, alpha by modality, beta by modality) of a sample."""
    params: dict = {"train.epochs": int(total_epochs)}
    alpha, beta = {}, {}
    low, high = options.log_alpha_bounds
    for name, value in zip(names, x):
        kind, m = name.split(".", 1)
        if kind == "log_alpha":
            alpha[m] = float(math.exp(min(max(float(value), low), high)))
            params[f"objective.negative_weights.{m}"] = alpha[m]
        else:
            beta[m] = float(min(max(float(value), 0.0), 1.0))
            augment = cfg.augment.for_modality(m).model_dump()
            augment[options.augment_field] = beta[m]
            params[f"augment.per_modality.{m}"] = augment
    return params, alpha, beta


# ------------------------------------------------------------------------------- trial


def mmcl_candidate(params: dict, trial_spec: dict) -> None:
    """One candidate of a round (runs in a Tune trial actor): its config, trained from the
    round's shared checkpoint until the round's last epoch, scored by R."""
    import ray.train

    index = int(params["candidate"])
    values = space_mod.with_values(trial_spec["base"], trial_spec["candidates"][index])
    cfg = config_mod.from_dict(values, source=f"sample-opt candidate {index}")
    start = None
    if trial_spec["start_checkpoint"]:
        start = ray.train.Checkpoint(trial_spec["start_checkpoint"],
                                     filesystem=launcher.storage_filesystem(cfg))
    common = dict(storage_path=trial_spec["runs"], name=f"cand-{index}",
                  score_spec=trial_spec["score"], start_checkpoint=start,
                  stop_epoch=trial_spec["stop_epoch"])
    if trains_in_trial(cfg):
        run_in_process_trial(cfg, **common)
    else:
        run_train_trial(cfg, pg_records=trial_spec["records"], **common)


def trains_in_trial(cfg: RunConfig) -> bool:
    """One-worker candidates train in their Tune trial's process (`run_in_process_trial`);
    more workers need their Ray Train run (a DDP group)."""
    return cfg.scaling.num_workers == 1


def training_seconds(metrics: dict, batch_size: int, epochs: int) -> float:
    """Seconds a candidate spent in its training steps this round: its last epoch's steps at
    its measured throughput, times the round's epochs (the epochs of a round are alike)."""
    rate, steps = metrics.get("samples_per_s"), metrics.get("steps")
    if not (finite(rate) and rate > 0 and finite(steps)):
        return float("nan")
    return float(epochs * steps * batch_size / rate)


def round_timing(results: list[dict], round_s: float, concurrent: int) -> dict:
    """Where a round's wall time went: `train_s` is the candidates' training time divided by
    how many ran at once (the round's critical path if nothing else ran); the rest is outside
    training (Ray Train start-up, checkpoint copies, scoring, Tune's bookkeeping)."""
    train = [r["train_s"] for r in results if finite(r.get("train_s"))]
    score = [r["score_s"] for r in results if finite(r.get("score_s"))]
    at_once = max(1, min(concurrent, len(results)))
    train_s = sum(train) / at_once if train else float("nan")
    return {"round_s": round_s, "fit_s": results[0].get("fit_s") if results else None,
            "train_s": train_s, "score_s": sum(score) / at_once if score else float("nan"),
            "concurrent": at_once,
            "outside_training_share": 1.0 - train_s / round_s if round_s > 0 and train
            else float("nan")}


def train_candidates(tag: str, url: str, base: RunConfig, tune_file: TuneFile,
                     candidates: list[dict], start_checkpoint: str | None, stop_epoch: int,
                     score: ScoreSpec, concurrent: int, progress: Callable[[str], None],
                     start_epoch: int = 0) -> tuple[list[dict], bool]:
    """Train the candidates as one Tune experiment `tag` (restored if it was cut off).
    Returns (one result per candidate, whether the experiment was interrupted)."""
    from ray import tune

    round_url = join(url, tag)
    trial_spec = {"base": tune_file.base, "candidates": candidates, "runs": round_url,
            "records": join(url, PG_RECORDS), "start_checkpoint": start_checkpoint,
            "stop_epoch": stop_epoch, "score": score, "start_epoch": start_epoch}
    resources = in_process_resources(base) if trains_in_trial(base) else trial_resources()
    trainable = tune.with_resources(tune.with_parameters(mmcl_candidate, trial_spec=trial_spec),
                                    resources)
    param_space = {"candidate": tune.grid_search(list(range(len(candidates))))}
    storage_path = f"{launcher.storage_root(base).rstrip('/')}/{search_name(tune_file, base)}"
    storage_fs = launcher.storage_filesystem(base)
    experiment = f"{storage_path}/{tag}"
    janitor = make_janitor(trial_spec["records"], base)
    folder = trust.Folder(round_url, base.storage.endpoint_url, base.storage.region,
                          what="sample-optimization round")
    tuner = restore_or_new_tuner(
        experiment, trainable, param_space, storage_fs,
        lambda: tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric="score", mode="max",
                                        max_concurrent_trials=min(concurrent, len(candidates)),
                                        reuse_actors=False),
            run_config=tune.RunConfig(name=tag, storage_path=storage_path,
                                      storage_filesystem=storage_fs,
                                      callbacks=[janitor, trust.signature_keeper(folder)])),
        on_resume=lambda: progress(f"[mmcl] {tag}: resuming its candidates (Tuner.restore)"),
        folder=folder)
    fit_start = time.perf_counter()
    results = tuner.fit()  # Tune catches Ctrl-C: it saves the experiment and returns
    fit_s = time.perf_counter() - fit_start
    trust.sign(folder)  # what this driver's Tune wrote, before anything reads it back
    statuses = trial_statuses(experiment, storage_fs)
    interrupted = len(results) < len(candidates) or any(
        status not in ("TERMINATED", "ERROR") for status, _ in statuses.values())
    out = [{"score": float("nan"), "R": float("nan"), "A": {}, "checkpoint": None,
            "error": "did not run"} for _ in candidates]
    for result in results:
        index = int((result.config or {}).get("candidate", -1))
        if not 0 <= index < len(candidates):
            continue
        metrics = result.metrics or {}
        out[index] = {
            "score": float(metrics.get("score", float("nan"))),
            "R": float(metrics.get("val_R", float("nan"))),
            "probe": float(metrics.get("val_probe", float("nan"))),
            "A": {k[len("val_A_"):]: float(v) for k, v in metrics.items()
                  if k.startswith("val_A_")},
            "checkpoint": metrics.get("checkpoint_path"),
            "step": metrics.get("step"), "epoch": metrics.get("epoch"),
            "loss": metrics.get("loss"), "trial": metrics.get("trial_id"),
            "run": join(round_url, f"cand-{index}"),
            "error": "" if result.error is None else short_error(result.error),
            "train_s": training_seconds(metrics, base.train.batch_size,
                                        stop_epoch - int(trial_spec["start_epoch"])),
            "score_s": metrics.get("score_seconds"), "fit_s": fit_s,
        }
        if result.error is None and out[index]["epoch"] != stop_epoch:
            out[index]["error"] = f"stopped at epoch {out[index]['epoch']}, not {stop_epoch}"
    return out, interrupted


# ------------------------------------------------------------------------------- state


def state_folder(url: str, cfg: RunConfig) -> "trust.Folder":
    return trust.Folder(url, cfg.storage.endpoint_url, cfg.storage.region, only=(STATE_NAME,),
                        what="sample-optimization")


def read_state(url: str, cfg: RunConfig) -> dict | None:
    """The saved record, once its signature verifies (it decides what is restored)."""
    fs, path = filesystem(join(url, STATE_NAME), cfg.storage.endpoint_url, cfg.storage.region)
    if not fs.exists(path):
        return None
    trust.verify(state_folder(url, cfg))
    with fs.open(path, "r") as f:
        return json.load(f)


def write_state(url: str, cfg: RunConfig, state: dict) -> None:
    """Write-then-rename, so a search killed while saving keeps its previous state."""
    fs, path = filesystem(join(url, STATE_NAME), cfg.storage.endpoint_url, cfg.storage.region)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(state, f, indent=1, default=float)
    fs.mv(tmp, path)
    trust.sign(state_folder(url, cfg))


# The settings a resumed search must share with the search it resumes (sigma, lr, gradient
# and eval_batch may change between rounds).
RESUME_KEYS = ("candidates", "epochs_per_round", "rounds", "pretrain_epochs", "search",
               "augment_field", "modalities", "metric", "label")


@dataclass
class SearchState:
    """Where a search stands. `sample_opt_state.json` is `record()`: these fields as keys,
    plus `format` (FORMAT). `rounds` holds one entry per finished round (mu before and
    after, the candidates with their samples, scores and checkpoints, the round's timing);
    `pending` the samples of the round that has started and not finished."""

    names: list[str]                   # policy coordinates, log_alpha.<m> and beta.<m>
    settings: dict                     # the sample_opt section it was started with
    metric: str                        # what the policy maximises: reward | probe
    label: str | None                  # the probed label (metric probe)
    total_epochs: int                  # pretrain_epochs + rounds x E: one LR schedule
    mu0: dict[str, float]
    mu: list[float]                    # the policy mean now, in `names` order
    score_init: float                  # the initial weights' score (and R)
    R_init: float
    score_start: float                 # the score (and R) where round 1 starts
    R_start: float
    pretrained: bool                   # round 0 (pretrain_epochs at mu0) done or not needed
    completed: int = 0                 # rounds finished
    start_checkpoint: str | None = None    # the checkpoint the next round starts from
    pending: dict | None = None        # {"round", "samples"} of a round under way
    rounds: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict, where: str) -> "SearchState":
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            found = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise TuneError(f"{where} is not a sample-optimization state of format {FORMAT} "
                            f"(found {found!r}); use a new storage.name")
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in record
                         and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise TuneError(f"{where} lacks {', '.join(missing)}; use a new storage.name")
        return cls(**{k: v for k, v in record.items() if k in known})


@dataclass
class Search:
    """One search's settings, resolved from its tune file (and checked) before Ray starts."""

    tune_file: TuneFile                       # storage paths made absolute
    user_tune_file: TuneFile                  # as given (policy_config.yaml is written from it)
    options: SampleOptConfig
    base: RunConfig
    name: str
    url: str
    root: str
    manifest: Manifest
    names: list[str]
    mu0: np.ndarray
    sigma: np.ndarray
    total_epochs: int
    seed: int
    score: ScoreSpec
    first_cfg: RunConfig               # a candidate's config at mu0 (the initial scoring)

    def apply(self, x: np.ndarray) -> tuple[dict, dict, dict]:
        return candidate_params(self.base, self.names, x, self.options, self.total_epochs)

    def policy(self, mu) -> Policy:
        bounds = [self.options.log_alpha_bounds if n.startswith("log_alpha") else (0.0, 1.0)
                  for n in self.names]
        return Policy(self.names, np.asarray(mu, dtype=np.float64), self.sigma,
                      np.asarray([b[0] for b in bounds]), np.asarray([b[1] for b in bounds]))

    def stop_epoch(self, r: int) -> int:
        return self.options.pretrain_epochs + r * self.options.epochs_per_round

    def save(self, state: SearchState) -> None:
        write_state(self.url, self.base, state.record())


def resolve_search(tune_file: TuneFile) -> Search:
    """The sample_opt section, the data set and the policy's coordinates; every error a
    user can make here is raised before Ray starts."""
    options = section_config(SampleOptConfig, tune_file.sections.get("sample_opt", {}),
                             "sample_opt", tune_file.source, tune_file.overrides)
    if tune_file.space:
        raise ConfigError(f"sample optimization searches alpha and beta with its own policy; "
                          f"remove the {{tune: ...}} distributions "
                          f"({', '.join(tune_file.space)}) or "
                          f"use --strategy sweep")
    space_mod.validate(tune_file)
    user_tune_file, tune_file = tune_file, absolute_paths(tune_file)
    base = tune_file.base_config()
    if "alpha" in options.search and base.objective.name != "tuple_infonce":
        raise ConfigError(f"sample optimization searches TupleInfoNCE's negative weights "
                          f"alpha; objective.name is '{base.objective.name}'. Use "
                          f"objective.name=tuple_infonce, or sample_opt.search=[beta]")
    name = search_name(tune_file, base)
    root, manifest = launcher.prepare_data(base)
    modalities = options.modalities or manifest.modality_names
    unknown = sorted(set(modalities) - set(manifest.modality_names))
    if unknown:
        raise ConfigError(f"sample_opt.modalities: {unknown} are not modalities of the data "
                          f"set; it has {manifest.modality_names}")
    if manifest.splits.get(base.data.val_split, 0) < 2:
        raise TuneError(f"the '{base.data.val_split}' split has fewer than 2 tuples; R is "
                        f"scored on it (set data.val_split to a larger split)")
    names = coordinates(options, modalities)
    mu0 = initial_mu(base, names, options)
    sigma = np.asarray([options.sigma.log_alpha if n.startswith("log_alpha") else options.sigma.beta
                        for n in names])
    total_epochs = options.pretrain_epochs + options.rounds * options.epochs_per_round
    resolved = resolve_metric(options.metric, options.label, base, manifest,
                              manifest.splits.get(base.data.val_split, 0))
    score = ScoreSpec(metric=resolved.metric,
                      probe_label=resolved.probe_label if options.metric == "probe" else None,
                      reward=True, eval_batch=options.eval_batch, seed=base.train.seed,
                      reward_augment=resolved.reward_augment
                      if options.reward_views == "start" else AugmentConfig().model_dump())
    # Fail on a config the candidates cannot train with, before Ray starts.
    first_params = candidate_params(base, names, mu0, options, total_epochs)[0]
    first_cfg = tune_file.config_with(first_params, source="sample-opt candidate")
    return Search(tune_file=tune_file, user_tune_file=user_tune_file, options=options,
                  base=base, name=name,
                  url=join(base.storage.path, name), root=root, manifest=manifest,
                  names=names, mu0=mu0, sigma=sigma, total_epochs=total_epochs,
                  seed=base.train.seed if options.seed is None else options.seed, score=score,
                  first_cfg=first_cfg)


def load_state(search: Search) -> SearchState:
    """The saved state (signature verified; its settings must match), or a new one scored
    at the initial weights and saved."""
    settings = search.options.model_dump(mode="json")
    record = read_state(search.url, search.base)
    if record is None:
        scorer = Scorer(search.first_cfg, search.manifest, search.root, search.score)
        init = scorer.score(scorer.objective(None))
        r_init = init.get("val_R", float("nan"))
        state = SearchState(
            names=search.names, settings=settings, metric=search.score.metric,
            label=search.score.probe_label, total_epochs=search.total_epochs,
            mu0=dict(zip(search.names, map(float, search.mu0))),
            mu=[float(v) for v in search.mu0], score_init=init["score"], R_init=r_init,
            score_start=init["score"], R_start=r_init,
            pretrained=search.options.pretrain_epochs == 0)
        search.save(state)
        return state
    state = SearchState.from_record(record, join(search.url, STATE_NAME))
    changed = [k for k in RESUME_KEYS if state.settings.get(k) != settings.get(k)]
    if state.names != search.names or changed:
        raise ConfigError(f"{search.url} holds a sample optimization with other settings "
                          f"({', '.join(changed) or 'coordinates'} differ); use a new "
                          f"storage.name, or the settings it was started with")
    return state


def pretrain(search: Search, state: SearchState, policy: Policy, concurrent: int,
             progress: Callable[[str], None]) -> bool:
    """Round 0: pretrain_epochs at mu before the search. False if it was interrupted."""
    progress(f"[mmcl] round 0: {search.options.pretrain_epochs} epochs at mu before the search")
    results, interrupted = train_candidates(
        "round-000", search.url, search.base, search.tune_file, [search.apply(policy.mu)[0]], None,
        search.options.pretrain_epochs, search.score, concurrent, progress)
    if interrupted:
        return False
    if not finite(results[0]["score"]):
        raise TuneError(f"the pretraining run failed: {results[0]['error']}")
    state.pretrained, state.start_checkpoint = True, results[0]["checkpoint"]
    state.score_start, state.R_start = results[0]["score"], results[0]["R"]
    search.save(state)
    return True


@dataclass
class RoundRun:
    """One round's candidates, trained: the samples, their configs and their results."""

    round: int
    x: np.ndarray
    applied: list[tuple[dict, dict, dict]]
    results: list[dict]
    started: float                     # perf_counter at the round's start


def run_round(search: Search, state: SearchState, policy: Policy, r: int, concurrent: int,
              progress: Callable[[str], None]) -> RoundRun | None:
    """Sample round r's candidates (or take the pending ones of a cut-off round, saved
    before they start) and train them. None if the round was interrupted."""
    pending = state.pending
    if pending and pending["round"] == r:
        x = np.asarray(pending["samples"], dtype=np.float64)
    else:
        x = policy.sample(np.random.default_rng([search.seed, r]), search.options.candidates)
        state.pending = {"round": r, "samples": x.tolist()}
        search.save(state)
    started = time.perf_counter()
    stop_epoch = search.stop_epoch(r)
    applied = [search.apply(xi) for xi in x]
    progress(f"[mmcl] round {r}/{search.options.rounds}: {search.options.candidates} "
             f"candidates from "
             f"{state.start_checkpoint or 'the initial weights'} to epoch {stop_epoch}")
    results, interrupted = train_candidates(
        f"round-{r:03d}", search.url, search.base, search.tune_file, [a[0] for a in applied],
        state.start_checkpoint, stop_epoch, search.score, concurrent, progress,
        start_epoch=stop_epoch - search.options.epochs_per_round)
    return None if interrupted else RoundRun(r, x, applied, results, started)


def update_policy(search: Search, state: SearchState, policy: Policy, run: RoundRun,
                  concurrent: int, progress: Callable[[str], None]) -> dict:
    """REINFORCE on the round's finished candidates; the best one's checkpoint starts the
    next round. Records the round in the state and saves it; returns the round's entry."""
    r, x, results = run.round, run.x, run.results
    ok = [i for i, res in enumerate(results) if finite(res["score"]) and res["checkpoint"]
          and not res["error"]]
    if not ok:
        raise TuneError(f"every candidate of round {r} failed; first error: "
                        f"{results[0]['error']}. Fix the cause and run the same command "
                        f"again (the round resumes)")
    rewards = np.asarray([results[i]["score"] for i in ok])
    mu_before = policy.mu.copy()
    advantages = np.zeros(len(x))
    if len(ok) >= 2:
        policy.mu, adv = policy.update(x[ok], rewards, search.options.lr, search.options.gradient)
        advantages[ok] = adv
    else:
        progress(f"[mmcl] round {r}: only one candidate finished; mu is not updated")
    best = ok[int(np.argmax(rewards))]
    entry = {
        "round": r, "start_checkpoint": state.start_checkpoint,
        "stop_epoch": search.stop_epoch(r),
        "mu": policy.named(mu_before), "mu_after": policy.named(policy.mu),
        "sigma": policy.named(search.sigma),
        "candidates": [{"index": i, "x": policy.named(x[i]), "alpha": run.applied[i][1],
                        "beta": run.applied[i][2], "advantage": float(advantages[i]),
                        **results[i]} for i in range(len(x))],
        "score_mean": float(rewards.mean()), "score_best": float(rewards.max()),
        "R_mean": float(np.mean([results[i]["R"] for i in ok])),
        "R_best_candidate": float(results[best]["R"]), "best": best,
        "best_checkpoint": results[best]["checkpoint"],
        "timing": round_timing(results, time.perf_counter() - run.started, concurrent),
    }
    state.rounds.append(entry)
    state.mu, state.completed, state.pending = [float(v) for v in policy.mu], r, None
    state.start_checkpoint = results[best]["checkpoint"]
    search.save(state)
    progress(f"[mmcl] round {r}: {search.score.metric} mean {entry['score_mean']:.4f}, best "
             f"{entry['score_best']:.4f} (candidate {best}); R mean {entry['R_mean']:.4f}; "
             f"mu {entry['mu_after']}")
    return entry


def write_outputs(search: Search, state: SearchState, policy: Policy) -> dict:
    """trajectory.json (and .png on local storage) after any run; once every round is done,
    model/ (the last round's best candidate) and policy_config.yaml (the final mu)."""
    keys = ("names", "settings", "metric", "label", "total_epochs", "mu0", "score_init",
            "R_init", "score_start", "R_start", "completed", "rounds")
    trajectory = {k: getattr(state, k) for k in keys}
    files = {"trajectory": write_output(join(search.url, "trajectory.json"),
                                  json.dumps(trajectory, indent=1, default=float),
                                  search.base)}
    if state.rounds and launcher.storage_filesystem(search.base) is None:
        _, path = filesystem(search.url, search.base.storage.endpoint_url,
                             search.base.storage.region)
        png = plot_trajectory(state, join(path, "trajectory.png"))
        if png:
            files["plot"] = png
    if state.completed >= search.options.rounds and state.rounds:
        files.update(_finish(search, state, policy))
    return files


@dataclass
class SampleOptResult:
    url: str
    state: SearchState
    started_at_round: int
    elapsed_s: float = 0.0
    files: dict = field(default_factory=dict)
    interrupted: bool = False

    @property
    def rounds(self) -> list[dict]:
        return self.state.rounds

    @property
    def finished(self) -> bool:
        return self.state.completed >= self.state.settings["rounds"]

    @property
    def metric(self) -> str:
        return self.state.metric

    @property
    def score_start(self) -> float:
        return self.state.score_start

    @property
    def score_final(self) -> float:
        return self.rounds[-1]["score_best"] if self.rounds else float("nan")

    def table(self) -> str:
        names = self.state.names
        probe = self.metric != "reward"
        m = "probe" if probe else "R"
        header = ["round", f"{m} mean", f"{m} best", *(["R mean"] if probe else []), "best",
                  *[f"mu {n}" for n in names]]
        r_start = [f"{self.state.R_start:.4f}"] if probe else []
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                 "| " + " | ".join(["start", f"{self.score_start:.4f}", f"{self.score_start:.4f}",
                                    *r_start, "-",
                                    *[f"{self.state.mu0[n]:.3f}" for n in names]]) + " |"]
        for r in self.rounds:
            r_mean = [f"{r['R_mean']:.4f}"] if probe else []
            lines.append("| " + " | ".join([str(r["round"]), f"{r['score_mean']:.4f}",
                                            f"{r['score_best']:.4f}", *r_mean, str(r["best"]),
                                            *[f"{r['mu_after'][n]:.3f}" for n in names]])
                         + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        done = self.state.completed
        total = self.state.settings["rounds"]
        what = "R" if self.metric == "reward" else f"validation probe of {self.state.label}"
        lines = [self.table(), ""]
        if self.finished:
            lines.append(f"sample optimization finished in {self.elapsed_s:.0f}s: {done} "
                         f"rounds; {what} {self.score_start:.4f} at the start -> "
                         f"{self.score_final:.4f} (best candidate of the last round)")
        else:
            lines.append(f"sample optimization paused after round {done} of {total}; run the "
                         f"same command again to resume at round {done + 1}")
        for what, url in self.files.items():
            lines.append(f"  {what + ':':<12} {url}")
        return "\n".join(lines)


def plot_trajectory(state: "SearchState", path: str) -> str | None:
    """trajectory.png: R per round (candidates, mean, best) and mu per coordinate."""
    plt = agg_pyplot_or_none()
    if plt is None:
        return None
    rounds = state.rounds
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["round"] for r in rounds]
    for r in rounds:
        ys = [c["score"] for c in r["candidates"] if finite(c["score"])]
        ax1.scatter([r["round"]] * len(ys), ys, s=12, color="0.6")
    ax1.plot([0, *xs], [state.score_start, *[r["score_mean"] for r in rounds]], "o-",
             label="mean of candidates (round 0: start)")
    ax1.plot(xs, [r["score_best"] for r in rounds], "s--", label="best candidate")
    if state.metric != "reward":
        ax1.plot([0, *xs], [state.R_start, *[r["R_mean"] for r in rounds]], "^:",
                 label="R (mean)")
    ax1.set_xlabel("round")
    ax1.set_ylabel("R = sum_k A^k (validation)" if state.metric == "reward"
                   else f"validation probe of {state.label}")
    ax1.legend(fontsize=8)
    for n in state.names:
        ax2.plot([0, *xs], [state.mu0[n], *[r["mu_after"][n] for r in rounds]], "o-",
                 label=n)
    ax2.set_xlabel("round")
    ax2.set_ylabel("policy mean mu")
    ax2.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- main



# -------------------------------------------------------------------------------- main


def run_sample_opt(tune_file: TuneFile, address: str | None = None,
                   stop_after_round: int | None = None,
                   progress: Callable[[str], None] = print) -> SampleOptResult:
    """Run (or resume) a sample optimization. `stop_after_round` pauses the search once that
    round is complete (the state is saved exactly as when the search is killed there)."""
    start_time = time.perf_counter()
    search = resolve_search(tune_file)
    state = load_state(search)
    started_at = state.completed + 1
    policy = search.policy(state.mu)
    options = search.options
    concurrent = ensure_ray(search.base, address, options.max_concurrent_trials)
    progress(f"[mmcl] sample optimization '{search.name}': B={options.candidates} candidates x "
             f"E={options.epochs_per_round} epochs x {options.rounds} rounds over "
             f"{search.names}; up to "
             f"{min(concurrent, options.candidates)} candidates at once. Folder: {search.url}")
    files = {"state": join(search.url, STATE_NAME)}

    def result(interrupted: bool = False) -> SampleOptResult:
        return SampleOptResult(search.url, state, started_at, time.perf_counter() - start_time,
                               files, interrupted=interrupted)

    def paused() -> SampleOptResult:
        """A round was cut off (Ctrl-C): its candidates are saved as pending; the next run
        restores that round's Tune experiment and goes on."""
        progress(f"[mmcl] interrupted in round {state.completed + 1}: run the same command "
                 f"again to resume it")
        return result(interrupted=True)

    if not state.pretrained and not pretrain(search, state, policy, concurrent, progress):
        return paused()
    while state.completed < options.rounds:
        r = state.completed + 1
        if stop_after_round is not None and r > stop_after_round:
            break
        run = run_round(search, state, policy, r, concurrent, progress)
        if run is None:
            return paused()
        update_policy(search, state, policy, run, concurrent, progress)
    files.update(write_outputs(search, state, policy))
    return result()


def _finish(search: Search, state: SearchState, policy: Policy) -> dict:
    """model/ from the last round's best candidate; policy_config.yaml at the final mu."""
    import ray.train

    from mmcl.train.checkpoint import export_model, read_checkpoint_state

    base, tune_file = search.base, search.tune_file
    last = state.rounds[-1]
    best = last["candidates"][last["best"]]
    checkpoint = ray.train.Checkpoint(last["best_checkpoint"],
                                      filesystem=launcher.storage_filesystem(base))
    with checkpoint.as_directory() as directory:
        weights = read_checkpoint_state(directory)
    best_x = np.asarray([best["x"][n] for n in state.names])
    cfg_best = tune_file.config_with(search.apply(best_x)[0])
    export_model(weights, cfg_best, search.manifest, join(search.url, "model"),
                 base.storage.endpoint_url, base.storage.region)
    params = search.apply(policy.mu)[0]
    params.pop("train.epochs")
    raw = search.user_tune_file.raw_with(params)
    raw.setdefault("storage", {})["name"] = f"{search.name}-policy"
    header = (f"# The run config at the final policy mean of sample optimization "
              f"'{search.name}': {json.dumps(policy.named(policy.mu))}\n")
    text = header + config_mod.dump(config_mod.from_dict(raw, source="policy config"))
    return {"model": join(search.url, "model"),
            "policy config": write_output(join(search.url, "policy_config.yaml"), text, base)}
