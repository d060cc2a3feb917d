"""`mmcl bench sampleopt`: does TupleInfoNCE's sample optimization pay for itself?

    mmcl bench sampleopt --grid    [--quick] [--out DIR]  -> DIR/grid.{json,md,png}
    mmcl bench sampleopt --compare [--quick] [--out DIR]  -> DIR/compare.{json,md,png}

--grid, the ground truth: TupleInfoNCE on a controlled data set with a weak modality, trained
in this process (`mmcl.train.local.fit_in_memory`, the Engine the Ray workers run) at every
point of a grid over (alpha_weak, beta_weak) - the weight of weak-disturbed negatives and the
noise strength of the weak modality's augmentation - for every seed; each final model's
embedding is probed (mmcl's linear probe, test split) for the weak modality's factor and the
other factors, and its reward R is computed on the validation tuples the way the search scores
candidates. Every other setting (temperature included) is the same in every cell.

--compare, the search against its controls at equal compute, on Ray (the `mmcl tune` code
paths, one local Ray per seed): (a) the default weights and strengths, trained for the
search's epochs; (b) Ray Tune random search over the same box (`--strategy sweep`, searcher
random, no early stopping), as many trials x epochs as (c) trains; (c) `--strategy
sample-opt`. The same trials run side by side in (b) and (c). Each final model (for (b) the
trial with the best validation R, the label-free score the search uses too) is probed on the
test split like the grid's cells. Rounds of (c) are timed: the share of a round spent outside
training (Ray start-up of the Train runs, checkpoint copies, scoring) is reported.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from mmcl.plotting import agg_pyplot_or_none

WEAK = "weak"                     # the weak modality's name in the presets used here
FACTORS = ("weak_factor", "shared", "y")   # probed columns: the weak one first


@dataclass
class GridSettings:
    """Everything that decides the grid's numbers; written into every output."""

    mode: str = "full"
    preset: str = "weak"
    n: int = 2048
    seeds: tuple[int, ...] = (0, 1, 2)
    alphas: tuple[float, ...] = (0.25, 2.0, 16.0)
    betas: tuple[float, ...] = (0.05, 0.3, 0.6, 1.0)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 0.1          # one temperature in every cell (and every arm)
    base_noise: float = 0.1           # the other modalities' augmentation (mmcl's default)
    model: tuple[str, ...] = ("model.embed_dim=32", "model.encoder.hidden=64",
                              "model.proj_hidden=64", "model.proj_dim=32")
    l2_grid: tuple[float, ...] = (1e-3, 1e-2)
    probe_max_iter: int = 60
    eval_batch: int = 128             # tuples per retrieval batch of R (as the search's)

    @classmethod
    def quick(cls) -> "GridSettings":
        """A smoke test: 2 x 2 cells, one seed, tiny data; the numbers mean nothing."""
        return cls(mode="quick", n=384, seeds=(0,), alphas=(0.25, 4.0), betas=(0.05, 1.0),
                   epochs=1, batch_size=64, l2_grid=(1e-2,), probe_max_iter=20, eval_batch=32)


# ------------------------------------------------------------------------------- data


def data_splits(preset: str, n: int, seed: int):
    """(manifest, {split: columns}) of `mmcl data synth`'s data set, as stored: synthetic
    data sets carry no normalisation constants, so the Ray path's Preparer hands the model
    these values too and augmentation strengths mean the same in both."""
    from mmcl.bench.fidelity import make_splits

    return make_splits(preset, n, seed)


def cell_overrides(alpha: float, beta: float, settings: GridSettings) -> list[str]:
    """The config of one (alpha_weak, beta_weak): every other weight 1, every other
    modality's noise `base_noise`."""
    return [f"objective.negative_weights={{{WEAK}: {alpha}}}",
            f"augment.default.noise={settings.base_noise}",
            f"augment.per_modality={{{WEAK}: {{noise: {beta}}}}}"]


def run_config(seed: int, settings: GridSettings, overrides: Sequence[str] = ()):
    from mmcl import config

    return config.load(None, [
        "objective.name=tuple_infonce", f"objective.temperature={settings.temperature}",
        f"data.synth.preset={settings.preset}", f"data.synth.n={settings.n}",
        f"data.synth.seed={seed}", f"train.seed={seed}", f"train.epochs={settings.epochs}",
        f"train.batch_size={settings.batch_size}", f"train.lr={settings.lr}",
        "scaling.num_workers=1", *settings.model, *overrides])


# ------------------------------------------------------------------------------ scoring


def probe_factors(objective, manifest, splits, settings: GridSettings) -> dict[str, float]:
    """Balanced accuracy (test split) of a linear probe per factor, on objective.embed."""
    from mmcl.bench.fidelity import embed_splits
    from mmcl.evaluate import diagnostics as diag

    modalities = manifest.modality_names
    features = embed_splits(objective, splits, modalities, manifest)
    labels = {s: {k: v for k, v in cols.items() if k not in modalities}
              for s, cols in splits.items()}
    probes = diag.ProbeSettings(l2_grid=settings.l2_grid, max_iter=settings.probe_max_iter,
                                few_label_k=(), max_rows=None, knn_k=0)
    specs = [manifest.label(c) for c in FACTORS]
    results = diag.probe_columns(labels, specs, features, probes)
    return {c: float(results[c]["probes"][diag.FUSED_KIND]["balanced_accuracy"])
            for c in FACTORS}


def validation_reward(objective, manifest, val: dict, cfg_base, eval_batch: int,
                      seed: int) -> dict[str, float]:
    """R and A^k on the validation tuples as the search scores a candidate: two views drawn
    with the search's base augmentation (the defaults), seeded per batch."""
    import torch

    from mmcl.data.augment import Augmenter

    augmenter = Augmenter(manifest.modalities, cfg_base.augment)
    n = len(val[manifest.modality_names[0]])
    size = min(eval_batch, n)
    totals: dict[str, float] = {}
    batches = 0
    for start in range(0, n - size + 1, size):
        batch = {m: torch.as_tensor(val[m][start:start + size])
                 for m in manifest.modality_names}
        generator = torch.Generator().manual_seed(seed * 100_003 + batches)
        view1, view2 = augmenter(batch, generator), augmenter(batch, generator)
        for k, v in objective.reward(view1, view2).items():
            totals[k] = totals.get(k, 0.0) + v
        batches += 1
    return {k: v / batches for k, v in totals.items()}


# --------------------------------------------------------------------------------- grid


def grid_cell(alpha: float, beta: float, seed: int, settings: GridSettings,
              data=None) -> dict:
    """Train TupleInfoNCE at (alpha_weak, beta_weak) on seed `seed`'s data; probe and R."""
    from mmcl.bench.timing import torch_threads
    from mmcl.train.local import fit_in_memory

    manifest, splits = data or data_splits(settings.preset, settings.n, seed)
    cfg = run_config(seed, settings, cell_overrides(alpha, beta, settings))
    start = time.perf_counter()
    with torch_threads(1):
        engine = fit_in_memory(cfg, manifest, splits["train"])
        train_s = time.perf_counter() - start
        probes = probe_factors(engine.objective, manifest, splits, settings)
        reward = validation_reward(engine.objective, manifest, splits["val"],
                                   run_config(seed, settings), settings.eval_batch, seed)
    return {"alpha": alpha, "beta": beta, "seed": seed, **probes, **reward,
            "train_s": train_s}


def summarise_grid(cells: Sequence[dict], settings: GridSettings) -> dict:
    """Mean and std over seeds per (alpha, beta); the spread across the grid against the
    seed spread; the optimum and the grid's top quarter (by the weak-factor probe)."""
    table = []
    for a in settings.alphas:
        for b in settings.betas:
            runs = [c for c in cells if c["alpha"] == a and c["beta"] == b]
            if not runs:
                continue
            row = {"alpha": a, "beta": b, "n": len(runs)}
            for key in (*FACTORS, "R"):
                values = np.asarray([r[key] for r in runs], dtype=np.float64)
                row[key] = {"mean": float(values.mean()),
                            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            table.append(row)
    means = np.asarray([r["weak_factor"]["mean"] for r in table])
    stds = np.asarray([r["weak_factor"]["std"] for r in table])
    best = table[int(np.argmax(means))]
    top_quarter = float(np.quantile(means, 0.75))
    r_means = np.asarray([r["R"]["mean"] for r in table])
    corr = float(np.corrcoef(r_means, means)[0, 1]) if len(table) > 2 and \
        r_means.std() > 0 and means.std() > 0 else float("nan")
    return {"cells": table, "weak_range": float(means.max() - means.min()),
            "seed_std_mean": float(stds.mean()), "seed_std_max": float(stds.max()),
            "optimum": {"alpha": best["alpha"], "beta": best["beta"],
                        "weak_factor": best["weak_factor"]},
            "top_quarter_threshold": top_quarter,
            "corr_R_weak": corr}


def grid_markdown(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    lines = [f"Grid over (alpha_weak, beta_weak) on `{s['preset']}` (n={s['n']}, "
             f"{s['epochs']} epochs, batch {s['batch_size']}, temperature {s['temperature']}, "
             f"seeds {list(s['seeds'])}; mean ± std over seeds, test balanced accuracy):", "",
             "| alpha_weak | beta_weak | weak factor | shared | y | R (val) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in summary["cells"]:
        lines.append("| " + " | ".join([f"{r['alpha']:g}", f"{r['beta']:g}", *[
            f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in (*FACTORS, "R")]]) + " |")
    o = summary["optimum"]
    lines += ["", f"Weak-factor probe across the grid: range {summary['weak_range']:.3f} "
              f"(max - min of cell means) vs seed std {summary['seed_std_mean']:.3f} mean, "
              f"{summary['seed_std_max']:.3f} max. Optimum: alpha_weak {o['alpha']:g}, "
              f"beta_weak {o['beta']:g} ({o['weak_factor']['mean']:.3f} ± "
              f"{o['weak_factor']['std']:.3f}); top quarter: >= "
              f"{summary['top_quarter_threshold']:.3f}. Correlation of R with the weak-factor "
              f"probe across cells: {summary['corr_R_weak']:.2f}.",
              f"Wall time {report['wall_s']:.0f} s; load average {report['load']}."]
    return "\n".join(lines)


def plot_grid(report: dict, path: str) -> str | None:
    plt = agg_pyplot_or_none()
    if plt is None:
        return None
    s, cells = report["settings"], report["summary"]["cells"]
    alphas, betas = list(s["alphas"]), list(s["betas"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "weak_factor", "weak-factor probe (test)"),
                           (axes[1], "R", "R = sum_k A^k (val)")):
        grid = np.full((len(alphas), len(betas)), np.nan)
        for c in cells:
            grid[alphas.index(c["alpha"]), betas.index(c["beta"])] = c[key]["mean"]
        image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        for i in range(len(alphas)):
            for j in range(len(betas)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w",
                        fontsize=8)
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("beta_weak (noise on the weak modality)")
        ax.set_ylabel("alpha_weak")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"TupleInfoNCE on {s['preset']}: mean over seeds {list(s['seeds'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_grid(quick: bool = False, out: str | None = None,
             settings: GridSettings | None = None,
             log: Callable[[str], None] = print) -> dict:
    from mmcl.bench.env import load_average

    settings = settings or (GridSettings.quick() if quick else GridSettings())
    out = out or os.path.join("runs", "bench", "sampleopt-quick" if quick else "sampleopt")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    cells = []
    with open(os.path.join(out, "grid_runs.jsonl"), "w") as runs:
        for seed in settings.seeds:
            data = data_splits(settings.preset, settings.n, seed)
            for a in settings.alphas:
                for b in settings.betas:
                    cell = grid_cell(a, b, seed, settings, data)
                    cells.append(cell)
                    runs.write(json.dumps(cell) + "\n")
                    runs.flush()
                    log(f"[sampleopt grid] seed {seed} alpha {a:g} beta {b:g}: weak "
                        f"{cell['weak_factor']:.3f} shared {cell['shared']:.3f} y "
                        f"{cell['y']:.3f} R {cell['R']:.3f} ({cell['train_s']:.1f}s)")
    report = {"settings": asdict(settings), "runs": cells,
              "summary": summarise_grid(cells, settings),
              "wall_s": time.perf_counter() - start, "load": load_average()}
    with open(os.path.join(out, "grid.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = grid_markdown(report)
    with open(os.path.join(out, "grid.md"), "w") as f:
        f.write(text + "\n")
    report["plot"] = plot_grid(report, os.path.join(out, "grid.png"))
    report["_out"] = out
    return report


# ------------------------------------------------------------------------------ compare


@dataclass
class CompareSettings:
    """The three arms' shared budget and the search's settings; written into every output."""

    mode: str = "full"
    grid: GridSettings = field(default_factory=GridSettings)
    seeds: tuple[int, ...] = (0, 1, 2)
    start_alpha: float = 1.0          # (a): mmcl's default weight
    start_beta: float = 1.0           # (a): the fidelity protocol's weak augmentation
    # (c)'s policy mean at round 1: the box's centre (geometric for alpha), what (b) knows
    # too (it samples the box); at (a)'s beta = 1, the top of the box, half of (c)'s samples
    # were clipped to one point (docs/fidelity.md).
    search_start_alpha: float = 2.0
    search_start_beta: float = 0.5
    # (c)'s sample_opt.reward_views: R's views from mmcl's default augmentation; views at
    # the start's strength made R prefer beta = 1 after one epoch (docs/fidelity.md)
    reward_views: str = "default"
    candidates: int = 4               # B, and (b)'s trials; all run at once in (b) and (c)
    random_trials: int | None = None  # (b)'s trials when not B (the smoke test's: 1)
    rounds: int = 5                   # (c): rounds x 1 epoch = grid.epochs
    sigma_log_alpha: float = 1.0
    sigma_beta: float = 0.3
    policy_lr: float = 2.0
    alpha_box: tuple[float, float] = (0.25, 16.0)
    beta_box: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def quick(cls) -> "CompareSettings":
        """A smoke test: one seed, 2 candidates, 1 round of 1 epoch, 1 random trial; tiny
        data. Its cost is the Ray Train runs (4: a Train run's start-up dwarfs 6 steps of
        training), not the epochs; (b)'s trial count is not its budget here."""
        grid = replace(GridSettings.quick(), epochs=1)
        return cls(mode="quick", grid=grid, seeds=(0,), candidates=2, rounds=1,
                   random_trials=1)

    @property
    def trials_b(self) -> int:
        return self.random_trials or self.candidates


def base_tune_file(seed: int, settings: CompareSettings, folder: str, name: str,
                   start: tuple[float, float] | None = None) -> dict:
    """The run config an arm starts from: the grid's cell at `start` (alpha_weak,
    beta_weak), by default (a)'s point."""
    from mmcl import config as config_mod

    g = settings.grid
    alpha, beta = start or (settings.start_alpha, settings.start_beta)
    cfg = run_config(seed, g, cell_overrides(alpha, beta, g))
    raw = cfg.model_dump(mode="json", exclude_unset=False)
    raw["train"]["epochs"] = g.epochs
    raw["storage"] = {"path": folder, "name": name}
    config_mod.from_dict(raw, source="compare base")  # fails here, not inside Ray
    return raw


def arm_tune_file(arm: str, seed: int, settings: CompareSettings, folder: str) -> dict:
    """The tune file of one arm: 'defaults' (one trial at the start point), 'random'
    (Tune random search over the box) or 'sample_opt'."""
    raw = base_tune_file(seed, settings, folder, arm,
                         (settings.search_start_alpha, settings.search_start_beta)
                         if arm == "sample_opt" else None)
    g = settings.grid
    reward = {"metric": "reward", "eval_batch": g.eval_batch, "seed": seed}
    if arm == "defaults":
        raw["train"]["seed"] = {"tune": "grid", "values": [seed]}
        raw["sweep"] = {**reward, "searcher": "grid", "scheduler": "none"}
    elif arm == "random":
        raw["objective"]["negative_weights"][WEAK] = {
            "tune": "loguniform", "low": settings.alpha_box[0], "high": settings.alpha_box[1]}
        raw["augment"]["per_modality"][WEAK]["noise"] = {
            "tune": "uniform", "low": settings.beta_box[0], "high": settings.beta_box[1]}
        raw["sweep"] = {**reward, "searcher": "random", "scheduler": "none",
                        "num_samples": settings.trials_b,
                        "max_concurrent_trials": settings.trials_b}
    elif arm == "sample_opt":
        raw["sample_opt"] = {
            **reward, "candidates": settings.candidates, "epochs_per_round": 1,
            "rounds": settings.rounds, "modalities": [WEAK], "search": ["alpha", "beta"],
            "sigma": {"log_alpha": settings.sigma_log_alpha, "beta": settings.sigma_beta},
            "lr": settings.policy_lr, "augment_field": "noise",
            "reward_views": settings.reward_views,
            "log_alpha_bounds": [math.log(settings.alpha_box[0]),
                                 math.log(settings.alpha_box[1])],
            "max_concurrent_trials": settings.candidates}
        raw["train"]["epochs"] = settings.rounds
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return raw


class _Embedder:
    """A loaded model in the shape `fidelity.embed_splits` calls (eval, embed)."""

    def __init__(self, model):
        self.model = model

    def eval(self):
        self.model.objective.eval()
        return self

    def embed(self, batch):
        return self.model.embed(batch)


class ArmInterrupted(RuntimeError):
    """An arm's search was cut off (Ctrl-C); rerunning the bench resumes it."""


def stop_if_interrupted(result, arm: str, seed: int) -> None:
    if getattr(result, "interrupted", False):
        raise ArmInterrupted(f"arm {arm} (seed {seed}) was interrupted; run the same bench "
                             f"command again to resume it")


def run_arm(arm: str, seed: int, settings: CompareSettings, folder: str,
            log: Callable[[str], None]) -> dict:
    """Run one arm on the current Ray; probe its final model like a grid cell."""
    import mmcl
    from mmcl.bench.env import load_average
    from mmcl.storage import join
    from mmcl.tune import space
    from mmcl.tune.sample_opt import run_sample_opt
    from mmcl.tune.sweep import run_sweep

    tune_file = space.parse(arm_tune_file(arm, seed, settings, folder),
                            source=f"{arm} (seed {seed})")
    start = time.perf_counter()
    if arm == "sample_opt":
        result = run_sample_opt(tune_file, progress=log)
        stop_if_interrupted(result, arm, seed)
        last = result.state.rounds[-1]
        best = last["candidates"][last["best"]]
        model_url, reward = result.url, best["R"]
        chosen = {"alpha": best["alpha"].get(WEAK), "beta": best["beta"].get(WEAK)}
        extra = {"timing": [r.get("timing") for r in result.state.rounds],
                 "trajectory": [{"round": r["round"], "mu": r["mu_after"],
                                 "R_mean": r["R_mean"]} for r in result.state.rounds]}
    else:
        result = run_sweep(tune_file, progress=log)
        stop_if_interrupted(result, arm, seed)
        best = result.best
        model_url = join(result.url, "runs", f"trial-{best['trial']}")
        reward = best["val_R"]
        params = best["params"]
        chosen = {"alpha": params.get(f"objective.negative_weights.{WEAK}",
                                      settings.start_alpha),
                  "beta": params.get(f"augment.per_modality.{WEAK}.noise",
                                     settings.start_beta)}
        extra = {}
    wall_s = time.perf_counter() - start
    manifest, splits = data_splits(settings.grid.preset, settings.grid.n, seed)
    probes = probe_factors(_Embedder(mmcl.load(model_url)), manifest, splits, settings.grid)
    out = {"arm": arm, "seed": seed, **probes, "R": float(reward), "wall_s": wall_s,
           "load": load_average(), **chosen, "model": model_url, **extra}
    log(f"[sampleopt compare] seed {seed} {arm}: weak {probes['weak_factor']:.3f} shared "
        f"{probes['shared']:.3f} y {probes['y']:.3f} R {reward:.3f} alpha {chosen['alpha']} "
        f"beta {chosen['beta']} ({wall_s:.0f}s)")
    return out


ARMS = ("defaults", "random", "sample_opt")
ARM_TITLES = {"defaults": "(a) defaults", "random": "(b) Ray Tune random search",
              "sample_opt": "(c) sample optimization"}
COMPARE_KEYS = ("weak_factor", "shared", "y", "R", "wall_s")


def summarise_compare(runs: Sequence[dict], grid: dict | None) -> dict:
    """Mean ± std per arm; the goal's three checks (against the grid when one is given)."""
    table = {}
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        table[arm] = {}
        for key in COMPARE_KEYS:
            v = np.asarray([r[key] for r in rows], dtype=np.float64)
            table[arm][key] = {"mean": float(v.mean()),
                               "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                               "n": len(v)}
    checks = {}
    if {"defaults", "sample_opt"} <= set(table):
        a, c = table["defaults"]["weak_factor"], table["sample_opt"]["weak_factor"]
        spread = max(a["std"], c["std"])
        checks["c_beats_a_by_more_than_seed_spread"] = {
            "gain": c["mean"] - a["mean"], "spread": spread,
            "met": c["mean"] - a["mean"] > spread}
    if {"random", "sample_opt"} <= set(table):
        b, c = table["random"]["weak_factor"], table["sample_opt"]["weak_factor"]
        checks["c_at_least_b"] = {"difference": c["mean"] - b["mean"],
                                  "met": c["mean"] >= b["mean"]}
    if grid and "sample_opt" in table:
        threshold = grid["summary"]["top_quarter_threshold"]
        checks["c_in_grid_top_quarter"] = {
            "threshold": threshold, "met": table["sample_opt"]["weak_factor"]["mean"] >=
            threshold}
    timing = [t for r in runs if r["arm"] == "sample_opt" for t in r.get("timing") or []
              if t and math.isfinite(t.get("outside_training_share", float("nan")))]
    rounds = {"rounds": len(timing),
              "outside_training_share_mean": float(np.mean(
                  [t["outside_training_share"] for t in timing])) if timing else float("nan"),
              "round_s_mean": float(np.mean([t["round_s"] for t in timing])) if timing
              else float("nan"),
              "train_s_mean": float(np.mean([t["train_s"] for t in timing])) if timing
              else float("nan"),
              "score_s_mean": float(np.mean([t["score_s"] for t in timing])) if timing
              else float("nan")}
    return {"table": table, "checks": checks, "round_efficiency": rounds}


def compare_markdown(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    g = s["grid"]
    lines = [f"Equal compute on `{g['preset']}` (n={g['n']}, temperature {g['temperature']}, "
             f"seeds {list(s['seeds'])}, mean ± std; probes: test balanced accuracy; R: the "
             f"final model's validation R; wall: the arm on local Ray):", "",
             "| arm | weak factor | shared | y | R (val) | wall s | chosen (alpha_weak, "
             "beta_weak) per seed |", "|---|---:|---:|---:|---:|---:|---|"]
    for arm, cells in summary["table"].items():
        chosen = ", ".join(f"({r['alpha']:.2f}, {r['beta']:.2f})" for r in report["runs"]
                           if r["arm"] == arm)
        lines.append("| " + " | ".join([ARM_TITLES[arm], *[
            f"{cells[k]['mean']:.3f} ± {cells[k]['std']:.3f}" if k != "wall_s" else
            f"{cells[k]['mean']:.0f} ± {cells[k]['std']:.0f}" for k in COMPARE_KEYS],
            chosen]) + " |")
    lines.append("")
    for name, check in summary["checks"].items():
        lines.append(f"- {name.replace('_', ' ')}: {'met' if check['met'] else 'NOT MET'} "
                     f"({', '.join(f'{k} {v:.3f}' for k, v in check.items() if k != 'met')})")
    eff = summary["round_efficiency"]
    lines.append(f"- rounds of (c): {eff['rounds']}, {eff['round_s_mean']:.1f} s each on "
                 f"average, of which training {eff['train_s_mean']:.1f} s (candidates' "
                 f"training time / candidates at once), scoring {eff['score_s_mean']:.1f} s: "
                 f"share outside training {eff['outside_training_share_mean']:.0%}")
    trials_b = s.get("random_trials") or s["candidates"]
    lines.append(f"Budget: (a) one run of {g['epochs']} epochs; (b) {trials_b} trials x "
                 f"{g['epochs']} epochs, all at once; (c) B={s['candidates']} candidates x 1 "
                 f"epoch x {s['rounds']} rounds, all candidates of a round at once. (a) at "
                 f"alpha_weak {s['start_alpha']:g}, beta_weak {s['start_beta']:g}; (c) starts "
                 f"at alpha_weak {s['search_start_alpha']:g}, beta_weak "
                 f"{s['search_start_beta']:g}; box of (b) and (c): alpha_weak in {list(s['alpha_box'])}, beta_weak in "
                 f"{list(s['beta_box'])}; sigma (log alpha, beta) = ({s['sigma_log_alpha']:g}, "
                 f"{s['sigma_beta']:g}), policy lr {s['policy_lr']:g}.")
    lines.append(f"Wall time {report['wall_s']:.0f} s; load average {report['load']}.")
    return "\n".join(lines)


def plot_compare(report: dict, path: str) -> str | None:
    plt = agg_pyplot_or_none()
    if plt is None:
        return None
    table = report["summary"]["table"]
    arms = [a for a in ARMS if a in table]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    x = np.arange(len(arms))
    for ax, keys, title in ((axes[0], ("weak_factor", "shared", "y"), "probe (test)"),
                            (axes[1], ("R",), "R (val)"), (axes[2], ("wall_s",), "wall s")):
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            means = [table[a][key]["mean"] for a in arms]
            stds = [table[a][key]["std"] for a in arms]
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                   label=key)
            for a_i, arm in enumerate(arms):
                ys = [r[key] for r in report["runs"] if r["arm"] == arm]
                ax.scatter([x[a_i] + (i - (len(keys) - 1) / 2) * width] * len(ys), ys, s=8,
                           color="k", zorder=3)
        ax.set_xticks(x, [ARM_TITLES[a].split(" ", 1)[0] for a in arms])
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=8)
            ax.set_ylim(0.4, 1.0)
    grid = report.get("grid")
    if grid:
        axes[0].axhline(grid["summary"]["top_quarter_threshold"], color="0.4", ls="--",
                        lw=1, label="grid top quarter (weak)")
        axes[0].legend(fontsize=8)
    fig.suptitle("(a) defaults, (b) random search, (c) sample optimization: equal compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def start_ray_for(settings: CompareSettings, address: str | None, out: str) -> None:
    """One Ray for every arm, sized for B trials at once: the first arm would otherwise
    start a Ray sized for itself (one trial) and the searches could not run side by side."""
    from mmcl.tune.trial import ensure_ray

    # mmcl.cluster starts local Ray once more when Ray's fixed raylet wait runs out
    ensure_ray(run_config(settings.seeds[0], settings.grid), address, settings.candidates)


def run_compare(quick: bool = False, out: str | None = None,
                settings: CompareSettings | None = None, address: str | None = None,
                log: Callable[[str], None] = print) -> dict:
    """The three arms on every seed, on one Ray (started here unless one is running)."""
    from mmcl.bench.env import load_average

    settings = settings or (CompareSettings.quick() if quick else CompareSettings())
    out = os.path.abspath(out or os.path.join(
        "runs", "bench", "sampleopt-quick" if quick else "sampleopt"))
    os.makedirs(out, exist_ok=True)
    grid_path = os.path.join(out, "grid.json")
    grid = json.load(open(grid_path)) if os.path.exists(grid_path) else None
    start_ray_for(settings, address, out)
    start = time.perf_counter()
    runs = []
    with open(os.path.join(out, "compare_runs.jsonl"), "a") as f:
        for seed in settings.seeds:
            for arm in ARMS:
                row = run_arm(arm, seed, settings, os.path.join(out, "runs", f"seed{seed}"),
                              log)
                runs.append(row)
                f.write(json.dumps(row, default=float) + "\n")
                f.flush()
    return write_compare(out, asdict(settings), runs, grid, time.perf_counter() - start,
                         load_average())


def write_compare(out: str, settings: dict, runs: list[dict], grid: dict | None,
                  wall_s: float, load) -> dict:
    """compare.{json,md,png} in `out` from the arms' rows (compare_runs.jsonl's lines) and
    the grid's report (grid.json; None: no top-quarter check)."""
    report = {"settings": settings, "runs": runs,
              "summary": summarise_compare(runs, grid), "grid": grid and
              {"summary": {k: grid["summary"][k] for k in ("optimum", "top_quarter_threshold",
                                                           "weak_range")}},
              "wall_s": wall_s, "load": load}
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(compare_markdown(report) + "\n")
    report["plot"] = plot_compare(report, os.path.join(out, "compare.png"))
    report["_out"] = out
    return report
