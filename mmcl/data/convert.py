"""`mmcl data convert`: a NumPy .npz (one array per modality, optional labels) -> a shard data set.

Array roles, by rank (first axis = tuples):
    ndim 2 (N, D)          vector modality
    ndim 3 (N, T, D)       sequence modality
    ndim 4 (N, C, H, W)    image modality
    ndim 1, named `id`     the tuple ids (default 0..N-1)
    ndim 1, integer/bool   classification label, num_classes = max + 1
    ndim 1, float          regression label
"""

from __future__ import annotations

import zipfile
from typing import Mapping, Sequence

import numpy as np

from mmcl import storage
from mmcl.data.schema import ID_COLUMN, DataError, LabelSpec, Manifest, ModalitySpec
from mmcl.data.shards import write_dataset

SPLIT_NAMES = ("train", "val", "test")
_KIND_BY_NDIM = {2: "vector", 3: "sequence", 4: "image"}


def load_npz(src: str, endpoint_url: str | None = None,
             region: str | None = None) -> dict[str, np.ndarray]:
    """All arrays of a .npz file (local path or fsspec URL), loaded into memory."""
    fs, path = storage.filesystem(src, endpoint_url, region)
    if not fs.exists(path):
        raise DataError(f"{src}: no such file (expected a NumPy .npz written by np.savez)")
    try:
        with fs.open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{src} is a single .npy array, not an .npz archive; save "
                                "one array per modality with np.savez(path, name=array, ...)")
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{src} is not a readable NumPy .npz archive ({err}); write one with "
                        "np.savez(path, name=array, ...) (object arrays are not supported)"
                        ) from None


def infer_manifest(arrays: Mapping[str, np.ndarray], modalities: Sequence[str] | None = None,
                   labels: Sequence[str] | None = None) -> Manifest:
    """A manifest for arrays by rank and dtype (see the module doc). `modalities`/`labels`
    restrict which arrays are used (None: every array of that role)."""
    mods, labs = [], []
    for name, arr in arrays.items():
        if name == ID_COLUMN:
            continue
        if arr.ndim == 0 or arr.ndim > 4:
            raise DataError(f"array {name!r} has shape {arr.shape}; arrays need the tuple axis "
                            "first and rank 1 (label), 2 (vector), 3 (sequence) or 4 (image)")
        if arr.dtype.kind not in "biuf":
            raise DataError(f"array {name!r} has dtype {arr.dtype}; only numeric arrays can be "
                            "converted")
        if arr.ndim >= 2 and (modalities is None or name in modalities):
            mods.append(ModalitySpec(name, arr.shape[1:], _KIND_BY_NDIM[arr.ndim]))
        elif arr.ndim == 1 and (labels is None or name in labels):
            labs.append(_label_spec(name, arr))
    for wanted, found, role in ((modalities, mods, "modality"), (labels, labs, "label")):
        missing = sorted(set(wanted or []) - {s.name for s in found})
        if missing:
            raise DataError(f"{role} array(s) {missing} are not in the file (or have the wrong "
                            f"rank); it has {sorted(arrays)}")
    return Manifest(mods, labs)


def _label_spec(name: str, arr: np.ndarray) -> LabelSpec:
    if arr.dtype.kind in "biu":
        if len(arr) and arr.min() < 0:
            raise DataError(f"label array {name!r} has negative values; classification labels "
                            "must be 0..num_classes-1")
        num_classes = max(2, int(arr.max()) + 1 if len(arr) else 2)
        return LabelSpec(name, "classification", num_classes)
    return LabelSpec(name, "regression")


def _check_finite(arrays: Mapping[str, np.ndarray], manifest: Manifest) -> None:
    """Refuse nan/inf in a modality or a regression label: they would make the train split's
    normalisation constants nan (and every standardised value with them)."""
    names = [*manifest.modality_names, *[lab.name for lab in manifest.labels]]
    for name in names:
        arr = arrays[name]
        if arr.dtype.kind != "f":
            continue
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise DataError(f"array {name!r} has nan or inf values in {len(rows)} tuple(s) "
                            f"(first: row {rows[0]}); replace them (np.nan_to_num) or drop "
                            "those rows before converting")


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """The (train, val, test) fractions as floats; DataError unless 3 values >= 0 summing to 1."""
    values = [float(f) for f in fractions]
    if len(values) != len(SPLIT_NAMES) or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers (train, val, test) "
                        f"that sum to 1, got {values}")
    return values


def split_indices(n: int, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Seeded random train/val/test row indices (each sorted) for `n` tuples."""
    fractions = check_fractions(fractions)
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = min(n - n_train, int(round(fractions[1] * n)))
    bounds = [0, n_train, n_train + n_val, n]
    return {name: np.sort(order[bounds[i]:bounds[i + 1]])
            for i, name in enumerate(SPLIT_NAMES)}


def split_arrays(arrays: Mapping[str, np.ndarray], manifest: Manifest,
                 fractions: Sequence[float], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{split: {column: rows}} for the manifest's columns plus `id` (0..N-1 if absent)."""
    names = [ID_COLUMN, *manifest.modality_names, *[lab.name for lab in manifest.labels]]
    first = manifest.modality_names[0]
    n = len(arrays[first])
    for name in names:
        if name in arrays and len(arrays[name]) != n:
            raise DataError(f"array {name!r} has {len(arrays[name])} rows along its first axis, "
                            f"modality {first!r} has {n}; the first axis must be the tuples")
    ids = np.asarray(arrays[ID_COLUMN]) if ID_COLUMN in arrays else np.arange(n, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"array {ID_COLUMN!r} must be a 1-D integer array, got dtype {ids.dtype} "
                        f"and shape {ids.shape}")
    columns = {**{k: arrays[k] for k in names if k != ID_COLUMN}, ID_COLUMN: ids}
    return {split: {k: v[idx] for k, v in columns.items()}
            for split, idx in split_indices(n, fractions, seed).items()}


def convert_npz(src: str, out: str, split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                overwrite: bool = False, modalities: Sequence[str] | None = None,
                labels: Sequence[str] | None = None, endpoint_url: str | None = None,
                region: str | None = None) -> Manifest:
    """Convert the .npz at `src` into a data set at `out` with a seeded train/val/test split;
    returns the written manifest (with row counts)."""
    check_fractions(split)
    arrays = load_npz(src, endpoint_url, region)
    if not arrays:
        raise DataError(f"{src} holds no arrays")
    try:
        manifest = infer_manifest(arrays, modalities, labels)
        if not manifest.modalities:
            raise DataError("it has no modality arrays (rank 2-4, first axis = tuples), only "
                            + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))
        tuples = len(arrays[manifest.modality_names[0]])
        if tuples == 0:  # an empty data set trains nothing, and --overwrite would lose one
            raise DataError("it holds 0 tuples (the modality arrays' first axis is empty)")
        _check_finite(arrays, manifest)
        manifest.description = f"converted from {src} (split {list(split)}, seed {seed})"
        splits = split_arrays(arrays, manifest, split, seed)
    except DataError as err:  # name the file; nothing has been written yet
        raise DataError(f"{src}: {err}; nothing was written to {out}") from None
    # Normalisation constants come from the training split only (no leak from val/test).
    return write_dataset(out, manifest, splits, overwrite=overwrite, endpoint_url=endpoint_url,
                         region=region, stats_split="train")
