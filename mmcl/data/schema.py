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
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

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


MAX_NAME_CHARS = 200  # a path segment; file systems allow 255 bytes


def unsafe_name(name: Any, modality: bool = False) -> str | None:
    """Why `name` cannot be a name that becomes one path segment, a column or a file name
    (a run, sweep, split, modality or label name), or None when it can: it must be a
    non-empty string without '/', '\\' or control characters, and not '.' or '..'.
    Modality names may not contain "__", which marks a modality's mask/presence keys."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name.strip():
        return "must not be empty"
    if name in (".", "..") or "/" in name or "\\" in name:
        return f"{name!r} must be one plain name, not a path ('/', '\\', '.' and '..' are " \
               f"not allowed)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"{name!r} must not contain control characters"
    if len(name) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters, got {len(name)}"
    if modality and "__" in name:
        return f"{name!r} must not contain '__' (reserved for a modality's mask keys)"
    return None


def check_name(name: Any, what: str, modality: bool = False) -> str:
    """`name` if it is a safe name (see `unsafe_name`), else a DataError naming `what`."""
    reason = unsafe_name(name, modality)
    if reason:
        raise DataError(f"{what}: {reason}")
    return name


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
        check_name(self.name, "modality name", modality=True)
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
        check_name(self.name, "label name", modality=True)  # '__' would read as a mask key
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
        for m in self.modalities:  # names become columns, batch keys and file names
            check_name(m.name, "modality name", modality=True)
        for lab in self.labels:
            check_name(lab.name, "label name")
        for split in self.splits:
            check_name(split, "split name")
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
        """Parse a manifest; anything else (another JSON value, a missing or mistyped field)
        is one DataError that names the file and the field."""
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise DataError(f"{source} is not a valid mmcl manifest: not JSON ({err})") from None
        try:
            return cls._from_raw(raw)
        except DataError as err:
            raise DataError(f"{source} is not a valid mmcl manifest: {err}") from None

    @classmethod
    def _from_raw(cls, raw: Any) -> "Manifest":
        if not isinstance(raw, dict):
            raise DataError(f"it holds a JSON {_json_kind(raw)}, expected an object with "
                            f"'modalities', 'labels' and 'splits'")
        version = raw.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise DataError(f"'version' must be an integer, got a JSON {_json_kind(version)}")
        if version > FORMAT_VERSION:
            raise DataError(f"format version {version} is newer than this mmcl reads "
                            f"({FORMAT_VERSION}); upgrade mmcl")
        if "modalities" not in raw:
            raise DataError("it has no 'modalities' list")
        splits = raw.get("splits", {})
        if not isinstance(splits, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for v in splits.values()):
            raise DataError("'splits' must be an object of split name -> number of rows")
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise DataError("'description' must be a string")
        try:
            return cls(modalities=[_entry(ModalitySpec, m, "modality", i) for i, m in
                                   enumerate(_list_of(raw["modalities"], "modalities"))],
                       labels=[_entry(LabelSpec, lab, "label", i) for i, lab in
                               enumerate(_list_of(raw.get("labels", []), "labels"))],
                       splits=dict(splits), description=description, version=version,
                       missing=_missing_counts(raw.get("missing", {})))
        except (TypeError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(str(err)[:200]) from None


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _list_of(value: Any, key: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"'{key}' must be a list of objects, got a JSON {_json_kind(value)}")
    return value


def _entry(spec: type, raw: Any, what: str, index: int):
    """One ModalitySpec/LabelSpec from its JSON object, naming a missing or unknown field."""
    if not isinstance(raw, dict):
        raise DataError(f"{what} #{index + 1} must be an object, got a JSON {_json_kind(raw)}")
    known = {f.name for f in fields(spec)}
    required = [f.name for f in fields(spec)
                if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in raw]
    unknown = sorted(set(raw) - known)
    label = f"{what} #{index + 1}" + (f" ({raw['name']!r})" if isinstance(raw.get("name"), str)
                                      else "")
    if missing or unknown:
        raise DataError(f"{label}: " + "; ".join(
            ([f"missing {', '.join(map(repr, missing))}"] if missing else [])
            + ([f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else [])))
    check_name(raw["name"], f"{what} name", modality=what == "modality")
    try:
        return spec(**raw)
    except DataError:
        raise
    except (TypeError, ValueError) as err:
        raise DataError(f"{label}: {str(err)[:200]}") from None


def _missing_counts(raw: Any) -> dict[str, dict[str, int]]:
    """The manifest's per-split, per-modality counts of absent values (version 2)."""
    if not isinstance(raw, dict) or not all(
            isinstance(v, dict) and all(isinstance(n, int) and not isinstance(n, bool)
                                        and n >= 0 for n in v.values())
            for v in raw.values()):
        raise DataError("'missing' must be an object of split -> modality -> number of rows")
    return {split: dict(counts) for split, counts in raw.items()}
