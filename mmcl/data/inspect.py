"""`mmcl data inspect`: what a data set holds, read batch by batch (bounded memory).

`inspect_dataset` returns a JSON-serialisable summary: modalities (kind, shape, dtype,
mean/std over the statistics split, non-finite value count, missing tuples per split, the
token / step length histogram of text and padded sequences), rows per split, label balance per
split (class counts for classification and multilabel, mean/std for regression).
`format_inspect` renders it as text; `contact_sheet` writes a few decoded images as one PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mmcl.data.schema import Manifest, length_column, present_column
from mmcl.data.shards import iter_batches, read_manifest, tensor_to_numpy

BATCH_ROWS = 8192


@dataclass
class RunningStats:
    """Mean and variance over many batches (Chan et al.'s pairwise merge, float64)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        n = values.size
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else float("nan")

    def summary(self) -> dict:
        if not self.count:
            return {"mean": None, "std": None}
        return {"mean": self.mean, "std": self.std}


def _modality_stats(root: str, split: str, manifest: Manifest, endpoint_url, region) -> dict:
    """{modality: {"mean", "std", "nonfinite"}} over the finite values of one split."""
    stats = {m.name: RunningStats() for m in manifest.modalities}
    bad = {m.name: 0 for m in manifest.modalities}
    lengths = {m.name: np.zeros(m.shape[0] + 1, np.int64) for m in manifest.modalities
               if m.variable_length}
    columns = [c for m in manifest.modalities for c in m.storage_columns]
    for _, batch in iter_batches(root, split, columns, BATCH_ROWS, endpoint_url, region):
        for m in manifest.modalities:
            values, valid = tensor_to_numpy(batch.column(m.name), m.shape, m.dtype)
            if m.nullable:  # absent values are stored zeros: not part of the statistics
                present = batch.column(present_column(m.name)).to_numpy(zero_copy_only=False)
                values, valid = values[present], valid[present]
            if m.variable_length:
                n = batch.column(length_column(m.name)).to_numpy(zero_copy_only=False)
                n = n[present] if m.nullable else n
                lengths[m.name] += np.bincount(n, minlength=len(lengths[m.name]))
            if m.kind == "text":
                continue  # token ids have no meaningful mean
            if m.kind == "image" and m.dtype == "uint8":
                values = values / np.float32(255)  # 0..1, as the model and the manifest see it
            finite = np.isfinite(values) & valid.reshape(-1, *([1] * len(m.shape)))
            bad[m.name] += int(finite.size - finite.sum())
            if m.variable_length:  # a padded sequence's statistics: its real steps only
                finite &= (np.arange(m.shape[0])[None, :] < n[:, None])[:, :, None]
            stats[m.name].add(values[finite])
    out = {name: {**s.summary(), "nonfinite": bad[name]} for name, s in stats.items()}
    for name, hist in lengths.items():
        out[name]["length_histogram"] = hist.tolist()
    return out


def _label_balance(root: str, split: str, manifest: Manifest, endpoint_url, region) -> dict:
    """{label: {"counts": [...]} | {"mean", "std"}} of one split."""
    names = [lab.name for lab in manifest.labels]
    counts = {lab.name: np.zeros(lab.num_classes, np.int64) for lab in manifest.labels
              if lab.task in ("classification", "multilabel")}
    multi = {lab.name: lab.num_classes for lab in manifest.labels if lab.task == "multilabel"}
    stats = {lab.name: RunningStats() for lab in manifest.labels if lab.task == "regression"}
    if names:
        for _, batch in iter_batches(root, split, names, BATCH_ROWS, endpoint_url, region):
            for name in names:
                if name in multi:  # tuples holding each class
                    hot = tensor_to_numpy(batch.column(name), (multi[name],), "uint8")[0]
                    counts[name] += hot.sum(axis=0).astype(np.int64)
                    continue
                values = batch.column(name).to_numpy(zero_copy_only=False)
                if name in counts:
                    counts[name] += np.bincount(values.astype(np.int64),
                                                minlength=len(counts[name]))[:len(counts[name])]
                else:
                    stats[name].add(values[np.isfinite(values)])
    out: dict = {name: {"counts": c.tolist()} for name, c in counts.items()}
    out.update({name: s.summary() for name, s in stats.items()})
    return out


def inspect_dataset(root: str, endpoint_url: str | None = None,
                    region: str | None = None) -> dict:
    """A JSON-serialisable summary of the data set at `root` (see the module doc). Modality
    statistics come from the `train` split (the first split if there is no `train`)."""
    manifest = read_manifest(root, endpoint_url, region)
    stats_split = "train" if "train" in manifest.splits else next(iter(manifest.splits), None)
    mstats = (_modality_stats(root, stats_split, manifest, endpoint_url, region)
              if stats_split else {})
    balance = {split: _label_balance(root, split, manifest, endpoint_url, region)
               for split in manifest.splits}
    return {
        "root": str(root),
        "description": manifest.description,
        "splits": dict(manifest.splits),
        "stats_split": stats_split,
        "modalities": [{"name": m.name, "kind": m.kind, "shape": list(m.shape),
                        "dtype": m.dtype, **mstats.get(m.name, {}),
                        "missing": {split: manifest.missing.get(split, {}).get(m.name, 0)
                                    for split in manifest.splits},
                        **({"tokenizer": m.tokenizer, "vocab_size": m.vocab_size}
                           if m.kind == "text" else {})}
                       for m in manifest.modalities],
        "labels": [{"name": lab.name, "task": lab.task, "role": lab.role,
                    "num_classes": lab.num_classes, "carried_by": list(lab.carried_by),
                    "classes": list(lab.classes),
                    "description": lab.description,
                    "balance": {split: balance[split][lab.name] for split in balance}}
                   for lab in manifest.labels],
    }


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths]),
             *[fmt.format(*map(str, r)) for r in rows]]
    return [line.rstrip() for line in lines]


def _balance_text(lab: dict, split: str) -> str:
    b = lab["balance"].get(split, {})
    if lab["task"] in ("classification", "multilabel"):
        counts = b.get("counts", [])
        total = sum(counts) or 1
        return " ".join(f"{c}({100 * c / total:.0f}%)" for c in counts)
    return f"mean {_num(b.get('mean'))} std {_num(b.get('std'))}"


def _missing_lines(info: dict) -> list[str]:
    rows = [[m["name"], *[str(m.get("missing", {}).get(s, 0)) for s in info["splits"]]]
            for m in info["modalities"] if any(m.get("missing", {}).values())]
    if not rows:
        return []
    return ["", "missing modalities (tuples lacking it, per split):",
            *_table(["name", *info["splits"]], rows)]


def _length_lines(info: dict) -> list[str]:
    """A text histogram of token / step lengths, 8 bins, per variable-length modality."""
    lines = []
    for m in info["modalities"]:
        hist = m.get("length_histogram")
        if not hist:
            continue
        edges = np.linspace(0, len(hist), min(8, len(hist)) + 1).astype(int)
        bins = [(lo, hi - 1, int(sum(hist[lo:hi]))) for lo, hi in zip(edges[:-1], edges[1:])]
        peak = max(c for *_, c in bins) or 1
        what = "tokens" if m["kind"] == "text" else "steps"
        lines += ["", f"{m['name']}: {what} per tuple (max {len(hist) - 1})"]
        lines += [f"  {lo:>4}-{hi:<4} {'#' * round(30 * c / peak):<30} {c}"
                  for lo, hi, c in bins]
    return lines


def contact_sheet(root: str, out_png: str, per_modality: int = 16, split: str | None = None,
                  endpoint_url: str | None = None, region: str | None = None) -> list[str]:
    """Write up to `per_modality` decoded images of each image modality side by side (one row
    per modality) as a PNG; returns the modalities shown (empty: none, nothing written)."""
    from PIL import Image

    manifest = read_manifest(root, endpoint_url, region)
    images = [m for m in manifest.modalities if m.kind == "image"]
    if not images:
        return []
    split = split or ("train" if "train" in manifest.splits else next(iter(manifest.splits)))
    rows = []
    for m in images:
        for _, batch in iter_batches(root, split, [m.name], per_modality, endpoint_url, region):
            values = tensor_to_numpy(batch.column(m.name), m.shape, m.dtype)[0]
            break
        else:
            continue
        if m.dtype != "uint8":  # float images: stretch each to 0..255 for viewing
            lo = values.min(axis=(1, 2, 3), keepdims=True)
            hi = values.max(axis=(1, 2, 3), keepdims=True)
            values = (values - lo) / np.maximum(hi - lo, 1e-8) * 255
        tiles = values.astype(np.uint8)
        tiles = np.repeat(tiles, 3, axis=1) if m.shape[0] == 1 else tiles[:, :3]
        row = np.concatenate(list(tiles.transpose(0, 2, 3, 1)), axis=1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)))
                            for r in rows], axis=0)
    from mmcl import storage

    fs, path = storage.filesystem(out_png, endpoint_url, region)
    with fs.open(path, "wb") as f:
        Image.fromarray(sheet).save(f, format="PNG")
    return [m.name for m in images]


def format_inspect(info: dict) -> str:
    """`inspect_dataset`'s summary as readable text tables."""
    lines = [f"data set {info['root']}"]
    if info.get("description"):
        lines.append(f"  {info['description']}")
    lines.append("rows: " + ", ".join(f"{k} {v}" for k, v in info["splits"].items())
                 + f" (total {sum(info['splits'].values())})")
    lines += ["", f"modalities (mean/std over the {info['stats_split']} split; images on "
                  f"0..1, as the model receives them):"]
    lines += _table(["name", "kind", "shape", "mean", "std", "non-finite"],
                    [[m["name"], m["kind"], "x".join(map(str, m["shape"])), _num(m.get("mean")),
                      _num(m.get("std")), m.get("nonfinite", "-")] for m in info["modalities"]])
    lines += _missing_lines(info) + _length_lines(info)
    if info["labels"]:
        splits = list(info["splits"])
        lines += ["", "label columns (class counts per split, or mean/std for regression):"]
        lines += _table(
            ["name", "role", "task", "carried by", *splits],
            [[lab["name"], lab["role"], lab["task"] + (f"[{lab['num_classes']}]"
                                                        if lab["num_classes"] else ""),
              ",".join(lab["carried_by"]) or "-", *[_balance_text(lab, s) for s in splits]]
             for lab in info["labels"]])
    return "\n".join(lines)
