"""The tuple shard format's manifest: what modalities and label columns a data set holds.

A data set is a folder (local or any fsspec URL):

    manifest.json
    train/part-00000.parquet ...
    val/part-00000.parquet ...
    test/part-00000.parquet ...

One row is one tuple: an int64 `id`, one column per modality stored as Arrow's canonical
fixed-shape tensor (`arrow.fixed_shape_tensor`, whose storage is a fixed-size list, so decoding
is one zero-copy reshape), and label columns. Labels come in two roles: `label` (a task a
user cares about) and `factor` (a true latent factor of a controlled data set, written so that
probes can measure how much of it an embedding holds).

Format version 2 (version 1 data sets read exactly as before: every new field has the
version-1 meaning as its default):

- a modality's `dtype` is its storage dtype (uint8, int32, int64, float16, float32);
- kinds `text` (token ids (L,), with the tokenizer's name, vocabulary size, pad and mask ids)
  and `audio` (mono waveform (S,) at `sample_rate`);
- `variable_length` modalities (text, padded sequences) carry an int32 column `<m>__len`: the
  first `len` positions are real, the rest padding; the data layer turns it into `<m>__mask`;
- `nullable` modalities carry a bool column `<m>__present`; an absent value is stored as
  zeros. `Manifest.missing` counts absent values per split and modality;
- label task `multilabel`: a (K,) uint8 multi-hot tensor column, `classes` names the K classes;
- `mean`/`std`: normalisation constants computed on the train split (per channel for images,
  per feature for vectors and sequences, one value for audio), applied on the training device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

ModalityKind = Literal["vector", "sequence", "image", "text", "audio"]
Task = Literal["classification", "regression", "multilabel"]
ID_COLUMN = "id"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
_RANK = {"vector": 1, "sequence": 2, "image": 3, "text": 1, "audio": 1}
DTYPES = ("uint8", "int32", "int64", "float16", "float32")
LENGTH_SUFFIX = "__len"
PRESENT_SUFFIX = "__present"
MASK_SUFFIX = "__mask"


def length_column(modality: str) -> str:
    """The int32 column holding how many leading positions of a padded modality are real."""
    return modality + LENGTH_SUFFIX


def present_column(modality: str) -> str:
    """The bool column saying whether a nullable modality is present in a tuple."""
    return modality + PRESENT_SUFFIX


def mask_column(modality: str) -> str:
    """The batch key of a padded modality's (B, L) bool mask (True = a real position)."""
    return modality + MASK_SUFFIX


class DataError(ValueError):
    """A data set does not match what mmcl or its manifest expects; the message says where."""


@dataclass(frozen=True)
class ModalitySpec:
    """One modality. Shapes exclude the batch axis: vector (D,), sequence (T, D), image
    (C, H, W), text (L,), audio (S,). See the module doc for the version-2 fields."""

    name: str
    shape: tuple[int, ...]
    kind: ModalityKind = "vector"
    dtype: str = "float32"
    variable_length: bool = False
    nullable: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # text
    tokenizer: str = ""
    vocab_size: int | None = None
    pad_id: int | None = None
    mask_id: int | None = None
    # audio
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        for stat in ("mean", "std"):
            if getattr(self, stat) is not None:
                object.__setattr__(self, stat, tuple(float(v) for v in getattr(self, stat)))
        if "__" in self.name:
            raise DataError(f"modality {self.name!r}: names may not contain '__' (mmcl uses "
                            f"it for a modality's mask and presence columns)")
        if self.kind not in _RANK:
            raise DataError(f"modality {self.name!r}: kind must be one of {list(_RANK)}, "
                            f"got {self.kind!r}")
        if len(self.shape) != _RANK[self.kind] or min(self.shape, default=0) < 1:
            raise DataError(f"modality {self.name!r}: a {self.kind} needs a shape of "
                            f"{_RANK[self.kind]} positive sizes, got {list(self.shape)}")
        if self.dtype not in DTYPES:
            raise DataError(f"modality {self.name!r}: dtype must be one of {list(DTYPES)}, "
                            f"got {self.dtype!r}")
        if self.kind == "text":
            if self.dtype not in ("int32", "int64") or not self.vocab_size:
                raise DataError(f"modality {self.name!r}: a text modality needs an integer "
                                f"dtype and vocab_size (got {self.dtype}, {self.vocab_size})")
            object.__setattr__(self, "variable_length", True)
        if self.variable_length and self.kind not in ("text", "sequence"):
            raise DataError(f"modality {self.name!r}: only text and sequences can be "
                            f"variable-length, not a {self.kind}")
        if (self.mean is None) != (self.std is None):
            raise DataError(f"modality {self.name!r}: give both mean and std, or neither")
        if self.mean is not None and (len(self.mean) != self.stat_size
                                      or len(self.std) != self.stat_size):
            raise DataError(f"modality {self.name!r}: mean/std need {self.stat_size} values "
                            f"(one per {'channel' if self.kind == 'image' else 'feature'}), "
                            f"got {len(self.mean)}/{len(self.std)}")

    @property
    def stat_size(self) -> int:
        """How many normalisation constants the modality has: channels (image), features
        (vector, sequence), 1 (audio), 0 (text: ids are not normalised)."""
        return {"image": self.shape[0], "vector": self.shape[0], "sequence": self.shape[-1],
                "audio": 1, "text": 0}[self.kind]

    @property
    def storage_columns(self) -> list[str]:
        """The modality's column and its length / presence columns, as stored."""
        return ([self.name] + ([length_column(self.name)] if self.variable_length else [])
                + ([present_column(self.name)] if self.nullable else []))

    @property
    def features(self) -> int:
        """Features per time step (sequence), per pixel row... the last axis; channels for images."""
        return self.shape[0] if self.kind == "image" else self.shape[-1]


@dataclass(frozen=True)
class LabelSpec:
    """A label column. `num_classes` for classification (values 0..num_classes-1) and
    multilabel (a (K,) uint8 multi-hot per tuple); `classes` optionally names the classes.
    `carried_by` names the modalities that hold the information (controlled data only)."""

    name: str
    task: Task = "classification"
    num_classes: int | None = None
    role: Literal["label", "factor"] = "label"
    carried_by: tuple[str, ...] = ()
    description: str = ""
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "carried_by", tuple(self.carried_by))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if "__" in self.name:
            raise DataError(f"label {self.name!r}: names may not contain '__'")
        if self.classes and self.num_classes is None:
            object.__setattr__(self, "num_classes", len(self.classes))
        if self.task == "classification" and (self.num_classes is None or self.num_classes < 2):
            raise DataError(f"label {self.name!r}: classification needs num_classes >= 2")
        if self.task == "multilabel" and (self.num_classes is None or self.num_classes < 1):
            raise DataError(f"label {self.name!r}: multilabel needs its classes")
        if self.classes and len(self.classes) != self.num_classes:
            raise DataError(f"label {self.name!r}: {len(self.classes)} class names for "
                            f"num_classes={self.num_classes}")


@dataclass
class Manifest:
    modalities: list[ModalitySpec]
    labels: list[LabelSpec] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)  # rows per split
    description: str = ""
    version: int = FORMAT_VERSION
    # {split: {modality: tuples where it is absent}}; only nullable modalities appear
    missing: dict[str, dict[str, int]] = field(default_factory=dict)
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

    def missing_total(self, modality: str) -> int:
        """Tuples lacking `modality`, over all splits."""
        return sum(counts.get(modality, 0) for counts in self.missing.values())

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
        kept = {m.name for m in mods}
        missing = {split: {m: n for m, n in counts.items() if m in kept}
                   for split, counts in self.missing.items()}
        return Manifest(list(mods), list(labs), dict(self.splits), self.description,
                        self.version, missing, self.location)

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
                missing={k: {m: int(n) for m, n in v.items()}
                         for k, v in raw.get("missing", {}).items()},
            )
        except DataError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{source} is not a valid mmcl manifest: {err!r}") from None
