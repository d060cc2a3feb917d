"""The tuple shard format's manifest: what modalities and label columns a data set holds.

A data set is a folder (local or any fsspec URL):

    manifest.json
    train/part-00000.parquet ...
    val/part-00000.parquet ...
    test/part-00000.parquet ...

One row is one tuple: an int64 `id`, one column per modality stored as Arrow's canonical
fixed-shape tensor (`arrow.fixed_shape_tensor`, whose storage is a fixed-size list, so decoding
is one zero-copy reshape), and scalar label columns. Labels come in two roles: `label` (a task a
user cares about) and `factor` (a true latent factor of a controlled data set, written so that
probes can measure how much of it an embedding holds).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

ModalityKind = Literal["vector", "sequence", "image"]
Task = Literal["classification", "regression"]
ID_COLUMN = "id"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_RANK = {"vector": 1, "sequence": 2, "image": 3}


class DataError(ValueError):
    """A data set does not match what mmcl or its manifest expects; the message says where."""


@dataclass(frozen=True)
class ModalitySpec:
    """One modality. Shapes exclude the batch axis: vector (D,), sequence (T, D), image (C, H, W)."""

    name: str
    shape: tuple[int, ...]
    kind: ModalityKind = "vector"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.kind not in _RANK:
            raise DataError(f"modality {self.name!r}: kind must be one of {list(_RANK)}, "
                            f"got {self.kind!r}")
        if len(self.shape) != _RANK[self.kind] or min(self.shape, default=0) < 1:
            raise DataError(f"modality {self.name!r}: a {self.kind} needs a shape of "
                            f"{_RANK[self.kind]} positive sizes, got {list(self.shape)}")

    @property
    def features(self) -> int:
        """Features per time step (sequence), per pixel row... the last axis; channels for images."""
        return self.shape[0] if self.kind == "image" else self.shape[-1]


@dataclass(frozen=True)
class LabelSpec:
    """A scalar column. `num_classes` for classification (values 0..num_classes-1).
    `carried_by` names the modalities that hold the information (controlled data only)."""

    name: str
    task: Task = "classification"
    num_classes: int | None = None
    role: Literal["label", "factor"] = "label"
    carried_by: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "carried_by", tuple(self.carried_by))
        if self.task == "classification" and (self.num_classes is None or self.num_classes < 2):
            raise DataError(f"label {self.name!r}: classification needs num_classes >= 2")


@dataclass
class Manifest:
    modalities: list[ModalitySpec]
    labels: list[LabelSpec] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)  # rows per split
    description: str = ""
    version: int = FORMAT_VERSION
    # Where the manifest was read from (for messages); not part of the file or of equality.
    location: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [m.name for m in self.modalities] + [lab.name for lab in self.labels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(f"manifest: column names must be unique, repeated: {dupes}")
        if ID_COLUMN in names:
            raise DataError(f"manifest: {ID_COLUMN!r} is reserved for the tuple id column")
        if not self.modalities:
            raise DataError("manifest: a data set needs at least one modality")

    # -- lookups
    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise DataError(f"modality {name!r} is not in this data set; it has "
                        f"{self.modality_names}")

    def label(self, name: str) -> LabelSpec:
        for lab in self.labels:
            if lab.name == name:
                return lab
        raise DataError(f"label column {name!r} is not in this data set; it has "
                        f"{[lab.name for lab in self.labels]}")

    def select(self, modalities: list[str] | None, labels: list[str] | None = None) -> "Manifest":
        """The manifest restricted to the given modalities/labels (None keeps all), as a run
        config's `data.modalities` / `data.label_columns` ask; a name the data set lacks is
        one DataError naming the field and the data set."""
        where = f" at {self.location}" if self.location else ""
        for field_name, asked, have in (("data.modalities", modalities, self.modality_names),
                                        ("data.label_columns", labels,
                                         [lab.name for lab in self.labels])):
            unknown = [n for n in asked or [] if n not in have]
            if unknown:
                raise DataError(f"{field_name}: {unknown} not in the data set{where}; it has "
                                f"{have}")
            if asked is not None and len(set(asked)) != len(asked):
                raise DataError(f"{field_name}: {asked} names a column twice")
        if modalities is not None and not modalities:
            raise DataError("data.modalities is empty; name at least one modality or leave "
                            "it unset (all)")
        mods = self.modalities if modalities is None else [self.modality(n) for n in modalities]
        labs = self.labels if labels is None else [self.label(n) for n in labels]
        return Manifest(list(mods), list(labs), dict(self.splits), self.description,
                        self.version, self.location)

    # -- (de)serialisation
    def to_json(self) -> str:
        raw = asdict(self)
        raw.pop("location")
        return json.dumps(raw, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> "Manifest":
        try:
            raw = json.loads(text)
            version = raw.get("version", FORMAT_VERSION)
            if version > FORMAT_VERSION:
                raise DataError(f"{source}: format version {version} is newer than this mmcl "
                                f"reads ({FORMAT_VERSION}); upgrade mmcl")
            return cls(
                modalities=[ModalitySpec(**m) for m in raw["modalities"]],
                labels=[LabelSpec(**lab) for lab in raw.get("labels", [])],
                splits={k: int(v) for k, v in raw.get("splits", {}).items()},
                description=raw.get("description", ""),
                version=version,
            )
        except DataError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{source} is not a valid mmcl manifest: {err!r}") from None
