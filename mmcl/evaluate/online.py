"""The online probe: a linear probe of the embedding while a run trains.

Every `eval.every_epochs` epochs, rank 0 embeds a fixed held-out slice (at most `eval.rows`
tuples of the validation split, read once when the worker starts), fits a linear probe of
every label column on three quarters of it (one joint L-BFGS fit at a fixed L2,
`mmcl.evaluate.probe.fit_logistic_heads`; ridge for regression) and scores the last quarter. The figure joins that epoch's metrics (metrics.jsonl, the epoch
line, tracking, Ray Train's reported metrics, so Tune can optimise it) as
`probe_<column>`: balanced accuracy for a classification label, R² for a regression one.

    probe = OnlineProbe.for_worker(cfg, manifest, data_root, rank, remote)   # once
    summary.update(probe.at_epoch_end(engine, epoch))                       # each epoch

The slice is the same rows in every epoch and every resumed run (the first rows of the
split in shard order), so the curve moves only with the model. Ranks other than 0, a data set without
a classification/regression label, or `eval.every_epochs: 0` give an inert probe.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from mmcl.data.schema import ID_COLUMN, LabelSpec, Manifest
from mmcl.evaluate.probe import fit_logistic_heads, fit_probe, score_all

ONLINE_L2 = 1e-2        # one strength: the online figure is a curve, not the report
ONLINE_MAX_ITER = 20
PROBE_PREFIX = "probe_"


def probe_metric_name(column: str) -> str:
    """The metrics key of the online probe of one label column."""
    return f"{PROBE_PREFIX}{column}"


def probed_labels(manifest: Manifest, wanted: Sequence[str] | None) -> list[LabelSpec]:
    """The label columns the online probe scores: `wanted` (eval.columns), else every column
    of role "label" with a classification or regression task."""
    specs = [s for s in manifest.labels if s.task in ("classification", "regression")]
    if wanted is not None:
        return [s for s in specs if s.name in wanted]
    return [s for s in specs if s.role == "label"]


def read_slice(root: str, split: str, manifest: Manifest, columns: Sequence[str], rows: int,
               nonfinite: str = "fail", endpoint_url: str | None = None,
               region: str | None = None) -> dict[str, np.ndarray]:
    """The first `rows` tuples (in shard order) of a split, shard by shard: never the whole
    split in memory."""
    from mmcl.evaluate.embed import record_arrays
    from mmcl.data.shards import iter_batches, storage_columns

    modalities = [c for c in columns if c in manifest.modality_names]
    labels = [c for c in columns if c not in manifest.modality_names]
    wanted = [ID_COLUMN, *storage_columns(manifest, modalities), *labels]
    parts: list[dict[str, np.ndarray]] = []
    held = 0
    for _, record in iter_batches(root, split, wanted, min(int(rows), 8192), endpoint_url,
                                  region):
        part = record_arrays(record, manifest, modalities, labels, split, nonfinite)
        parts.append(part)
        held += len(part[ID_COLUMN])
        if held >= rows:
            break
    if not parts:
        return {}
    out = {k: np.concatenate([p[k] for p in parts])[:rows] for k in parts[0]}
    order = np.argsort(out[ID_COLUMN], kind="stable")
    return {k: v[order] for k, v in out.items()}


class OnlineProbe:
    """Rank 0's probe of a fixed held-out slice; inert elsewhere."""

    def __init__(self, every_epochs: int, arrays: Mapping[str, np.ndarray] | None = None,
                 specs: Sequence[LabelSpec] = (), modalities: Sequence[str] = ()):
        self.every_epochs = int(every_epochs)
        self.arrays = dict(arrays or {})
        self.specs = list(specs)
        self.modalities = list(modalities)

    @property
    def active(self) -> bool:
        return self.every_epochs > 0 and bool(self.specs) and \
            len(self.arrays.get(ID_COLUMN, ())) >= 8

    @classmethod
    def for_worker(cls, cfg, manifest: Manifest, root: str | None, rank: int,
                   remote: Sequence = (None, None)) -> "OnlineProbe":
        every = cfg.eval.every_epochs
        specs = probed_labels(manifest, cfg.eval.columns)
        if rank != 0 or not every or not specs or not root:
            return cls(0)
        split = cfg.data.val_split
        if not manifest.splits.get(split):
            return cls(0)
        modalities = manifest.modality_names
        try:  # rows with NaN/inf or nulls are left out of the slice, never fail the run
            arrays = read_slice(root, split, manifest, [*modalities, *(s.name for s in specs)],
                                cfg.eval.rows, "drop", *remote)
        except Exception as err:  # noqa: BLE001 - the probe is a by-product of training
            print(f"[mmcl] online probe off: the {split!r} slice could not be read ({err})",
                  flush=True)
            return cls(0)
        return cls(every, arrays, specs, modalities)

    def due(self, epoch: int) -> bool:
        """Whether the probe runs after (0-based) `epoch`."""
        return self.active and (epoch + 1) % self.every_epochs == 0

    def at_epoch_end(self, engine, epoch: int) -> dict[str, float]:
        """{probe_<column>: test figure} after a due epoch, else {}. The model is put in eval
        mode for the embedding (no dropout, no random draw: training's generators are left
        as they are) and back in training mode after."""
        if not self.due(epoch):
            return {}
        features = self.embed(engine.objective, engine.prepare, engine.device)
        return self.score(features)

    def embed(self, objective, prepare, device, batch_size: int = 512) -> np.ndarray:
        was_training = objective.training
        objective.eval()
        out = []
        try:
            with torch.no_grad():
                n = len(self.arrays[ID_COLUMN])
                for start in range(0, n, batch_size):
                    batch = {k: torch.from_numpy(np.ascontiguousarray(v[start:start + batch_size]))
                             .to(device) for k, v in self.arrays.items()
                             if k.split("__")[0] in self.modalities}
                    out.append(objective.embed(prepare(batch)).float().cpu().numpy())
        finally:
            objective.train(was_training)
        return np.concatenate(out)

    def score(self, features: np.ndarray) -> dict[str, float]:
        """Fit on the first three quarters at one fixed L2 (ONLINE_L2: on standardised
        features strong enough for L-BFGS to converge in a few dozen iterations; the full
        grid protocol is `mmcl eval`'s), score the last quarter."""
        n = len(features)
        cut = (3 * n) // 4
        out = {}
        fit, test = features[:cut], features[cut:]
        classification = [s for s in self.specs if s.task == "classification"]
        if classification:
            ys = [np.asarray(self.arrays[s.name]) for s in classification]
            probes = fit_logistic_heads(fit, [y[:cut] for y in ys],
                                        [int(s.num_classes) for s in classification],
                                        [ONLINE_L2] * len(ys), max_iter=ONLINE_MAX_ITER)
            for spec, probe, y in zip(classification, probes, ys):
                out[probe_metric_name(spec.name)] = float(
                    score_all(probe, test, y[cut:])["balanced_accuracy"])
        for spec in (s for s in self.specs if s.task == "regression"):
            y = np.asarray(self.arrays[spec.name])
            probe = fit_probe(fit, y[:cut], "regression", l2=ONLINE_L2)
            out[probe_metric_name(spec.name)] = float(score_all(probe, test, y[cut:])["r2"])
        return out
