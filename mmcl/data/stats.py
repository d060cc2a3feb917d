"""Normalisation constants of a modality, accumulated chunk by chunk (bounded memory).

Per channel for images (in [0, 1] units for uint8 images, the scale the image encoder sees),
per feature for vectors and sequences (over the real time steps of padded sequences), one
value for audio (over all samples). Absent values of nullable modalities are left out. Sums
are float64 and partial results merge exactly, so Ray Data tasks can each accumulate their
blocks and the driver adds them up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mmcl.data.schema import ModalitySpec, Manifest, length_column, present_column

# A feature this close to constant would turn into noise when divided by its std.
MIN_STD = 1e-6


@dataclass
class FeatureStats:
    """Count, sum and sum of squares per feature."""

    count: int = 0
    total: np.ndarray = field(default_factory=lambda: np.zeros(0))
    squares: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, rows: np.ndarray) -> None:
        """Accumulate (N, F) values."""
        rows = np.asarray(rows, np.float64)
        if not len(rows):
            return
        if not self.count:
            self.total, self.squares = np.zeros(rows.shape[1]), np.zeros(rows.shape[1])
        self.count += len(rows)
        self.total = self.total + rows.sum(axis=0)
        self.squares = self.squares + np.square(rows).sum(axis=0)

    def merge(self, other: "FeatureStats") -> None:
        if other.count:
            if not self.count:
                self.total, self.squares = np.zeros_like(other.total), np.zeros_like(other.total)
            self.count += other.count
            self.total = self.total + other.total
            self.squares = self.squares + other.squares

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        if not self.count:
            return None
        mean = self.total / self.count
        var = np.maximum(self.squares / self.count - mean ** 2, 0.0)
        std = np.sqrt(var)
        std = np.where(std < MIN_STD, 1.0, std)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def to_dict(self) -> dict:
        return {"count": self.count, "total": self.total.tolist(),
                "squares": self.squares.tolist()}

    @classmethod
    def from_dict(cls, raw: dict) -> "FeatureStats":
        return cls(int(raw["count"]), np.asarray(raw["total"], np.float64),
                   np.asarray(raw["squares"], np.float64))


def feature_rows(spec: ModalitySpec, values: np.ndarray, present: np.ndarray | None = None,
                 lengths: np.ndarray | None = None) -> np.ndarray:
    """The values of one chunk as (items, stat_size) rows to accumulate (see module doc)."""
    if present is not None:
        values = values[np.asarray(present, bool)]
        lengths = None if lengths is None else np.asarray(lengths)[np.asarray(present, bool)]
    if spec.kind == "image":
        scale = 255.0 if spec.dtype == "uint8" else 1.0
        c = spec.shape[0]
        return np.moveaxis(values, 1, -1).reshape(-1, c).astype(np.float64) / scale
    if spec.kind == "audio":
        return values.reshape(-1, 1)
    if spec.kind == "sequence":
        if lengths is not None:
            steps = np.arange(spec.shape[0])[None, :] < np.asarray(lengths)[:, None]
            return values[steps]
        return values.reshape(-1, spec.shape[-1])
    if spec.kind == "vector":  # (-1, D), not (N, -1): an empty chunk has no -1 to infer
        return values.reshape(-1, spec.shape[-1])
    return np.zeros((0, 0))


def _uint8_image_stats(values: np.ndarray, present: np.ndarray | None) -> FeatureStats:
    """FeatureStats of uint8 (N, C, H, W) images from exact integer sums per channel,
    without a float64 copy of every pixel (most of an image import's statistics cost)."""
    if present is not None:
        values = values[np.asarray(present, bool)]
    n, c = values.shape[:2]
    count = n * math.prod(values.shape[2:])
    if not count:
        return FeatureStats()
    axes = (0, *range(2, values.ndim))
    total = values.sum(axis=axes, dtype=np.uint64).astype(np.float64)
    squares = np.square(values, dtype=np.uint16).sum(axis=axes, dtype=np.uint64)
    return FeatureStats(count, total / 255.0, squares.astype(np.float64) / 255.0 ** 2)


def chunk_stats(spec: ModalitySpec, columns: dict) -> FeatureStats:
    """FeatureStats of one chunk {column: array} for one modality."""
    stats = FeatureStats()
    values = columns.get(spec.name)
    if spec.stat_size and spec.kind == "image" and getattr(values, "dtype", None) == np.uint8:
        return _uint8_image_stats(values, columns.get(present_column(spec.name)))
    if spec.stat_size:
        stats.add(feature_rows(spec, np.asarray(columns[spec.name]),
                               columns.get(present_column(spec.name)),
                               columns.get(length_column(spec.name))))
    return stats


def with_stats(manifest: Manifest, stats: dict[str, FeatureStats]) -> Manifest:
    """The manifest with each modality's mean/std taken from `stats` (where it has values)."""
    from dataclasses import replace

    mods = []
    for spec in manifest.modalities:
        found = stats.get(spec.name)
        ms = found.mean_std() if found is not None and spec.stat_size else None
        mods.append(replace(spec, mean=ms[0], std=ms[1]) if ms else spec)
    return replace(manifest, modalities=mods)
