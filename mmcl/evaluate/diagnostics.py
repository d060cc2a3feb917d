"""What each representation holds: probes of every label and latent factor, per embedding kind.

On the controlled data sets (`mmcl data synth`) every true factor is a column (role "factor",
`carried_by` naming the modalities that hold it), so one linear probe per column and per
representation shows what an objective kept: the fused embedding, each modality's own
embedding, and, as the reference of what is linearly there at all, the raw features of each
modality and of all of them together. This is the papers' own way of showing what an
objective captures (CoMM's redundancy / uniqueness / synergy table, FactorCL's shared and
unique probes), run with one protocol for every objective:

    kinds = feature_kinds(arrays, modalities, raw_modalities)   # {"fused": X, "emb:a": X, ...}
    table = probe_columns({"train": tr, "val": va, "test": te}, specs, settings)

Every probe: features standardised with the fitting rows' statistics; logistic regression
(classification) or ridge regression (regression); L2 strength chosen on val (balanced
accuracy / R²), refit on train+val, every metric on test (`mmcl.evaluate.probe.linear_probe`).
Classification columns also get few-label probes (k labelled rows per class, several seeds).

A linear probe measures what is *linearly* decodable: the XOR synergy of `rus` is invisible
to a probe on raw features (near chance) even though the raw features determine it; an
embedding that makes it decodable has learned the interaction.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from mmcl.data.schema import ID_COLUMN, LabelSpec
from mmcl.evaluate.embed import FUSED, modality_column, raw_column
from mmcl.evaluate.knn import knn_probe
from mmcl.evaluate.cache import ProbeCache, probe_key
from mmcl.evaluate.probe import (DEFAULT_L2_GRID, classification_metrics, few_label_probes,
                                 linear_probes, multilabel_metrics, multilabel_probe,
                                 probe_threads, regression_metrics, selection_metric)

FUSED_KIND = "fused"
RAW_ALL = "raw:all"


def emb_kind(modality: str) -> str:
    """The kind name of a modality's own embedding."""
    return f"emb:{modality}"


def raw_kind(modality: str) -> str:
    """The kind name of a modality's raw (flattened) features."""
    return f"raw:{modality}"


def describe_kinds(modalities: Sequence[str], raw_modalities: Sequence[str],
                   projected: Mapping[str, str] | None = None) -> dict[str, str]:
    """{kind: what it is}, in report order."""
    out = {FUSED_KIND: "the model's embedding handed downstream (objective.embed: the fused "
                       "pre-projection tuple embedding; concatenations for cross/FactorCL)"}
    out.update({emb_kind(m): f"modality {m!r}'s own embedding (objective.modality_embeddings)"
                for m in modalities})
    out.update({raw_kind(m): f"modality {m!r}'s raw features, flattened (reference)"
                if m not in (projected or {}) else
                f"modality {m!r}'s raw features: {projected[m]} (reference)"
                for m in raw_modalities})
    if len(raw_modalities) > 1:
        out[RAW_ALL] = "every modality's raw features, concatenated (reference)"
    return out


@dataclass
class ProbeSettings:
    """The probe protocol; written into every report."""

    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    max_iter: int = 100
    few_label_k: tuple[int, ...] = (5, 10, 50)
    few_label_seeds: tuple[int, ...] = (0, 1, 2)
    few_label_kinds: tuple[str, ...] = (FUSED_KIND, RAW_ALL)
    max_rows: int | None = 100_000
    seed: int = 0
    knn_k: int = 20                       # 0: no kNN probe
    knn_temperature: float = 0.07
    retrieval: tuple[str, ...] | None = None   # "a:b" pairs; None: every shared-space pair
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    # same-label retrieval figures by this class label; None: the first classification
    # label of role "label" (none: exact-row figures only)
    retrieval_label: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"

    def __post_init__(self) -> None:
        self.l2_grid = tuple(float(v) for v in self.l2_grid)
        self.few_label_k = tuple(int(k) for k in self.few_label_k)
        self.few_label_seeds = tuple(int(s) for s in self.few_label_seeds)
        self.few_label_kinds = tuple(self.few_label_kinds)
        if not self.l2_grid or min(self.l2_grid) < 0:
            raise ValueError("the L2 grid needs at least one strength >= 0")
        if any(k < 1 for k in self.few_label_k):
            raise ValueError("few-label k must be >= 1 labelled rows per class")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError("max_rows must be >= 1 (or None for all rows)")
        if self.knn_k < 0 or self.knn_temperature <= 0:
            raise ValueError("kNN needs k >= 0 (0: off) and a temperature > 0")
        if self.retrieval is not None:
            self.retrieval = tuple(str(p) for p in self.retrieval)
            bad = [p for p in self.retrieval if len(p.split(":")) != 2 or
                   "" in p.split(":") or len(set(p.split(":"))) != 2]
            if bad:
                raise ValueError(f"retrieval pairs are two different modalities as a:b, got "
                                 f"{bad}")
        self.retrieval_ks = tuple(int(k) for k in self.retrieval_ks)
        if not self.retrieval_ks or min(self.retrieval_ks) < 1:
            raise ValueError("retrieval k must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocol"] = (
            f"features standardised with the fitting rows' mean/std; logistic regression "
            f"(L-BFGS, float64) for classification, ridge regression (exact) for regression; "
            f"L2 strength from l2_grid chosen on '{self.val_split}' (balanced accuracy / R2, "
            f"ties to the stronger penalty), refit on '{self.train_split}'+'{self.val_split}', "
            f"every metric on '{self.test_split}'")
        d["few_label_protocol"] = (
            f"classification labels (role 'label') only: k labelled rows per class drawn (seeded) from "
            f"'{self.train_split}' and k per class from '{self.val_split}' (the L2 is chosen on "
            f"those), refit on both, scored on all of '{self.test_split}'; mean and sample std "
            f"over few_label_seeds")
        d["knn_protocol"] = (
            f"classification columns: L2-normalised features, the {self.knn_k} nearest "
            f"'{self.train_split}'+'{self.val_split}' rows by cosine similarity vote with "
            f"weight exp(s / {self.knn_temperature:g}) (InstDisc / solo-learn); every metric "
            f"on '{self.test_split}'")
        d["max_rows_note"] = ("at most max_rows rows per split (a seeded sample, taken in id "
                              "order) enter the probes")
        return d


# ---------------------------------------------------------------------------- features


def feature_kinds(arrays: Mapping[str, np.ndarray], modalities: Sequence[str],
                  raw_modalities: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """{kind: (N, D) features} of one split read from an embedding output."""
    out = {FUSED_KIND: arrays[FUSED]}
    for m in modalities:
        out[emb_kind(m)] = arrays[modality_column(m)]
    raws = []
    for m in raw_modalities:
        x = np.asarray(arrays[raw_column(m)])
        out[raw_kind(m)] = x.reshape(len(x), -1)
        raws.append(out[raw_kind(m)])
    if len(raws) > 1:
        out[RAW_ALL] = np.concatenate(raws, axis=1)
    return out


def subsample(arrays: Mapping[str, np.ndarray], max_rows: int | None,
              seed: int = 0) -> dict[str, np.ndarray]:
    """At most `max_rows` rows (a seeded choice over rows sorted by id: the same rows whatever
    order the files were written in)."""
    ids = np.asarray(arrays[ID_COLUMN])
    order = np.argsort(ids, kind="stable")
    if max_rows is not None and len(ids) > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(ids), max_rows, replace=False))
        order = order[pick]
    elif np.all(order == np.arange(len(ids))):
        return dict(arrays)
    return {k: np.asarray(v)[order] for k, v in arrays.items()}


# -------------------------------------------------------------------------------- probes


def primary_metric(spec: LabelSpec) -> str:
    """The one number per cell of the summary tables (the metric L2 is selected on)."""
    return selection_metric(spec.task)


def chance(spec: LabelSpec, y_fit: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Metrics of a probe that ignores its input: the majority class of the fitting rows
    (classification; balanced accuracy 1/C) or their mean (regression; R² <= 0)."""
    y_fit, y_test = np.asarray(y_fit), np.asarray(y_test)
    if spec.task == "multilabel":   # every class scored with its train+val prevalence
        return multilabel_metrics(y_test, np.broadcast_to(y_fit.mean(axis=0), y_test.shape))
    if spec.task == "classification":
        values, counts = np.unique(y_fit, return_counts=True)
        majority = values[np.argmax(counts)] if len(values) else 0
        return classification_metrics(y_test, np.full(len(y_test), majority))
    return regression_metrics(y_test, np.full(len(y_test), float(np.mean(y_fit))
                                              if len(y_fit) else 0.0))


def carried(spec: LabelSpec, kind: str) -> bool | None:
    """Whether the generator put this column's information into the modality behind `kind`
    (None when the data set does not say, or for kinds that see every modality)."""
    if not spec.carried_by or not (kind.startswith("emb:") or kind.startswith("raw:")) \
            or kind == RAW_ALL:
        return None
    return kind.split(":", 1)[1] in spec.carried_by


def probe_columns(splits: Mapping[str, Mapping[str, np.ndarray]], specs: Sequence[LabelSpec],
                  kinds: Mapping[str, Mapping[str, np.ndarray]],
                  settings: ProbeSettings | None = None,
                  progress: Callable[[str], None] | None = None,
                  cache: "ProbeCache | None" = None) -> dict[str, dict]:
    """Probe every column of `specs` with every feature kind.

    `splits` maps split name -> {column: (N,) targets} (train/val/test of `settings`);
    `kinds` maps split name -> {kind: (N, D) features}, rows aligned with `splits`.
    `cache` (mmcl.evaluate.cache.ProbeCache): the raw-feature kinds' results are read from it
    when their content key is there and written to it otherwise (they do not depend on the
    run). Returns {column: {"role", "task", "num_classes", "carried_by", "description",
    "primary_metric", "chance": {...}, "probes": {kind: {metric..., "l2", ...}},
    "carried": {kind: bool}, "few_label": {kind: {k: {metric: {"mean", "std", "n"}}}},
    "knn": {kind: {accuracy, balanced_accuracy, macro_f1, k, temperature}}}}.
    """
    settings = settings or ProbeSettings()
    tr, va, te = settings.train_split, settings.val_split, settings.test_split
    for name in (tr, va, te):
        if name not in splits or name not in kinds:
            raise ValueError(f"probe_columns needs the {name!r} split")
    kind_names = list(kinds[tr])
    out: dict[str, dict] = {}
    ys = {spec.name: {s: np.asarray(splits[s][spec.name]) for s in (tr, va, te)}
          for spec in specs}
    for spec in specs:
        y = ys[spec.name]
        out[spec.name] = {"role": spec.role, "task": spec.task,
                          "num_classes": spec.num_classes, "carried_by": list(spec.carried_by),
                          "description": spec.description, "primary_metric": primary_metric(spec),
                          "chance": chance(spec, np.concatenate([y[tr], y[va]]), y[te]),
                          "probes": {}, "carried": {}, "few_label": {}, "knn": {}}
    bar = _progress_bar(len(kind_names))
    try:
        for i, kind in enumerate(kind_names):
            x = {s: kinds[s][kind] for s in (tr, va, te)}
            key = None
            if cache is not None and kind.startswith("raw:"):
                key = probe_key(x, {s: splits[s][ID_COLUMN] for s in (tr, va, te)
                                    if ID_COLUMN in splits[s]}, ys, specs,
                                _cache_settings(settings, kind))
            found = cache.get(key) if key else None
            note = " (cached)" if found is not None else ""
            if progress and bar is None:
                progress(f"[mmcl]   {kind} ({i + 1}/{len(kind_names)}): {len(specs)} "
                         f"columns{note}")
            if bar is not None:
                bar.set_description(f"probing {kind}{note}")
            if found is None:
                # probe-sized problems on one torch thread (see probe_threads)
                with probe_threads(len(x[tr]) + len(x[va]),
                                   int(np.prod(np.shape(x[tr])[1:]))):
                    result = _probe_kind(kind, x, ys, specs, settings)
            else:
                result = found
            if key and found is None:
                cache.put(key, result)
            for spec in specs:
                entry, part = out[spec.name], result.get(spec.name, {})
                for section in ("probes", "knn", "few_label"):
                    if kind in part.get(section, {}):
                        entry[section][kind] = part[section][kind]
                flag = carried(spec, kind)
                if flag is not None:
                    entry["carried"][kind] = flag
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _cache_settings(settings: ProbeSettings, kind: str) -> dict:
    """The settings that change a kind's probes (and whether it gets few-label probes)."""
    return {"l2_grid": settings.l2_grid, "max_iter": settings.max_iter,
            "few_label": [settings.few_label_k, settings.few_label_seeds,
                          kind in settings.few_label_kinds],
            "knn": [settings.knn_k, settings.knn_temperature]}


def _progress_bar(total: int):
    """A tqdm bar over the representations when stderr is a terminal (the console's rule:
    in logs, bars become pages of carriage returns; there the per-kind lines are the
    progress)."""
    from mmcl.train.console import show_bar

    if not show_bar():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="representation", leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _probe_kind(kind: str, x: Mapping[str, np.ndarray], ys: Mapping[str, Mapping],
                specs: Sequence[LabelSpec], settings: ProbeSettings) -> dict[str, dict]:
    """Every probe of one representation: {column: {"probes": {kind: ...}, "knn": {kind:
    ...}, "few_label": {kind: ...}}} (JSON-able: the cache stores it as it is)."""
    tr, va, te = settings.train_split, settings.val_split, settings.test_split
    out: dict[str, dict] = {spec.name: {"probes": {}, "knn": {}, "few_label": {}}
                            for spec in specs}
    by_task: dict[str, list[LabelSpec]] = {}
    for spec in specs:
        by_task.setdefault(spec.task, []).append(spec)
    for g in by_task.get("multilabel", []):   # (N, K) multi-hot: one-vs-rest heads
        out[g.name]["probes"][kind] = multilabel_probe(
            x[tr], ys[g.name][tr], x[va], ys[g.name][va], x[te], ys[g.name][te],
            settings.l2_grid, settings.max_iter).to_dict()
    for task, group in by_task.items():
        if task == "multilabel":
            continue
        # every column of a task on these features: one joint fit (linear_probes)
        results = linear_probes(
            x[tr], {g.name: ys[g.name][tr] for g in group},
            x[va], {g.name: ys[g.name][va] for g in group},
            x[te], {g.name: ys[g.name][te] for g in group}, task,
            {g.name: g.num_classes for g in group}, settings.l2_grid, settings.max_iter)
        for g in group:
            out[g.name]["probes"][kind] = results[g.name].to_dict()
    for spec in by_task.get("classification", []):
        if settings.knn_k:
            y = ys[spec.name]
            out[spec.name]["knn"][kind] = knn_probe(x[tr], y[tr], x[va], y[va], x[te], y[te],
                                                    spec.num_classes, settings.knn_k,
                                                    settings.knn_temperature)
    few = [s for s in by_task.get("classification", []) if s.role == "label"]
    if few and kind in settings.few_label_kinds and settings.few_label_k \
            and settings.few_label_seeds:
        # every label column x k x seed of these features: one joint fit (few_label_probes)
        results = few_label_probes(
            x[tr], {s.name: ys[s.name][tr] for s in few},
            x[va], {s.name: ys[s.name][va] for s in few},
            x[te], {s.name: ys[s.name][te] for s in few},
            settings.few_label_k, settings.few_label_seeds,
            {s.name: s.num_classes for s in few}, settings.l2_grid, settings.max_iter)
        for s in few:
            out[s.name]["few_label"][kind] = {str(k): v for k, v in results[s.name].items()}
    return out


def raw_feature_probes(arrays: Mapping[str, Mapping[str, np.ndarray]],
                       specs: Sequence[LabelSpec], modalities: Sequence[str],
                       settings: ProbeSettings | None = None) -> dict[str, dict]:
    """Probes of raw features only (each modality and all together), straight from in-memory
    splits of a data set ({split: {column: array}}, e.g. `read_split` or `synth.make_arrays`
    cut into splits): what the generator put where, with no model involved."""
    settings = settings or ProbeSettings(few_label_k=())
    kinds = {}
    for split, cols in arrays.items():
        feats = {raw_kind(m): np.asarray(cols[m]).reshape(len(cols[m]), -1) for m in modalities}
        if len(modalities) > 1:
            feats[RAW_ALL] = np.concatenate([feats[raw_kind(m)] for m in modalities], axis=1)
        kinds[split] = feats
    return probe_columns(arrays, specs, kinds, settings)


def primary_table(results: Mapping[str, dict]) -> dict[str, dict[str, float]]:
    """{column: {kind: primary metric on test}}: the diagnostics table in numbers."""
    return {col: {kind: probe[entry["primary_metric"]] for kind, probe in entry["probes"].items()}
            for col, entry in results.items()}

