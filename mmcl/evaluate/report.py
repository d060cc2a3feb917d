"""`mmcl eval` and `mmcl report`: from trained runs to tables (and plots) a person reads.

    evaluate_run(run)                embed every split (Ray Data; `use_ray=False`: in
                                     process), probe every label and factor with every
                                     representation, write RUN/eval/report.json + report.md
    evaluate_runs([run1, run2, ...]) the same per run, plus mean ± std over the runs (seeds)
    compare(report_paths, out)       `mmcl report`: runs side by side (markdown) and PNG plots

report.json (one run):
    format, kind="run", name, run, objective, objective_config, seed, epochs, data, rows,
    embedding {out, backend, columns}, representations {kind: description},
    settings {l2_grid, max_iter, few_label_k, few_label_seeds, few_label_kinds, max_rows,
              protocol, ...},
    labels  {column: entry}       columns of role "label" (the tasks)
    factors {column: entry}       columns of role "factor" (controlled data's latents)
    final_metrics {last line of metrics.jsonl}, elapsed_s, created
  entry = {role, task, num_classes, carried_by, description, primary_metric,
           chance {metric: value},
           probes {kind: {accuracy, balanced_accuracy, macro_f1 | mse, mae, r2, l2,
                          train_rows, val_score_by_l2}},
           carried {kind: bool},  few_label {kind: {k: {metric: {mean, std, n}}}}}
The several-run report (kind="seeds") has the same shape; every metric is {mean, std, n,
values} over the runs (few-label: over the runs' means).
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from mmcl.markdown import table
from mmcl.plotting import agg_pyplot
from mmcl import storage
from mmcl.data.schema import LabelSpec
from mmcl.evaluate import diagnostics as diag
from mmcl.evaluate.cache import CACHE_DIR, ProbeCache
from mmcl.evaluate.embed import (EmbedError, RunInfo, embed_run, read_embeddings, read_meta,
                                 read_run, shared_column)
from mmcl.evaluate.probe import mean_std

FORMAT = 1
EVAL_DIR = "eval"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
PARTS = ("probe", "retrieval")    # what `mmcl eval --only` may pick
META_KEYS = ("role", "task", "num_classes", "carried_by", "description", "primary_metric")
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
                "macro_f1": "macro-F1", "mse": "MSE", "mae": "MAE", "r2": "R²",
                "micro_f1": "micro-F1", "map": "mAP"}
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
REGRESSION_METRICS = ("mse", "mae", "r2")
MULTILABEL_METRICS = ("micro_f1", "macro_f1", "map")


class ReportError(EmbedError):
    """A report cannot be made as asked; the message says what to do."""


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress:
        progress(text)


# ----------------------------------------------------------------------------- files


def read_history(run_url: str, endpoint_url=None, region=None) -> list[dict]:
    """The epochs of metrics.jsonl of a run folder ([] when there is none)."""
    fs, path = storage.filesystem(run_url, endpoint_url, region)
    file = storage.join(path, "metrics.jsonl")
    if not fs.exists(file):
        return []
    rows = []
    for line in fs.cat_file(file).decode().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _clean(value):
    """JSON without NaN (written as null) and with plain Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_report(report: dict, folder: str, endpoint_url=None, region=None) -> tuple[str, str]:
    """report.json and report.md into `folder`; returns their paths."""
    json_url, md_url = storage.join(folder, REPORT_JSON), storage.join(folder, REPORT_MD)
    storage.write_text(json_url, json.dumps(_clean(report), indent=2) + "\n", endpoint_url,
                       region)
    storage.write_text(md_url, format_markdown(report), endpoint_url, region)
    return json_url, md_url


def find_report(path: str) -> str:
    """The report.json behind a path: the file itself, FOLDER/report.json (an eval folder or a
    several-run folder) or RUN/eval/report.json."""
    fs, p = storage.filesystem(path)
    for candidate in (p, storage.join(p, REPORT_JSON), storage.join(p, EVAL_DIR, REPORT_JSON)):
        if candidate.endswith(".json") and fs.isfile(candidate):
            return candidate
    raise ReportError(f"no evaluation report at {path}: expected {path}/{EVAL_DIR}/"
                      f"{REPORT_JSON}. Run `mmcl eval --run {path}` first")


def load_report(path: str) -> dict:
    file = find_report(path)
    fs, p = storage.filesystem(file)
    try:
        report = json.loads(fs.cat_file(p).decode())
    except json.JSONDecodeError as err:
        raise ReportError(f"{file} is not valid JSON ({err}); rerun `mmcl eval`") from None
    if not isinstance(report, dict) or "labels" not in report or "factors" not in report:
        raise ReportError(f"{file} is not an mmcl evaluation report; rerun `mmcl eval`")
    report.setdefault("_path", file)
    return report


# ------------------------------------------------------------------------------ eval


def evaluate_run(run: str, data: str | None = None, *,
                 settings: diag.ProbeSettings | None = None, use_ray: bool | None = None,
                 address: str | None = None, concurrency: int | None = None,
                 batch_size: int = 1024, use_gpu: bool | None = None,
                 progress: Callable[[str], None] | None = None,
                 endpoint_url: str | None = None, region: str | None = None,
                 probe_cache: bool = True, trust_plugins: bool = False,
                 only: str | None = None, verbose: bool = False) -> dict:
    """Embed, probe and diagnose one run; writes RUN/eval/{embeddings/,report.json,report.md}
    (never through a symbolic link: storage.check_inside) and returns the report.
    `trust_plugins`: see mmcl.load. `endpoint_url`/`region`: S3 endpoint of the run (default:
    the run's storage block, then the AWS environment). `probe_cache`: read and write the
    raw-feature probes in the cache beside the run (`probe_cache_folder`; they are the same
    for every run of a data set and settings, see mmcl.evaluate.cache). `use_ray`: embed on
    Ray Data (True), in this process (False), or in this process when the splits are small
    (None, embed.fits_in_process). `only`: "probe" (the linear, kNN and few-label probes,
    no retrieval) or "retrieval" (the test split only: no probes, no raw features); None:
    both. `verbose`: Ray's own output too."""
    start = time.perf_counter()
    if only is not None and only not in PARTS:
        raise ReportError(f"--only takes one of {list(PARTS)}, got {only!r}")
    probing, retrieving = only in (None, "probe"), only in (None, "retrieval")
    settings = settings or diag.ProbeSettings()
    info = read_run(run, endpoint_url, region)
    check_retrieval_pairs(settings, info.manifest.modality_names)
    remote = info.remote_with(endpoint_url, region)
    folder = storage.join(info.url, EVAL_DIR)
    emb_out = storage.join(folder, "embeddings")
    storage.check_inside(folder, info.url)
    splits = [settings.train_split, settings.val_split, settings.test_split] if probing \
        else [settings.test_split]
    how = {True: " (Ray Data)", False: " (in process)", None: ""}[use_ray]
    _say(progress, f"[mmcl] {info.name}: embedding {', '.join(splits)}{how} -> {emb_out}")
    embedded = embed_run(info.url, emb_out, data, splits, use_ray=use_ray, address=address,
                         concurrency=concurrency, batch_size=batch_size, use_gpu=use_gpu,
                         raw=probing, overwrite=True, trust_plugins=trust_plugins,
                         verbose=verbose, **remote)
    if use_ray is None:
        _say(progress, f"[mmcl] {info.name}: embedded {sum(embedded.rows.values())} tuples "
                       f"{embedded.backend} in {embedded.elapsed_s:.1f}s")
    meta = read_meta(emb_out, **remote)
    specs = [LabelSpec(**lab) for lab in meta["labels"]]
    if not specs and probing:
        raise ReportError(f"the data set at {embedded.data} has no label or factor columns: "
                          "nothing to probe. Add labels (mmcl data convert takes 1-D arrays)")
    modalities, raws = meta["modalities"], meta["raw"]
    arrays, kinds, rows = {}, {}, {}
    for split in splits if probing else ():
        part = diag.subsample(read_embeddings(emb_out, split, **remote), settings.max_rows,
                              settings.seed)
        if len(part["id"]) == 0:
            raise ReportError(f"split {split!r} of {embedded.data} is empty: probes need "
                              "train, val and test rows")
        arrays[split] = part
        kinds[split] = diag.feature_kinds(part, modalities, raws)
        rows[split] = int(len(part["id"]))
    results, retrieval = {}, None
    if probing:
        _say(progress, f"[mmcl] {info.name}: probing {len(specs)} columns x "
                       f"{len(kinds[splits[0]])} representations")
        cache = ProbeCache(probe_cache_folder(info.url), **remote) if probe_cache else None
        results = diag.probe_columns(arrays, specs, kinds, settings, progress, cache)
        if cache is not None and cache.hits:
            _say(progress, f"[mmcl] {info.name}: {cache.hits} raw-feature representation(s) "
                           f"from the probe cache {cache.folder}")
    else:
        rows = {settings.test_split: int(embedded.rows.get(settings.test_split, 0))}
    if retrieving:
        _say(progress, f"[mmcl] {info.name}: retrieval on {settings.test_split}")
        retrieval = retrieval_section(emb_out, settings, modalities, embedded.dims,
                                      info.config.objective.name, remote,
                                      retrieval_label(settings, specs))
    history = read_history(info.url, **remote)
    cfg = info.config
    report = {
        "format": FORMAT, "kind": "run", "name": info.name, "run": info.url,
        "objective": cfg.objective.name,
        "objective_config": cfg.objective.model_dump(mode="json"),
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.train.seed, "epochs": cfg.train.epochs, "data": embedded.data,
        "rows": rows, "rows_embedded": embedded.rows,
        "embedding": {"out": emb_out, "backend": embedded.backend,
                      "columns": embedded.dims},
        "representations": diag.describe_kinds(modalities, raws,
                                               meta.get("raw_projected")),
        "settings": {**settings.to_dict(), "only": only},
        "labels": {k: v for k, v in results.items() if v["role"] != "factor"},
        "factors": {k: v for k, v in results.items() if v["role"] == "factor"},
        "retrieval": retrieval,
        "final_metrics": history[-1] if history else {},
        "elapsed_s": time.perf_counter() - start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    json_url, md_url = write_report(report, folder, **remote)
    report["_path"] = json_url
    _say(progress, f"[mmcl] {info.name}: wrote {json_url} and {md_url} "
                   f"({report['elapsed_s']:.1f}s)")
    return report


def probe_cache_folder(run_url: str) -> str:
    """Where a run's raw-feature probes are cached: beside the run, in the user's own
    storage (STORAGE_PATH/_probe_cache), shared by the runs stored there."""
    return storage.join(run_url.rstrip("/").rsplit("/", 1)[0], CACHE_DIR)


def check_retrieval_pairs(settings: diag.ProbeSettings, modalities: Sequence[str]) -> None:
    """Every modality named in --retrieval a:b is one the run was trained on."""
    unknown = sorted({m for pair in settings.retrieval or () for m in pair.split(":")}
                     - set(modalities))
    if unknown:
        raise ReportError(f"--retrieval names modalities {unknown} the run does not have "
                          f"(it has {list(modalities)})")


def retrieval_label(settings: diag.ProbeSettings, specs: Sequence[LabelSpec]) -> str | None:
    """The class label of the same-label retrieval figures: the one asked for, else the
    first classification label of role "label" (None: there is none)."""
    classes = [s for s in specs if s.task == "classification"]
    if settings.retrieval_label is not None:
        if settings.retrieval_label not in [s.name for s in classes]:
            raise ReportError(f"retrieval label {settings.retrieval_label!r} is not a "
                              f"classification label of the data (those are "
                              f"{[s.name for s in classes]})")
        return settings.retrieval_label
    return next((s.name for s in classes if s.role == "label"), None)


def retrieval_section(emb_out: str, settings: diag.ProbeSettings, modalities: Sequence[str],
                      columns: Mapping[str, int], objective: str, remote: Mapping,
                      label: str | None = None) -> dict:
    """Recall@k and median rank, both ways, for every asked pair (default: every pair of
    modalities the objective puts in one space), over the whole test split in chunks; with
    a class `label`, same-label recall@k and mAP beside them. Tuples lacking a modality are
    left out of that pair. Pairs without a shared space are listed, with the reason, instead
    of scored."""
    from itertools import combinations

    from mmcl.evaluate.retrieval import retrieval_from_parquet

    shared = [m for m in modalities if shared_column(m) in columns]
    asked = list(settings.retrieval) if settings.retrieval is not None else \
        [f"{a}:{b}" for a, b in combinations(modalities, 2)]
    out: dict = {"split": settings.test_split, "ks": list(settings.retrieval_ks),
                 "pairs": {}, "no_shared_space": [],
                 "protocol": "each query ranks every test tuple's other modality by dot "
                             "product in the objective's shared space (cosine where the loss "
                             "is cosine); rank = 1 + rows scoring strictly higher; chance "
                             "recall@k = k/N, median rank (N+1)/2 (N: the gallery); "
                             "all test rows (no max_rows sample); a tuple lacking either "
                             "modality is no query, and no gallery item where it lacks the "
                             "gallery's modality"
                             + (f"; same label ({label}): a query is found at k when an "
                                f"item of its {label} is in the top k; mAP: mean average "
                                "precision with the items of its label as relevant"
                                if label else "")}
    if label:
        out["label"] = label
    for pair in asked:
        a, b = pair.split(":")
        if a in shared and b in shared:
            out["pairs"][pair] = retrieval_from_parquet(emb_out, settings.test_split, a, b,
                                                        settings.retrieval_ks, **remote,
                                                        label=label)
        else:
            out["no_shared_space"].append(pair)
    if out["no_shared_space"]:
        out["no_shared_space_reason"] = (
            f"objective {objective!r} defines no embedding space shared by these modalities "
            "(its shared_embeddings is empty for them): tuple_infonce, tuple and supcon "
            "compare fused tuples only (their fusion never sees one modality alone); "
            "factorcl with the concat critic scores pairs with an MLP, not vectors")
    return out


def config_differences(infos: Sequence[RunInfo]) -> list[str]:
    """Config fields (dotted) that differ between runs, seeds and names aside."""
    ignore = {"train.seed", "storage.name", "data.synth.seed"}

    def flat(d: Mapping, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                out.update(flat(v, key + "."))
            else:
                out[key] = json.dumps(v, sort_keys=True, default=str)
        return out

    flats = [flat(i.config.model_dump(mode="json")) for i in infos]
    keys = sorted(set().union(*flats))
    return [k for k in keys if k not in ignore and len({f.get(k) for f in flats}) > 1]


def evaluate_runs(runs: Sequence[str], data: str | None = None, *, out: str | None = None,
                  progress: Callable[[str], None] | None = None,
                  endpoint_url: str | None = None, region: str | None = None,
                  **kwargs) -> tuple[list[dict], dict | None]:
    """`evaluate_run` for each run; with several runs also their mean ± std, written to `out`
    (default: FIRST_RUN/eval/seeds). Returns (per-run reports, several-run report or None)."""
    if not runs:
        raise ReportError("name at least one run folder (--run RUN [RUN ...])")
    # every run checked before any work starts
    infos = [read_run(r, endpoint_url, region) for r in runs]
    if len({i.url for i in infos}) != len(infos):
        raise ReportError("the same run is named twice; name each run once")
    reports = [evaluate_run(i.url, data, progress=progress, endpoint_url=endpoint_url,
                            region=region, **kwargs) for i in infos]
    if len(reports) == 1:
        return reports, None
    differences = config_differences(infos)
    if differences:
        _say(progress, "[mmcl] warning: these runs differ in more than their seeds ("
                       + ", ".join(differences[:8]) + ("..." if len(differences) > 8 else "")
                       + "); the mean ± std mixes them")
    combined = aggregate(reports)
    combined["config_differences"] = differences
    folder = out or storage.join(infos[0].url, EVAL_DIR, "seeds")
    if out is None:
        storage.check_inside(folder, infos[0].url)
    json_url, md_url = write_report(combined, folder, **infos[0].remote_with(endpoint_url, region))
    combined["_path"] = json_url
    _say(progress, f"[mmcl] mean ± std over {len(reports)} runs: wrote {json_url} and {md_url}")
    return reports, combined


# ---------------------------------------------------------------------------- seeds


def _stats(values: Sequence) -> dict:
    vals = [float(v) for v in values if isinstance(v, (int, float, np.number))
            and v is not None and math.isfinite(float(v))]
    out = mean_std(vals)
    out["values"] = [float(v) if v is not None else None for v in values]
    return out


def _numbers(d: Mapping) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _agg_entry(entries: Sequence[dict]) -> dict:
    base = entries[0]
    out = {k: base.get(k) for k in META_KEYS}
    out["carried"] = dict(base.get("carried", {}))
    out["chance"] = {m: _stats([e["chance"].get(m) for e in entries])
                     for m in _numbers(base["chance"])}
    out["probes"] = {}
    for kind, probe in base["probes"].items():
        if not all(kind in e["probes"] for e in entries):
            continue
        out["probes"][kind] = {m: _stats([e["probes"][kind].get(m) for e in entries])
                               for m in _numbers(probe) if m != "train_rows"}
        out["probes"][kind]["train_rows"] = probe.get("train_rows")
    out["few_label"] = {}
    for kind, by_k in base.get("few_label", {}).items():
        out["few_label"][kind] = {}
        for k, metrics in by_k.items():
            if not all(k in e.get("few_label", {}).get(kind, {}) for e in entries):
                continue
            out["few_label"][kind][k] = {
                m: _stats([e["few_label"][kind][k][m]["mean"] for e in entries])
                for m in metrics}
    return out


def _agg_retrieval(reports: Sequence[dict]) -> dict | None:
    """Retrieval figures as mean ± std over the runs (pairs every run has)."""
    parts = [r.get("retrieval") for r in reports]
    if not all(parts):
        return None
    base = parts[0]
    out = {k: v for k, v in base.items() if k != "pairs"}
    out["pairs"] = {}
    for pair, res in base.get("pairs", {}).items():
        if not all(pair in p.get("pairs", {}) for p in parts):
            continue
        entry = {"modalities": res.get("modalities"), "n": res.get("n")}
        for d, fig in res.items():
            if isinstance(fig, Mapping):
                entry[d] = {m: (_stats([p["pairs"][pair][d][m] for p in parts])
                                if not m.startswith("chance") else v) for m, v in fig.items()}
        out["pairs"][pair] = entry
    return out


def aggregate(reports: Sequence[dict]) -> dict:
    """Mean ± sample std over runs of every metric (columns and kinds all runs share)."""
    base = reports[0]
    out = {"format": FORMAT, "kind": "seeds", "name": " + ".join(r["name"] for r in reports),
           "runs": [r["run"] for r in reports], "names": [r["name"] for r in reports],
           "seeds": [r.get("seed") for r in reports],
           "objective": base["objective"] if len({r["objective"] for r in reports}) == 1
           else [r["objective"] for r in reports],
           "objective_config": base.get("objective_config"), "config": base.get("config"),
           "rows_embedded": base.get("rows_embedded"), "retrieval": _agg_retrieval(reports),
           "epochs": base.get("epochs"), "data": base["data"], "rows": base["rows"],
           "representations": base["representations"], "settings": base["settings"]}
    for section in ("labels", "factors"):
        out[section] = {col: _agg_entry([r[section][col] for r in reports])
                        for col in base[section] if all(col in r[section] for r in reports)}
    finals = [r.get("final_metrics", {}) for r in reports]
    out["final_metrics"] = {m: _stats([f.get(m) for f in finals])
                            for m in _numbers(finals[0]) if m not in ("epoch", "step", "steps")}
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return out


# -------------------------------------------------------------------------- markdown


def cell(value, digits: int = 3) -> str:
    """A table cell: a number, or mean ± std of a {mean, std} dict; '–' when missing."""
    if isinstance(value, Mapping):
        mean, std = value.get("mean"), value.get("std")
        if mean is None or not math.isfinite(mean):
            return "–"
        if std is None or not math.isfinite(std) or value.get("n", 2) < 2 and std == 0:
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    if value is None or isinstance(value, bool):
        return "–"
    if isinstance(value, (int, float, np.number)):
        return f"{float(value):.{digits}f}" if math.isfinite(float(value)) else "–"
    return str(value)


def _value(d: Mapping | None, metric: str):
    return None if d is None else d.get(metric)


def _spread_note(report: dict) -> str:
    if report.get("kind") == "seeds":
        return f"mean ± std over {len(report['runs'])} runs (seeds {report.get('seeds')})"
    return "one run"


def _labels_tables(report: dict) -> list[str]:
    parts = []
    labels = report["labels"]
    for task, metrics in (("classification", CLASSIFICATION_METRICS),
                          ("regression", REGRESSION_METRICS),
                          ("multilabel", MULTILABEL_METRICS)):
        cols = {c: e for c, e in labels.items() if e["task"] == task}
        if not cols:
            continue
        ref = diag.RAW_ALL if any(diag.RAW_ALL in e["probes"] for e in cols.values()) else None
        primary = diag.selection_metric(task)
        header = ["label", *[METRIC_NAMES[m] for m in metrics],
                  f"chance ({METRIC_NAMES[primary]})"]
        if ref:
            header.append(f"raw features ({METRIC_NAMES[primary]})")
        rows = []
        for col, e in cols.items():
            fused = e["probes"].get(diag.FUSED_KIND, {})
            row = [col, *[cell(fused.get(m)) for m in metrics], cell(e["chance"].get(primary))]
            if ref:
                row.append(cell(_value(e["probes"].get(ref), primary)))
            rows.append(row)
        parts.append(table(header, rows))
    return parts


def _few_label_table(report: dict) -> str | None:
    rows = []
    ks: list[str] = []
    for col, e in report["labels"].items():
        for kind, by_k in e.get("few_label", {}).items():
            ks = ks or list(by_k)
            full = e["probes"].get(kind, {}).get("balanced_accuracy")
            rows.append([col, kind, *[cell(by_k[k].get("balanced_accuracy")) for k in ks],
                         cell(full)])
    if not rows:
        return None
    return table(["label", "representation", *[f"k={k}" for k in ks], "all labels"], rows)


def _diagnostics_table(report: dict) -> str | None:
    columns = {**report["labels"], **report["factors"]}
    if not columns:
        return None
    kinds = list(report.get("representations") or
                 next(iter(columns.values()))["probes"].keys())
    header = ["column", "role", "metric", "carried by", "chance", *kinds]
    rows = []
    for col, e in columns.items():
        metric = e["primary_metric"]
        cells = []
        for kind in kinds:
            text = cell(_value(e["probes"].get(kind), metric))
            if e.get("carried", {}).get(kind):
                text += " ◆"
            cells.append(text)
        rows.append([col, e["role"], METRIC_NAMES.get(metric, metric),
                     " ".join(e["carried_by"]) or "–", cell(e["chance"].get(metric)), *cells])
    return table(header, rows)


def _retrieval_rows(retrieval: Mapping | None) -> list[list[str]]:
    """One row per direction: pair, direction, recall@k (chance k/N), median rank (chance)."""
    rows = []
    for pair, r in (retrieval or {}).get("pairs", {}).items():
        a, b = r.get("modalities", pair.split(":"))
        for q, g in ((a, b), (b, a)):
            d = r[f"{q}_to_{g}"]
            ks = [k for k in (retrieval.get("ks") or [1, 5, 10])]
            row = [f"{q} → {g}", str(r.get("n", "–")),
                   *[f"{cell(d.get(f'recall@{k}'))} ({cell(d.get(f'chance@{k}'), 4)})"
                     for k in ks],
                   f"{cell(d.get('median_rank'), 1)} ({cell(d.get('chance_median_rank'), 1)})"]
            if retrieval.get("label"):
                row += [*[cell(d.get(f"label_recall@{k}")) for k in ks],
                        f"{cell(d.get('label_mAP'))} ({cell(d.get('label_chance@1'))})"]
            rows.append(row)
    return rows


def _retrieval_lines(report: dict) -> list[str]:
    retrieval = report.get("retrieval")
    if not retrieval:
        return []
    ks = retrieval.get("ks") or [1, 5, 10]
    lines = [f"## Cross-modal retrieval ({retrieval.get('split', 'test')} split)", ""]
    rows = _retrieval_rows(retrieval)
    if rows:
        lines += ["Recall@k and median rank, chance in brackets (k/N; (N+1)/2): "
                  + retrieval.get("protocol", ""), "",
                  table(["query → gallery", "N", *[f"R@{k}" for k in ks], "median rank",
                         *([*[f"same {retrieval['label']} R@{k}" for k in ks],
                            "mAP (chance)"] if retrieval.get("label") else [])],
                        rows), ""]
        if any(r.get("absent") for r in retrieval.get("pairs", {}).values()):
            lines += ["Tuples lacking a modality are left out of that pair: " + ", ".join(
                f"{p} {r['absent']}" for p, r in retrieval["pairs"].items()
                if r.get("absent")) + ".", ""]
    if retrieval.get("no_shared_space"):
        lines += [f"No shared space for {', '.join(retrieval['no_shared_space'])}: "
                  + retrieval.get("no_shared_space_reason", ""), ""]
    return lines


def _knn_table(report: dict) -> str | None:
    rows = []
    for col, e in report["labels"].items():
        for kind, knn in e.get("knn", {}).items():
            if kind not in (diag.FUSED_KIND, diag.RAW_ALL) and not kind.startswith("emb:"):
                continue
            linear = e["probes"].get(kind, {})
            rows.append([col, kind, cell(knn.get("accuracy")), cell(linear.get("accuracy")),
                         cell(knn.get("balanced_accuracy")),
                         cell(linear.get("balanced_accuracy"))])
    if not rows:
        return None
    return table(["label", "representation", "kNN acc.", "linear acc.", "kNN bal. acc.",
                  "linear bal. acc."], rows)


def format_markdown(report: dict) -> str:
    """The report a person reads."""
    rows = report.get("rows", {})
    objective = report["objective"]
    objective = objective if isinstance(objective, str) else ", ".join(objective)
    final = report.get("final_metrics", {})
    loss = cell(final.get("loss"), 4) if final.get("loss") is not None else "–"
    lines = [f"# Evaluation: {report['name']}", "",
             f"- objective `{objective}`, {report.get('epochs', '?')} epochs, final training "
             f"loss {loss}; {_spread_note(report)}",
             f"- data `{report['data']}`: " + ", ".join(f"{k} {v}" for k, v in rows.items())
             + " rows probed",
             "- probe: " + report["settings"]["protocol"],
             "- chance: the majority class of train+val (classification) or their mean "
             "(regression), scored on test", ""]
    if report.get("config_differences"):
        lines += [f"> warning: the runs differ in {', '.join(report['config_differences'])}",
                  ""]
    label_tables = _labels_tables(report)
    if label_tables:
        lines += ["## Labels (fused embedding, test split)", ""]
        for t in label_tables:
            lines += [t, ""]
    knn = _knn_table(report)
    if knn:
        lines += ["## kNN beside the linear probe (test split)", "",
                  report["settings"].get("knn_protocol", ""), "", knn, ""]
    few = _few_label_table(report)
    if few:
        s = report["settings"]
        lines += ["## Few labels (balanced accuracy, test split)", "",
                  f"k labelled tuples per class from train (and k per class from val to "
                  f"choose the L2), mean ± std over {len(s['few_label_seeds'])} draws"
                  + (" (per run; then mean ± std over runs)" if report.get("kind") == "seeds"
                     else "") + ".", "", few, ""]
    lines += _retrieval_lines(report)
    diagnostics = _diagnostics_table(report)
    if diagnostics:
        lines += ["## What each representation holds (test split)", "",
                  "Balanced accuracy (classification) or R² (regression) of a linear probe "
                  "per column and representation. ◆: the generator put this column's "
                  "information into that modality (`carried_by`); a modality's own embedding "
                  "should score near chance elsewhere. raw:* are the raw features: the "
                  "reference of what is linearly there before any training.", "",
                  diagnostics, ""]
    reps = report.get("representations", {})
    if reps:
        lines += ["Representations: " + "; ".join(f"`{k}` {v}" for k, v in reps.items()), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------- compare


def _short(report: dict) -> str:
    return report["name"] if report.get("kind") != "seeds" else \
        f"{report['names'][0]} (x{len(report['runs'])})"


def _unique_names(reports: Sequence[dict]) -> list[str]:
    names, seen = [], {}
    for r in reports:
        n = _short(r)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return names


def _references(reports: Sequence[dict], names: Sequence[str],
                columns: Sequence[tuple[str, str]]) -> dict:
    """The chance and raw-feature (raw:all) reference cells of every column: one column each
    when every run has the same references (same data and modalities), else one per run
    (a run trained on fewer modalities has its own raw:all)."""
    def per_run(section: str, col: str, which: str) -> list[str]:
        out = []
        for r in reports:
            e = r[section][col]
            m = e["primary_metric"]
            out.append(cell(e["chance"].get(m)) if which == "chance"
                       else cell(_value(e["probes"].get(diag.RAW_ALL), m)))
        return out
    values = {(s, c): (per_run(s, c, "chance"), per_run(s, c, "raw")) for s, c in columns}
    same = all(len(set(ch)) == 1 and len(set(raw)) == 1 for ch, raw in values.values())
    if same or len(reports) == 1:
        return {"header": ["chance", "raw features"],
                "cells": {k: [ch[0], raw[0]] for k, (ch, raw) in values.items()}}
    return {"header": [*[f"chance ({n})" for n in names], *[f"raw features ({n})"
                                                             for n in names]],
            "cells": {k: [*ch, *raw] for k, (ch, raw) in values.items()}}


# Settings every objective shares whose difference changes the figures of a side-by-side.
FAIR_SETTINGS = ("objective.temperature", "train.batch_size", "train.epochs", "train.lr",
                 "train.weight_decay", "train.warmup_epochs", "augment", "model", "data")


def fairness_differences(reports: Sequence[dict]) -> dict[str, list]:
    """{setting: [value per run]} of the shared settings (FAIR_SETTINGS) that differ."""
    flats = [_flat(r.get("config") or {"objective": r.get("objective_config") or {},
                                        "train": {"epochs": r.get("epochs")}})
             for r in reports]
    flats = [{k: v for k, v in f.items() if k != "objective.name"} for f in flats]
    out = {}
    for key in sorted(set().union(*flats)):
        if not any(key == p or key.startswith(p + ".") for p in FAIR_SETTINGS) or \
                key in ("data.synth.seed",):
            continue
        vals = [f.get(key) for f in flats]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            out[key] = vals
    return out


# Config fields whose value is a whole nested document (an inlined Hugging Face config):
# one setting, compared and shown as one value (`_compact`), not one row per key.
OPAQUE_SETTINGS = ("hf_config",)


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v and k not in OPAQUE_SETTINGS:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compact(value, limit: int = 60) -> str:
    """A setting's value in one table cell: a nested document (an inlined HF config) as its
    size, its identifying fields and a digest of its content; other values cut at `limit`."""
    if isinstance(value, Mapping):
        import hashlib

        digest = hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode())
        named = ", ".join(f"{k}={value[k]}" for k in ("model_type", "hidden_size",
                                                       "num_hidden_layers") if k in value)
        return f"{{{len(value)} keys{': ' + named if named else ''}; " \
               f"sha1 {digest.hexdigest()[:8]}}}"
    text = str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fairness_lines(reports: Sequence[dict], names: Sequence[str]) -> list[str]:
    diffs = fairness_differences(reports)
    if not diffs:
        return []
    rows = [[k, *[cell(v, 4) if isinstance(v, float) else _compact(v) for v in vals]]
            for k, vals in diffs.items()]
    return ["> **not a like-for-like comparison**: these shared settings differ between the "
            "runs, so the figures compare them as much as the objectives (set them equal, "
            "e.g. `--set objective.temperature=0.1`; see README 'Evaluate')", "",
            table(["setting", *names], rows), ""]


def _retrieval_compare_lines(reports: Sequence[dict], names: Sequence[str]) -> list[str]:
    """Recall@k per run and direction (runs without a shared space: '–')."""
    directions: list[str] = []
    for r in reports:
        for pair, res in (r.get("retrieval") or {}).get("pairs", {}).items():
            a, b = pair.split(":")
            for d in (f"{a}_to_{b}", f"{b}_to_{a}"):
                if d not in directions:
                    directions.append(d)
    if not directions:
        return []
    ks = (reports[0].get("retrieval") or {}).get("ks") or [1, 5, 10]
    rows = []
    labelled = any((r.get("retrieval") or {}).get("label") for r in reports)
    metrics = [(f"R@{k}", f"recall@{k}", f"chance@{k}") for k in ks]
    if labelled:
        metrics += [*[(f"same-label R@{k}", f"label_recall@{k}", None) for k in ks],
                    ("same-label mAP", "label_mAP", "label_chance@1")]
    for d in directions:
        for shown, key, chance_key in metrics:
            vals, chance_ = [], "–"
            for r in reports:
                found = [res[d] for res in (r.get("retrieval") or {}).get("pairs", {}).values()
                         if d in res]
                vals.append(cell(found[0].get(key)) if found else "–")
                if found and chance_key:
                    chance_ = cell(found[0].get(chance_key), 4)
            rows.append([d.replace("_to_", " → "), shown, chance_, *vals])
    return ["## Cross-modal retrieval (test split)", "",
            "'–': the run's objective has no space shared by these modalities.", "",
            table(["query → gallery", "recall", "chance", *names], rows), ""]


def compare_markdown(reports: Sequence[dict], names: Sequence[str] | None = None) -> str:
    """Several runs' evaluation reports side by side."""
    names = list(names or _unique_names(reports))
    out = [f"# mmcl report: {', '.join(names)}", ""]
    rows = []
    for name, r in zip(names, reports):
        final = r.get("final_metrics", {})
        obj = r["objective"] if isinstance(r["objective"], str) else ", ".join(r["objective"])
        seeds = r.get("seeds") if r.get("kind") == "seeds" else r.get("seed")
        rows.append([name, obj, str(seeds), str(r.get("epochs", "–")),
                     cell(final.get("loss"), 4), f"`{r['data']}`",
                     " / ".join(str(v) for v in (r.get("rows_embedded") or
                                                 r.get("rows", {})).values()),
                     " / ".join(str(v) for v in r.get("rows", {}).values())])
    out += ["## Runs", "", table(["run", "objective", "seed", "epochs", "final loss", "data",
                                  "data set rows train / val / test", "rows probed"], rows),
            ""]
    out += _fairness_lines(reports, names)
    keys: list[str] = []
    for r in reports:
        for k, v in r.get("final_metrics", {}).items():
            if k not in keys and k not in ("epoch", "step", "steps") and \
                    (isinstance(v, Mapping) or isinstance(v, (int, float))
                     and not isinstance(v, bool)):
                keys.append(k)
    if keys:
        out += ["### Final training metrics (last epoch of metrics.jsonl)", "",
                table(["metric", *names],
                      [[k, *[cell(r.get("final_metrics", {}).get(k), 4) for r in reports]]
                       for k in keys]), ""]
    first = reports[0]
    if len({r["data"] for r in reports}) > 1:
        out += [f"> note: the runs were evaluated on different data sets; the chance and raw "
                f"feature columns below are those of `{first['data']}`", ""]

    def shared(section: str) -> list[str]:
        return [c for c in first[section] if all(c in r[section] for r in reports)]

    labels = shared("labels")
    columns = [("labels", c) for c in labels] + [("factors", c) for c in shared("factors")]
    refs = _references(reports, names, columns)
    if labels:
        header = ["label", "metric", *refs["header"], *names]
        rows = []
        for col in labels:
            e = first["labels"][col]
            m = e["primary_metric"]
            rows.append([col, METRIC_NAMES[m], *refs["cells"][("labels", col)],
                         *[cell(_value(r["labels"][col]["probes"].get(diag.FUSED_KIND), m))
                           for r in reports]])
        out += ["## Labels: fused embedding, test split", "", table(header, rows), ""]
        knn_rows = [[col, *[cell(_value(r["labels"][col].get("knn", {}).get(diag.FUSED_KIND),
                                        "balanced_accuracy")) for r in reports]]
                    for col in labels if first["labels"][col]["task"] == "classification"]
        if any(c != "–" for row in knn_rows for c in row[1:]):
            out += ["### kNN probe (fused embedding, balanced accuracy)", "",
                    table(["label", *names], knn_rows), ""]
        rows = []
        for col in labels:
            task = first["labels"][col]["task"]
            metrics = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
            for name, r in zip(names, reports):
                fused = r["labels"][col]["probes"].get(diag.FUSED_KIND, {})
                rows.append([col, name, *[cell(fused.get(m)) for m in metrics]])
        out += ["### Every metric (fused embedding)", "",
                table(["label", "run", "accuracy / MSE", "balanced acc. / MAE",
                       "macro-F1 / R²"], rows), ""]
        rows = []
        for col in labels:
            by_run = [r["labels"][col].get("few_label", {}).get(diag.FUSED_KIND, {})
                      for r in reports]
            for k in by_run[0]:
                rows.append([col, k, *[cell(_value(b.get(k), "balanced_accuracy"))
                                       for b in by_run]])
        if rows:
            out += ["## Few labels: fused embedding, balanced accuracy", "",
                    table(["label", "k per class", *names], rows), ""]
    out += _retrieval_compare_lines(reports, names)
    if columns:
        rows = []
        for section, col in columns:
            e = first[section][col]
            m = e["primary_metric"]
            rows.append([col, e["role"], " ".join(e["carried_by"]) or "–", METRIC_NAMES[m],
                         *refs["cells"][(section, col)],
                         *[cell(_value(r[section][col]["probes"].get(diag.FUSED_KIND), m))
                           for r in reports]])
        out += ["## What the fused embedding holds, per factor", "",
                table(["column", "role", "carried by", "metric", *refs["header"], *names],
                      rows), ""]
        mods = [k for k in first.get("representations", {}) if k.startswith("emb:")]
        if mods:
            header = ["column", "carried by", *[f"{n} {k}" for n in names for k in mods]]
            rows = []
            for section, col in columns:
                e = first[section][col]
                m = e["primary_metric"]
                rows.append([col, " ".join(e["carried_by"]) or "–",
                             *[cell(_value(r[section][col]["probes"].get(k), m))
                               for r in reports for k in mods]])
            out += ["## What each modality's own embedding holds", "", table(header, rows), ""]
    out += ["Every number: a linear probe on frozen features (" +
            first["settings"]["protocol"] + "); balanced accuracy for classification, R² for "
            "regression unless named. ± is the spread over seeds where a column is a "
            "several-run report.", ""]
    return "\n".join(out)


SYSTEM_METRICS = {"epoch", "step", "steps", "samples_per_s", "samples_per_s_total",
                  "data_wait_fraction", "skipped_batches", "resumed_from_step", "lr"}


def curve_panels(histories: Mapping[str, list[dict]],
                 objectives: Mapping[str, str] | None = None) -> list[tuple[str, str, list]]:
    """[(title, metric, run names)]: every numeric training metric gets a panel (none is
    dropped); the loss gets one panel per objective, because objectives' losses have
    different scales (FactorCL's is a negative sum of bounds, InfoNCE's a log)."""
    objectives = dict(objectives or {})
    keys: list[str] = []
    for rows in histories.values():
        for row in rows:
            for k, v in row.items():
                if k not in SYSTEM_METRICS and k not in keys and \
                        isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    panels = []
    for key in (["loss"] if "loss" in keys else []) + [k for k in keys if k != "loss"]:
        runs = [n for n, rows in histories.items() if any(key in r for r in rows)]
        groups = sorted({objectives.get(n, "") for n in runs}) if key == "loss" else [""]
        for group in groups:
            members = [n for n in runs if key != "loss" or objectives.get(n, "") == group]
            title = f"loss ({group})" if key == "loss" and len(groups) > 1 else key
            panels.append((title, key, members))
    return panels


def plot_curves(histories: Mapping[str, list[dict]], path: str,
                objectives: Mapping[str, str] | None = None) -> str | None:
    """Training curves per run: every metric its own panel (`curve_panels`); one PNG."""
    plt = agg_pyplot()

    panels = curve_panels(histories, objectives)
    if not panels:
        return None
    cols = min(4, len(panels))
    rows_ = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), squeeze=False)
    for ax, (title, key, members) in zip(axes.flat, panels):
        for name in members:
            rows = histories[name]
            pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(rows)
                   if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(v) -> float:
    v = v.get("mean") if isinstance(v, Mapping) else v
    return np.nan if v is None else float(v)


def factor_panels(reports: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """What factors.png draws, per representation panel (fused, then each modality's own):
    {"kind", "ref_kind", "columns", "bars" {run: [score per column]}, "errors" {run: [...]},
    "refs" {run: [its own raw reference per column]}, "chance" [per column]}. References and
    chance are each run's own (a run on fewer modalities has its own raw:all); chance is the
    report's own (1/C balanced accuracy for C classes, R² of the mean for regression)."""
    first = reports[0]
    columns = [("labels", c) for c in first["labels"]] + \
              [("factors", c) for c in first["factors"]]
    columns = [(s, c) for s, c in columns if all(c in r[s] for r in reports)]
    kinds = [k for k in first.get("representations", {}) if k == diag.FUSED_KIND or
             k.startswith("emb:")]
    panels = []
    for kind in kinds if columns else []:
        ref_kind = diag.RAW_ALL if kind == diag.FUSED_KIND else "raw:" + kind.split(":", 1)[1]
        panel = {"kind": kind, "ref_kind": ref_kind, "columns": [c for _, c in columns],
                 "bars": {}, "errors": {}, "refs": {}, "chance": []}
        for name, r in zip(names, reports):
            entries = [r[s][c] for s, c in columns]
            values = [_value(e["probes"].get(kind), e["primary_metric"]) for e in entries]
            panel["bars"][name] = [_mean(v) for v in values]
            panel["errors"][name] = [(v.get("std") or 0.0) if isinstance(v, Mapping) else 0.0
                                     for v in values]
            panel["refs"][name] = [_mean(_value(e["probes"].get(ref_kind), e["primary_metric"]))
                                   for e in entries]
        panel["chance"] = [_mean(first[s][c]["chance"].get(first[s][c]["primary_metric"]))
                           for s, c in columns]
        panels.append(panel)
    return panels


def plot_factor_bars(reports: Sequence[dict], names: Sequence[str], path: str) -> str | None:
    """Grouped bars: probe score per column (x) per run (bars), one panel per representation
    (`factor_panels`); each bar topped by its run's own raw reference (black), each column's
    chance (grey dashes); error bars for several-run reports; a legend per panel, outside."""
    plt = agg_pyplot()

    panels = factor_panels(reports, names)
    if not panels:
        return None
    ncol = len(panels[0]["columns"])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.75 * ncol * max(
        1, len(reports)) ** 0.5 + 2) + 2.5, 2.8 * len(panels)), squeeze=False)
    x = np.arange(ncol)
    width = 0.8 / max(1, len(reports))
    for ax, panel in zip(axes[:, 0], panels):
        ref_drawn = False
        for i, name in enumerate(names):
            pos = x + (i - (len(reports) - 1) / 2) * width
            errs = panel["errors"][name]
            ax.bar(pos, panel["bars"][name], width, label=name,
                   yerr=errs if any(errs) else None, capsize=2)
            refs = np.asarray(panel["refs"][name], dtype=float)
            if not np.all(np.isnan(refs)):
                ax.hlines(refs, pos - width / 2, pos + width / 2, colors="black",
                          linewidth=1.2, label=None if ref_drawn else
                          f"{panel['ref_kind']} (reference)")
                ref_drawn = True
        ax.hlines(panel["chance"], x - 0.45, x + 0.45, colors="grey", linewidth=0.8,
                  linestyles="--", label="chance")
        ax.set_title(f"{panel['kind']}: balanced accuracy (classification) / R² (regression)",
                     fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(panel["columns"], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_progress(path: str) -> dict | None:
    """A run folder with no evaluation report yet (training, or not evaluated): its epochs so
    far from metrics.jsonl, which a run rewrites after every epoch; None without any."""
    history = read_history(path)
    if not history:
        return None
    fs, p = storage.filesystem(path)
    return {"run": path, "history": history,
            "finished": fs.exists(storage.join(p, "model", "weights.pt"))}


def progress_markdown(entries: Sequence[dict]) -> str:
    rows = []
    for e in entries:
        last = e["history"][-1]
        rate = last.get("samples_per_s_total", last.get("samples_per_s"))
        rows.append([f"`{e['run']}`", "finished, not evaluated" if e["finished"]
                     else "in progress", str(last.get("epoch", len(e["history"]))),
                     str(last.get("step", "–")), cell(last.get("loss"), 4), cell(rate, 0)])
    return "\n".join(["## Training progress (metrics.jsonl; no evaluation report yet)", "",
                      table(["run", "state", "epochs done", "step", "loss", "samples/s"],
                            rows), ""])


def recall_curves(reports: Sequence[dict], names: Sequence[str]) -> dict[str, dict]:
    """{run: {direction: [(k, recall@k)]}} of every run with retrieval figures."""
    out = {}
    for name, r in zip(names, reports):
        for pair, res in (r.get("retrieval") or {}).get("pairs", {}).items():
            for d, fig in res.items():
                if isinstance(fig, Mapping) and "_to_" in d:
                    ks = sorted(int(m.split("@")[1]) for m in fig if m.startswith("recall@"))
                    out.setdefault(name, {})[d] = [(k, _mean(fig[f"recall@{k}"])) for k in ks]
    return out


def plot_recall(reports: Sequence[dict], names: Sequence[str], objectives: Sequence[str],
                path: str) -> str | None:
    """One plot: recall@k against k, a line per run and direction: a colour per run (the
    legend names its objective), a line style per direction."""
    plt = agg_pyplot()

    curves = recall_curves(reports, names)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colours = {name: palette(i % palette.N) for i, name in enumerate(names)}
    styles = ["-", "--", ":", "-."]
    directions = list(dict.fromkeys(d for c in curves.values() for d in c))
    for name, obj in zip(names, objectives):
        for d, pts in curves.get(name, {}).items():
            ax.plot(*zip(*pts), marker="o", color=colours[name],
                    ls=styles[directions.index(d) % len(styles)],
                    label=f"{name} ({obj}) {d.replace('_to_', '→')}")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (test)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _objective_name(report: dict) -> str:
    obj = report["objective"]
    return obj if isinstance(obj, str) else ", ".join(obj)


def compare(paths: Sequence[str], out: str | None = None,
            progress: Callable[[str], None] | None = print) -> dict:
    """`mmcl report`: DIR/report.md side by side, and curves.png + factors.png when matplotlib
    is installed. A run without an evaluation report (still training, or not evaluated yet)
    is shown by its training progress. Returns {"markdown", "out", "files",
    "plots_skipped"}."""
    if not paths:
        raise ReportError("name at least one run (or eval report) to report on")
    reports, in_progress = [], []
    for path in paths:
        try:
            reports.append(load_report(path))
        except ReportError:
            entry = training_progress(path)
            if entry is None:
                raise
            in_progress.append(entry)
    names = _unique_names(reports) if reports else []
    if out is None:
        first_run = (in_progress[0]["run"] if not reports else reports[0]["runs"][0]
                     if reports[0].get("kind") == "seeds" else reports[0]["run"])
        out = storage.join(first_run.rstrip("/").rsplit("/", 1)[0], "_report")
    markdown = compare_markdown(reports, names) if reports else \
        f"# mmcl report: {', '.join(e['run'] for e in in_progress)}\n\n"
    if in_progress:
        markdown += "\n" + progress_markdown(in_progress)
    md_url = storage.join(out, REPORT_MD)
    storage.write_text(md_url, markdown)
    files, skipped = [md_url], None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        skipped = ("matplotlib is not installed, so no PNG plots were made; install it with "
                   "`pip install 'mmcl[plot]'` (or `pip install matplotlib`) and rerun "
                   "`mmcl report`. The tables are in " + md_url)
    if skipped is None:
        fs, local = storage.filesystem(out)
        if storage.is_remote(out):
            skipped = "plots are written to local folders only; pass a local --out"
        else:
            histories = {e["run"].rstrip("/").rsplit("/", 1)[-1]: e["history"]
                         for e in in_progress}
            objectives = {}
            for name, r in zip(names, reports):
                runs = r["runs"] if r.get("kind") == "seeds" else [r["run"]]
                for i, run in enumerate(runs):
                    label = name if len(runs) == 1 else f"{name} seed {r['seeds'][i]}"
                    histories[label] = read_history(run)
                    objectives[label] = _objective_name(r)
            for made in (plot_curves(histories, storage.join(local, "curves.png"), objectives),
                         plot_factor_bars(reports, names, storage.join(local, "factors.png"))
                         if reports else None,
                         plot_recall(reports, names, [_objective_name(r) for r in reports],
                                     storage.join(local, "recall.png")) if reports else None):
                if made:
                    files.append(made)
    if progress:
        progress(markdown)
        progress("wrote " + ", ".join(files))
        if skipped:
            progress(skipped)
    return {"markdown": markdown, "out": out, "files": files, "plots_skipped": skipped}
