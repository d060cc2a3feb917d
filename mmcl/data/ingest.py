"""`mmcl data import SRC --out DATASET --spec SPEC.yaml`: real files -> a shard data set, on Ray Data.

SRC is a table (CSV, JSONL or Parquet; local or s3://) with a column per modality and label
columns, or a folder of webdataset tar shards (`key.jpg`, `key.txt`, `key.cls`, ...; a
"column" is then a file extension). The YAML spec (`ImportSpec`) says, per modality, which
column, what it holds (`path`: a file relative to the table; `text`: inline text; `numbers`:
inline numbers; `bytes`: the file's own bytes, as webdataset members are) and the kind with
its settings; per label column its task and classes; the split column or seeded fractions.

How it streams: the driver checks the table's columns from its header (no Ray Data pass
for that); Ray Data reads the table; when the table has no id column a single actor
numbers the rows in table order; a pool of actors decodes blocks column by column into
preallocated arrays (Pillow for images, soundfile + scipy's resample_poly for audio, numpy
for .npy, a transformers tokenizer for text; remote files fetched concurrently per block)
and writes each block's rows with a `ShardWriter` straight into a temporary folder next
to the output, returning only a small summary (rows, missing counts, normalisation sums,
dropped rows, its CPU seconds) to the driver. The normalisation sums are taken by the
writer from the arrays it writes: no second pass over the data. The driver holds the
manifest and those summaries, nothing else.
At the end the part files are renamed in order, manifest.json is written, and the temporary
folder replaces the output (`--overwrite`) -- so a refused or failed import leaves an existing
data set untouched and writes nothing.

A bad input (missing or unreadable file, wrong channel count, text longer than max_len
without truncation, a label outside the declared classes, ...) is one DataError naming the
row id, the column and the file; with `bad_rows: drop` such rows are skipped and counted by
reason instead. A null (or empty) cell is a missing modality, recorded in the manifest.

What a table may make an import read (docs/failure.md): a path cell names a file inside the
table's folder or the spec's `root` (symlinks resolved first; never the trust key's folder),
a URL only of a scheme in the spec's `urls`; one cell holds at most `max_cell_bytes`; audio
reads only the frames it keeps, text is tokenized in bounded prefixes; a tokenizer's own
code is never run. One import or convert writes a `--out` at a time (a lease beside it),
and a local output is replaced with one atomic rename (mmcl.data.shards.replace_with).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmcl import storage
from mmcl.cluster import connect
from mmcl.data.schema import (ID_COLUMN, MANIFEST_NAME, DataError, LabelSpec, Manifest,
                              ModalitySpec, length_column, present_column)
from mmcl.data.shards import (holding_output, output_lease,  # noqa: F401 - output_lease: API
                              recover_stranded, replace_with)
from mmcl.data.stats import FeatureStats, with_stats

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
SUMMARY_COLUMN = "summary"
_SPLIT_COLUMN = "__mmcl_split"
_FETCH_THREADS = 16  # concurrent requests per decode actor for remote files
_TABLE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_MAX_CELL_BYTES = 16 * 1024 * 1024
_TOKENIZE_CHARS = 4096  # text is tokenized in prefixes of at least this many characters


# ---------------------------------------------------------------------------- the spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModalityImport(_Strict):
    """One modality of the spec."""

    column: str = Field(description="table column (webdataset: file extension, e.g. jpg)")
    holds: Literal["path", "text", "numbers", "bytes"] = Field(
        "path", description="a file path relative to the table, inline text, inline numbers "
        "(a list, or a string of numbers), or the file's bytes (webdataset)")
    kind: Literal["image", "audio", "vector", "sequence", "text"]
    dtype: Literal["uint8", "int32", "int64", "float16", "float32"] | None = Field(
        None, description="storage dtype (default: uint8 images, int64 text, float32 else)")
    # image
    size: tuple[int, int] | None = Field(None, description="image (height, width)")
    channels: int = Field(3, ge=1, le=4, description="image channels the files must have")
    resize: Literal["resize", "crop"] = Field(
        "crop", description="resize: stretch to size; crop: scale the shorter side, centre crop")
    # audio
    sample_rate: int | None = Field(None, ge=1, description="audio: resample to this rate")
    length: int | None = Field(None, ge=1, description="audio: samples kept (cut or zero-padded)")
    # vector / sequence (fixed shape) or variable-length sequence
    shape: tuple[int, ...] | None = Field(None, description="vector (D,) or sequence (T, D)")
    max_len: int | None = Field(None, ge=1, description="text tokens / variable sequence steps")
    features: int | None = Field(None, ge=1, description="variable sequence: features per step")
    # text
    tokenizer: str | None = Field(None, description="local folder or Hugging Face hub name")
    truncation: bool = Field(False, description="cut text longer than max_len (else an error)")

    @model_validator(mode="after")
    def _settings_fit_kind(self) -> "ModalityImport":
        need = {"image": ("size",), "audio": ("sample_rate", "length"),
                "text": ("tokenizer", "max_len")}.get(self.kind, ())
        missing = [k for k in need if getattr(self, k) is None]
        if self.kind == "vector" and self.shape is None:
            missing.append("shape")
        if self.kind == "sequence" and self.shape is None and (
                self.max_len is None or self.features is None):
            missing.append("shape (fixed) or max_len + features (variable length)")
        if missing:
            raise ValueError(f"a {self.kind} modality needs {', '.join(missing)}")
        return self

    @property
    def variable(self) -> bool:
        return self.kind == "text" or (self.kind == "sequence" and self.shape is None)

    def storage_dtype(self) -> str:
        if self.dtype:
            return self.dtype
        return {"image": "uint8", "text": "int64"}.get(self.kind, "float32")

    def stored_shape(self) -> tuple[int, ...]:
        if self.kind == "image":
            return (self.channels, *self.size)
        if self.kind == "audio":
            return (self.length,)
        if self.kind == "text":
            return (self.max_len,)
        if self.variable:
            return (self.max_len, self.features)
        return tuple(self.shape)


class LabelImport(_Strict):
    column: str
    task: Literal["classification", "regression", "multilabel"] = "classification"
    classes: list[str] | None = Field(
        None, description="class names (values must be one of them); classification may "
        "give num_classes instead for integer labels 0..K-1")
    num_classes: int | None = Field(None, ge=2)
    separator: str = Field("|", description="multilabel: separator of names in a string cell")

    @model_validator(mode="after")
    def _classes_declared(self) -> "LabelImport":
        if self.task == "multilabel" and not self.classes:
            raise ValueError("a multilabel column needs its classes")
        if self.task == "classification" and not self.classes and not self.num_classes:
            raise ValueError("a classification column needs classes (or num_classes)")
        return self


class ImportSpec(_Strict):
    modalities: dict[str, ModalityImport] = Field(min_length=1)
    labels: dict[str, LabelImport] = Field(default_factory=dict)
    id_column: str | None = Field(None, description="column of unique integer tuple ids "
                                  "(default: row numbers in table order)")
    split_column: str | None = Field(None, description="column naming each row's split")
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    bad_rows: Literal["fail", "drop"] = Field(
        "fail", description="a row with a bad input: fail the import, or drop and count it")
    rows_per_task: int = Field(1024, ge=1, description="rows each decode task writes at once")
    description: str = ""
    # What a cell may read (see `Decoder.locate`)
    root: str | None = Field(None, description="folder that path cells may name files in "
                             "(default: the table's own folder; a relative root is read from "
                             "the working directory); symlinks are resolved first")
    urls: list[Literal["s3", "gs", "gcs", "http", "https"]] = Field(
        default_factory=list, description="URL schemes a path cell may name (default: none; "
        "file:// never)")
    max_cell_bytes: int = Field(DEFAULT_MAX_CELL_BYTES, ge=1, description="the most bytes "
                                "one cell (inline value, or the file it names) may hold")


def load_spec(path: str) -> ImportSpec:
    """The import spec at `path`; DataError naming the file and the field on any problem."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such spec file") from None
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({err})") from None
    try:
        spec = ImportSpec.model_validate(raw or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{path}: {where}: {first['msg']} ({err.error_count()} problem(s))"
                        ) from None
    from mmcl.data.convert import check_fractions

    check_fractions(spec.fractions)
    for name in [*spec.modalities, *spec.labels]:
        if "__" in name or name == ID_COLUMN:
            raise DataError(f"{path}: name {name!r} is reserved or contains '__'")
    return spec


# ---------------------------------------------------------------------------- manifest


def _tokenizer(name: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("text modalities need Hugging Face transformers: pip install "
                        "'mmcl[text]'") from None

    own_code = DataError(f"tokenizer {name!r} comes with its own code (auto_map in its "
                         "tokenizer_config.json or config.json); mmcl never runs a tokenizer "
                         "folder's code: use a tokenizer saved with save_pretrained from a "
                         "standard transformers class")
    for file in ("tokenizer_config.json", "config.json"):
        try:
            with open(os.path.join(name, file)) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and "auto_map" in config:
            raise own_code
    try:
        # A folder (or hub repo) whose tokenizer is its own Python code is never run:
        # trust_remote_code=False refuses it without transformers' interactive prompt.
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any loading failure is the spec's problem
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise own_code from None
        raise DataError(f"tokenizer {name!r} cannot be loaded ({first}); give a local folder "
                        "saved with save_pretrained, or a hub name on a machine that reaches "
                        "the hub") from None


def _pad_id(tok) -> int:
    return int(tok.pad_token_id) if tok.pad_token_id is not None else 0


def build_manifest(spec: ImportSpec) -> Manifest:
    """The manifest an import with `spec` writes (before counts and constants)."""
    mods = []
    for name, m in spec.modalities.items():
        extra: dict[str, Any] = {}
        if m.kind == "text":
            tok = _tokenizer(m.tokenizer)
            extra = dict(tokenizer=m.tokenizer, vocab_size=len(tok), pad_id=_pad_id(tok),
                         mask_id=tok.mask_token_id)
        if m.kind == "audio":
            extra = dict(sample_rate=m.sample_rate)
        mods.append(ModalitySpec(name, m.stored_shape(), m.kind, m.storage_dtype(),
                                 variable_length=m.variable, nullable=True, **extra))
    labels = [LabelSpec(name, lab.task, lab.num_classes if not lab.classes else None,
                        classes=tuple(lab.classes or ()))
              for name, lab in spec.labels.items()]
    return Manifest(mods, labels, description=spec.description)


# ----------------------------------------------------------------------------- decoding


class RowError(DataError):
    """One bad input; `reason` is a short category for the summary of dropped rows."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _Cell:
    row_id: int
    column: str
    file: str = ""

    def error(self, what: str, reason: str) -> RowError:
        where = f" file {self.file}:" if self.file else ""
        return RowError(f"row id {self.row_id}, column {self.column!r}:{where} {what}", reason)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, (str, bytes)) and not value.strip()


def _resolve(base: str, value: str) -> str:
    """A path relative to the table's folder (absolute paths and URLs as they are)."""
    if "://" in value or os.path.isabs(value):
        return value
    return posixpath.join(base, value) if "://" in base else os.path.join(base, value)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def trust_key_folder() -> str:
    """The folder of the user's mmcl trust key (mmcl.tune.trust): never read by an import."""
    from mmcl.tune.trust import key_file

    return os.path.realpath(key_file().parent)


class Decoder:
    """Decodes one row's cell per modality into stored values; caches tokenizers and one
    filesystem per bucket (a local file is read with `open`: no fsspec per file).

    What a path cell may read (`locate`): a file inside the table's folder, or inside the
    `root` the spec names, after resolving symlinks and `..`; never a file in the trust
    key's folder; a URL only when the spec lists its scheme in `urls` (file:// never). What
    it may hold: at most `max_cell_bytes` (a file is read only that far)."""

    def __init__(self, spec: ImportSpec, manifest: Manifest, base: str,
                 endpoint_url: str | None, region: str | None):
        self.spec, self.manifest, self.base = spec, manifest, base
        self.remote = {"endpoint_url": endpoint_url, "region": region}
        self.tokenizers = {name: _tokenizer(m.tokenizer) for name, m in spec.modalities.items()
                           if m.kind == "text"}
        self._filesystems: dict[str, Any] = {}
        self._fetched: dict[str, bytes | BaseException] = {}
        root = spec.root or base
        self.root = root.rstrip("/") if storage.is_remote(root) else os.path.realpath(root)
        self.key_folder = trust_key_folder()

    def _remote_fs(self, url: str):
        """(filesystem, path) of a remote file; one filesystem per scheme and bucket."""
        scheme, _, rest = url.partition("://")
        key = f"{scheme}://{rest.split('/', 1)[0]}"
        if key not in self._filesystems:
            self._filesystems[key] = storage.filesystem(url, **self.remote)[0]
        fs = self._filesystems[key]
        return fs, fs._strip_protocol(url)

    def locate(self, value: str, cell: _Cell) -> str:
        """The file (local path or URL) a path cell may read; RowError if it may not."""
        allow = ("put the files inside the table's folder, or name a folder that holds "
                 "them with `root:` in the spec")
        if "://" in value:
            scheme = value.split("://", 1)[0].lower()
            if scheme == "file":
                raise cell.error(f"the file:// URL {value[:80]!r} is not read: give a path "
                                 f"relative to the table ({allow})", "path not allowed")
            if scheme not in self.spec.urls and not (
                    storage.is_remote(self.base) and value.startswith(self.root + "/")):
                raise cell.error(f"the URL {value[:80]!r} is not read: the spec allows no "
                                 f"{scheme}:// URLs; add `urls: [{scheme}]` to the spec to "
                                 "fetch them", "URL not allowed")
            return value
        if storage.is_remote(self.base):
            scheme, _, rest = self.base.partition("://")
            url = f"{scheme}://{posixpath.normpath(posixpath.join(rest, value))}"
            if value.startswith("/") or not _inside(url, self.root):
                raise cell.error(f"the path {value[:80]!r} is outside the table's folder "
                                 f"{self.root}; {allow}", "path not allowed")
            return url
        path = os.path.realpath(os.path.join(self.base, os.path.expanduser(value)))
        if not _inside(path, self.root):
            raise cell.error(f"the path {value[:80]!r} resolves to {path}, outside the "
                             f"table's folder {self.root} (symlinks are followed first); "
                             f"{allow}", "path not allowed")
        if _inside(path, self.key_folder):
            raise cell.error(f"the path {value[:80]!r} is in the folder of mmcl's trust key "
                             f"{self.key_folder}, which an import never reads",
                             "path not allowed")
        return path

    def _too_big(self, cell: _Cell, what: str) -> RowError:
        return cell.error(f"{what} holds more than max_cell_bytes={self.spec.max_cell_bytes} "
                          "bytes; raise max_cell_bytes in the spec if it should be read",
                          "cell too large")

    def prefetch(self, values: list, m: ModalityImport) -> None:
        """Fetch the remote files of one block's cells concurrently (one request at a time
        would wait on the network once per image); `_read` takes them from here, errors
        included. Local files are read as they are decoded; cells that may not be read
        (`locate`) are not fetched; audio is opened lazily (only its kept frames)."""
        self._fetched = {}
        if m.holds != "path" or m.kind == "audio":
            return
        urls = set()
        for v in values:
            if isinstance(v, str) and v.strip():
                try:
                    url = self.locate(v, _Cell(0, m.column))
                except RowError:
                    continue  # refused again, with its row, when the cell is read
                if storage.is_remote(url):
                    urls.add(url)
        urls = sorted(urls)
        if not urls:
            return
        from concurrent.futures import ThreadPoolExecutor

        for url in urls:  # the filesystems, made here and not in the threads
            self._remote_fs(url)
        limit = self.spec.max_cell_bytes

        def fetch(url: str) -> bytes | BaseException:
            try:
                fs, path = self._remote_fs(url)
                return fs.cat_file(path, start=0, end=limit + 1)
            except Exception as err:  # noqa: BLE001 - raised again by _read for its cell
                return err

        with ThreadPoolExecutor(min(_FETCH_THREADS, len(urls))) as pool:
            self._fetched = dict(zip(urls, pool.map(fetch, urls)))

    # -- reading a cell's bytes
    def _read(self, value: Any, m: ModalityImport, cell: _Cell) -> bytes:
        limit = self.spec.max_cell_bytes
        if m.holds == "bytes" or isinstance(value, bytes):
            data = value if isinstance(value, bytes) else str(value).encode()
            if len(data) > limit:
                raise self._too_big(cell, "the cell")
            return data
        cell.file = url = self.locate(str(value), cell)
        try:
            if url in self._fetched:
                data = self._fetched.pop(url)
                if isinstance(data, BaseException):
                    raise data
            elif storage.is_remote(url):
                fs, path = self._remote_fs(url)
                data = fs.cat_file(path, start=0, end=limit + 1)
            else:
                with open(url, "rb") as f:
                    data = f.read(limit + 1)
        except FileNotFoundError:
            raise cell.error("no such file", "missing file") from None
        except (OSError, PermissionError) as err:
            raise cell.error(f"cannot read the file ({err})", "unreadable file") from None
        if len(data) > limit:
            raise self._too_big(cell, "the file")
        return data

    def _open(self, value: Any, m: ModalityImport, cell: _Cell):
        """A file object of the cell's file, read lazily (audio: only the kept frames)."""
        if m.holds == "bytes" or isinstance(value, bytes):
            return io.BytesIO(self._read(value, m, cell))
        cell.file = url = self.locate(str(value), cell)
        try:
            if storage.is_remote(url):
                fs, path = self._remote_fs(url)
                return fs.open(path, "rb")
            return open(url, "rb")
        except FileNotFoundError:
            raise cell.error("no such file", "missing file") from None
        except (OSError, PermissionError) as err:
            raise cell.error(f"cannot read the file ({err})", "unreadable file") from None

    def decode(self, name: str, value: Any, row_id: int) -> tuple[np.ndarray, int | None]:
        """(stored values, length for variable-length modalities)."""
        m = self.spec.modalities[name]
        cell = _Cell(row_id, m.column)
        if isinstance(value, str) and m.holds in ("text", "numbers") \
                and len(value) > self.spec.max_cell_bytes:
            raise self._too_big(cell, "the cell")
        return getattr(self, f"_{m.kind}")(name, m, value, cell)

    def _image(self, name, m: ModalityImport, value, cell):
        from PIL import Image, UnidentifiedImageError

        data = self._read(value, m, cell)
        try:
            img = Image.open(io.BytesIO(data))
            img.draft(None, draft_size(img.size, m.size))  # JPEG: decode at reduced scale
            img.load()
        except Image.DecompressionBombError as err:
            raise cell.error(f"the image is too large to decode ({err}); shrink it",
                             "image too large") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise cell.error(f"not a readable image ({err})", "unreadable image") from None
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        channels = len(img.getbands())
        if channels != m.channels:
            raise cell.error(f"the image has {channels} channel(s) (mode {img.mode}), the spec "
                             f"declares channels: {m.channels}", "wrong channel count")
        if img.mode not in ("L", "RGB", "RGBA", "LA"):
            img = img.convert("L" if channels == 1 else "RGB")
        img = fit_image(img, m.size, m.resize)
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return np.ascontiguousarray(arr.transpose(2, 0, 1)), None

    def _audio(self, name, m: ModalityImport, value, cell):
        """Only the frames that are kept are read: `length` samples at the target rate,
        plus the resampling filter's reach."""
        import soundfile as sf
        from scipy.signal import resample_poly

        bad = (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError, OSError)
        with self._open(value, m, cell) as fobj:
            try:
                with sf.SoundFile(fobj) as f:
                    rate, declared = int(f.samplerate), f.frames
                    g = math.gcd(rate, int(m.sample_rate))
                    up, down = int(m.sample_rate) // g, rate // g
                    need = m.length if rate == m.sample_rate else (
                        math.ceil(m.length * down / up) + 10 * max(up, down) // up + 16)
                    want = min(need, declared) if declared > 0 else need
                    wave = f.read(want, dtype="float32", always_2d=True)
                    cut_short = "should be" in "".join(
                        ln for ln in f.extra_info.splitlines() if ln.startswith("data"))
            except bad as err:
                raise cell.error(f"not a readable audio file ({err})", "unreadable audio"
                                 ) from None
        if cut_short or (declared > 0 and len(wave) < want):
            raise cell.error("the audio file is truncated (its header declares more "
                             "samples than it holds)", "truncated audio")
        wave = wave.mean(axis=1)  # mono
        if rate != m.sample_rate:
            wave = resample_poly(wave, up, down).astype(np.float32)
        out = np.zeros(m.length, np.float32)
        out[:min(len(wave), m.length)] = wave[:m.length]
        return out, None

    def _tokens(self, tok, text: str, m: ModalityImport) -> tuple[list[int], bool]:
        """(token ids, exact): a long text is tokenized in growing prefixes until one gives
        more tokens than are kept (+ a margin for the word the prefix cuts), so one cell's
        memory stays near max_len, not its size. exact: the whole text was tokenized."""
        chars = max(_TOKENIZE_CHARS, 32 * m.max_len)
        while True:
            if len(text) <= chars:
                return tok(text, add_special_tokens=True)["input_ids"], True
            ids = tok(text[:chars], add_special_tokens=True)["input_ids"]
            if len(ids) > m.max_len + 8:
                return ids, False
            chars *= 4

    def _text(self, name, m: ModalityImport, value, cell):
        text = value
        if m.holds in ("path", "bytes"):
            text = self._read(value, m, cell)
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise cell.error(f"the text is not valid UTF-8 (byte {err.start}); save it "
                                 "as UTF-8", "not UTF-8") from None
        tok = self.tokenizers[name]
        ids, exact = self._tokens(tok, str(text), m)
        if len(ids) > m.max_len and not m.truncation:
            count = f"{len(ids)}" if exact else f"over {m.max_len}"
            raise cell.error(f"the text has {count} tokens, more than max_len={m.max_len}; "
                             "raise max_len or set truncation: true", "text too long")
        ids = ids[:m.max_len]
        out = np.full(m.max_len, _pad_id(tok), np.int64)
        out[:len(ids)] = ids
        return out, len(ids)

    def _numbers(self, value, m: ModalityImport, cell) -> np.ndarray:
        if m.holds in ("path", "bytes"):
            arr = _load_npy(self._read(value, m, cell), cell)
        else:
            try:
                if isinstance(value, str):
                    text = value.strip().strip("[]").replace(",", " ")
                    arr = np.array([float(v) for v in text.split()], np.float64)
                else:
                    arr = np.asarray(value, np.float64)
            except (TypeError, ValueError):
                raise cell.error(f"cannot read numbers from {str(value)[:40]!r}", "bad numbers"
                                 ) from None
        if arr.dtype.kind not in "biuf":
            raise cell.error(f"the array has dtype {arr.dtype}, not numbers", "bad numbers")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise cell.error(f"{int((~np.isfinite(arr)).sum())} value(s) are nan or inf; "
                             "give finite numbers (or bad_rows: drop to skip such rows)",
                             "non-finite numbers")
        return arr

    def _vector(self, name, m: ModalityImport, value, cell):
        arr = self._numbers(value, m, cell)
        if arr.size != math.prod(m.shape):
            raise cell.error(f"{arr.size} numbers, the spec declares shape {list(m.shape)}",
                             "wrong shape")
        return arr.reshape(m.shape), None

    def _sequence(self, name, m: ModalityImport, value, cell):
        arr = self._numbers(value, m, cell)
        if not m.variable:
            if arr.size != math.prod(m.shape):
                raise cell.error(f"shape {list(arr.shape)}, the spec declares "
                                 f"{list(m.shape)}", "wrong shape")
            return arr.reshape(m.shape), None
        arr = arr.reshape(-1, m.features) if arr.size % m.features == 0 else None
        if arr is None:
            raise cell.error(f"the values do not split into steps of {m.features} features",
                             "wrong shape")
        if len(arr) > m.max_len:
            raise cell.error(f"{len(arr)} steps, more than max_len={m.max_len}", "too long")
        out = np.zeros((m.max_len, m.features), np.float64)
        out[:len(arr)] = arr
        return out, len(arr)


def _load_npy(data: bytes, cell: _Cell) -> np.ndarray:
    """A .npy array from its bytes; its header is checked against the bytes there are
    before anything is allocated (a header may claim terabytes)."""
    fmt = np.lib.format
    bio = io.BytesIO(data)
    try:
        version = fmt.read_magic(bio)
        header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = header(bio)
        if dtype.hasobject:
            raise ValueError("object arrays are not read")
        need = math.prod(shape) * dtype.itemsize
        if need > len(data) - bio.tell():
            raise ValueError(f"its header declares shape {list(shape)} ({need} bytes), the "
                             f"file holds {len(data) - bio.tell()}: truncated or corrupt")
        bio.seek(0)
        return np.load(bio, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError, SyntaxError, TypeError) as err:
        raise cell.error(f"not a readable .npy array ({err})", "unreadable array") from None


def draft_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest size JPEG draft decoding may go to: still covers `target` (h, w)."""
    w, h = size
    scale = max(target[1] / w, target[0] / h)
    return (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))


def fit_image(img, size: tuple[int, int], how: str):
    """`img` at `size` (h, w): stretched (`resize`) or its shorter side resized and centre
    cropped; Pillow only (the import bench's limit runs the same geometry)."""
    from PIL import Image

    height, width = size
    if how == "resize":
        return img.resize((width, height), Image.BILINEAR)
    w, h = img.size
    scale = max(width / w, height / h)
    new = (max(width, round(w * scale)), max(height, round(h * scale)))
    img = img.resize(new, Image.BILINEAR)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return img.crop((left, top, left + width, top + height))


def _label_value(lab: LabelImport, spec: LabelSpec, value: Any, row_id: int):
    cell = _Cell(row_id, lab.column)
    if lab.task == "multilabel" and (value is None or isinstance(value, (str, bytes))
                                     and not value.strip()):
        return np.zeros(spec.num_classes, np.uint8)  # an empty cell: none of the classes
    if _is_missing(value):
        raise cell.error("the label is missing", "missing label")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise cell.error(f"the label is not valid UTF-8 (byte {err.start})", "bad label"
                             ) from None
    if lab.task == "regression":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise cell.error(f"{str(value)[:40]!r} is not a number", "bad label") from None
        if not math.isfinite(number):
            raise cell.error(f"the regression label is {number}; labels must be finite",
                             "bad label")
        return number
    if lab.task == "multilabel":
        names = value if isinstance(value, (list, tuple, np.ndarray)) else \
            [v for v in str(value).split(lab.separator) if v.strip()]
        hot = np.zeros(spec.num_classes, np.uint8)
        for v in names:
            hot[_class_index(lab, spec, v, cell)] = 1
        return hot
    return _class_index(lab, spec, value, cell)


def _class_index(lab: LabelImport, spec: LabelSpec, value: Any, cell: _Cell) -> int:
    text = str(value).strip()
    if lab.classes:
        if text in lab.classes:
            return lab.classes.index(text)
        raise cell.error(f"{text!r} is not one of the declared classes {lab.classes}",
                         "label not in classes")
    try:
        number = float(text)
        index = int(number) if math.isfinite(number) and number.is_integer() else -1
    except ValueError:
        index = -1
    if not 0 <= index < spec.num_classes:
        raise cell.error(f"{text[:40]!r} is not a class id (an integer 0.."
                         f"{spec.num_classes - 1})",
                         "label not in classes")
    return index


# ------------------------------------------------------------------------ the Ray stages


def _row_split(row_id: int, fractions: tuple[float, float, float], seed: int) -> str:
    """A seeded, stable split for one id: the same id lands in the same split every time."""
    from mmcl.data.pipeline import derive_seed

    u = derive_seed(seed, row_id) / 2 ** 31
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1]
                                             else "test")


class _Numberer:
    """Adds `id` = row number in table order (one actor, ordered execution)."""

    def __init__(self):
        self.next = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        ids = np.arange(self.next, self.next + table.num_rows, dtype=np.int64)
        self.next += table.num_rows
        return table.append_column(ID_COLUMN, pa.array(ids))


class _ImportBlock:
    """The decode-and-write actor: a block of source rows in, one summary row out."""

    def __init__(self, spec_json: str, manifest_json: str, base: str, tmp: str,
                 endpoint_url: str | None, region: str | None):
        self.spec = ImportSpec.model_validate_json(spec_json)
        self.manifest = Manifest.from_json(manifest_json)
        self.tmp, self.remote = tmp, {"endpoint_url": endpoint_url, "region": region}
        self.decoder = Decoder(self.spec, self.manifest, base, endpoint_url, region)

    def __call__(self, table: pa.Table) -> pa.Table:
        """Column by column: each modality's cells of the whole block are decoded into one
        preallocated array (no per-row dicts, one stack-free copy per split). The error
        raised (`bad_rows: fail`) is the first bad cell in row order, then spec order, and a
        dropped row counts its first bad cell's reason, as a row-by-row pass would."""
        from mmcl.data.shards import ShardWriter

        cpu = time.process_time()
        n = table.num_rows
        ids = [int(i) for i in table.column(ID_COLUMN).to_pylist()]
        splits = np.asarray(table.column(_SPLIT_COLUMN).to_pylist(), dtype=object)
        state = _BlockErrors(n, self.spec.bad_rows == "fail")
        columns: dict[str, np.ndarray] = {ID_COLUMN: np.asarray(ids, np.int64)}
        for name, m in self.spec.modalities.items():
            columns.update(self._modality(name, m, self._cells(table, m.column, n), ids,
                                          state))
        for name, lab in self.spec.labels.items():
            columns[name] = self._labels(name, lab, self._cells(table, lab.column, n), ids,
                                         state)
        if state.error is not None:
            raise DataError(str(state.error)) from None
        summary: dict[str, Any] = {"splits": {}, "dropped": state.dropped}
        # Named by the block's first id, so that sorting the names orders the part files
        # the same way on every run (random names would not).
        prefix = f"blk{min(ids, default=0):+021d}"
        kept = splits[state.keep]
        for split in dict.fromkeys(kept.tolist()):
            rows = np.flatnonzero(state.keep & (splits == split))
            try:
                with ShardWriter(self.tmp, split, self.manifest, prefix=prefix,
                                 **self.remote) as writer:
                    writer.write({k: v[rows] for k, v in columns.items()})
            except OSError as err:  # a full disk, a storage error: one line, not retried
                raise DataError(f"cannot write the import's shards ({self.tmp}): "
                                f"{err.strerror or err}") from None
            summary["splits"][split] = {
                "rows": writer.rows, "missing": writer.missing, "files": writer.files,
                "stats": {k: s.to_dict() for k, s in writer.stats.items() if s.count}}
        # For `mmcl bench`: this process's CPU seconds in the block, and when it ended.
        summary["cpu_s"], summary["done_at"] = time.process_time() - cpu, time.time()
        summary["rows_in"] = n
        if self.spec.id_column:  # the table's own ids: the driver checks them for repeats
            summary["ids"] = base64.b64encode(np.asarray(ids, "<i8").tobytes()).decode()
        return pa.table({SUMMARY_COLUMN: [json.dumps(summary)]})

    @staticmethod
    def _cells(table: pa.Table, column: str, n: int) -> list:
        # A webdataset block may lack a member (column) that other blocks have: all null.
        if column not in table.column_names:
            return [None] * n
        return table.column(column).to_pylist()

    def _modality(self, name: str, m: ModalityImport, cells: list, ids: list[int],
                  state: "_BlockErrors") -> dict[str, np.ndarray]:
        mspec = self.manifest.modality(name)
        n = len(cells)
        # Decoded values keep the decoder's dtype (uint8 images, float64 numbers, ...):
        # ShardWriter casts them to the storage dtype and refuses values that do not fit.
        values = np.zeros((n, *mspec.shape), _DECODED_DTYPE.get(m.kind, np.float64))
        present = np.zeros(n, bool)
        lengths = np.zeros(n, np.int32) if mspec.variable_length else None
        self.decoder.prefetch([c for i, c in enumerate(cells) if state.wanted(i)], m)
        for i, cell in enumerate(cells):
            if not state.wanted(i) or _is_missing(cell):
                continue
            try:
                decoded, length = self.decoder.decode(name, cell, ids[i])
            except RowError as err:
                state.bad(i, err)
                continue
            values[i], present[i] = decoded, True
            if lengths is not None:
                lengths[i] = length
        out = {name: values, present_column(name): present}
        if lengths is not None:
            out[length_column(name)] = lengths
        return out

    def _labels(self, name: str, lab: LabelImport, cells: list, ids: list[int],
                state: "_BlockErrors") -> np.ndarray:
        spec = self.manifest.label(name)
        if lab.task == "multilabel":
            out = np.zeros((len(cells), spec.num_classes), np.uint8)
        else:
            out = np.zeros(len(cells), np.float64 if lab.task == "regression" else np.int64)
        for i, cell in enumerate(cells):
            if state.wanted(i):
                try:
                    out[i] = _label_value(lab, spec, cell, ids[i])
                except RowError as err:
                    state.bad(i, err)
        return out


# What each kind's decoder returns (text: token ids; vector/sequence: float64 numbers).
_DECODED_DTYPE = {"image": np.uint8, "audio": np.float32, "text": np.int64}


class _BlockErrors:
    """Bad cells of one block, visited column by column. `fail`: keep the first bad cell in
    row order (a later column only needs the rows before it); `drop`: a row is dropped at
    its first bad cell, whose reason is counted."""

    def __init__(self, n: int, fail: bool):
        self.fail, self.limit = fail, n
        self.keep = np.ones(n, bool)
        self.error: RowError | None = None
        self.dropped: dict[str, int] = {}

    def wanted(self, i: int) -> bool:
        return i < self.limit and bool(self.keep[i])

    def bad(self, i: int, err: RowError) -> None:
        if self.fail:
            self.error, self.limit = err, i  # rows >= i: an earlier cell already failed
        else:
            self.keep[i] = False
            self.dropped[err.reason] = self.dropped.get(err.reason, 0) + 1


# ----------------------------------------------------------------------------- driver


def _source_format(src: str, fs, path: str) -> str:
    """csv / json / parquet / webdataset for SRC (a folder of .tar files is webdataset)."""
    if fs.isdir(path):
        entries = fs.ls(path, detail=False)
        if any(e.endswith(".tar") for e in entries):
            return "webdataset"
        raise DataError(f"{src} is a folder without webdataset .tar shards; give a CSV, JSONL "
                        "or Parquet table, or a folder of .tar shards")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _TABLE_FORMATS:
        raise DataError(f"{src}: unknown table format {ext!r}; use .csv, .jsonl or .parquet")
    return _TABLE_FORMATS[ext]


def _csv_block_bytes(spec: ImportSpec | None) -> int:
    """pyarrow's CSV block: a row must fit in one, so a cell of max_cell_bytes does."""
    return (spec.max_cell_bytes if spec else DEFAULT_MAX_CELL_BYTES) + (1 << 20)


def _check_tars(src: str, fs, path: str) -> None:
    """Refuse a .tar shard that does not end as a tar does (its size a multiple of 512 bytes,
    ending in the two zero blocks of end-of-archive): Ray Data's reader stops at a cut-short
    member without a word, so a truncated shard would import part of its tuples. One small
    read per shard."""
    for entry in sorted(fs.ls(path, detail=False)):
        if not entry.endswith(".tar"):
            continue
        size = fs.size(entry)
        tail = fs.cat_file(entry, start=max(0, size - 1024), end=size) if size else b""
        if size < 1024 or size % 512 or tail.strip(b"\0"):
            raise DataError(f"{src}: the webdataset shard {posixpath.basename(entry)} is "
                            f"truncated or corrupt ({size} bytes, no end-of-archive blocks); "
                            "write it again (or remove it) and import again")


def _read_source(src: str, fmt: str, endpoint_url, region, spec: ImportSpec | None = None):
    import ray.data
    import pyarrow.csv as pacsv

    path, filesystem = storage.pyarrow_filesystem(src, endpoint_url, region)
    if fmt == "webdataset":
        return ray.data.read_webdataset(path, filesystem=filesystem, decoder=None)
    if fmt == "csv":
        # Cells stay strings (paths, numbers lists, class names); empty cells are nulls.
        return ray.data.read_csv(path, filesystem=filesystem, partitioning=None,
                                 convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
                                 read_options=pacsv.ReadOptions(
                                     block_size=_csv_block_bytes(spec)))
    if fmt == "json":
        return ray.data.read_json(path, filesystem=filesystem, partitioning=None,
                                  lines=True)
    return ray.data.read_parquet(path, filesystem=filesystem, partitioning=None)


def _table_columns(src: str, fmt: str, fs, path: str,
                   spec: ImportSpec | None = None) -> list[str]:
    """The column names of a CSV, JSONL or Parquet table from its header or first block,
    read here: no Ray Data execution (a read task) just to learn the schema."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return list(pq.read_schema(f).names)
            if fmt == "csv":
                return list(pacsv.open_csv(f, read_options=pacsv.ReadOptions(
                    block_size=_csv_block_bytes(spec))).schema.names)
            return list(pajson.open_json(f).schema.names)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        if isinstance(err, UnicodeDecodeError):
            first = f"its header is not valid UTF-8: {first}; save the table as UTF-8"
        elif "straddling" in first:
            first = (f"a row is longer than max_cell_bytes={_csv_block_bytes(spec) - (1 << 20)}"
                     f" bytes: {first}; shorten it, or raise max_cell_bytes in the spec")
        raise DataError(f"{src}: cannot read the table ({first})") from None


def _check_columns(src: str, spec: ImportSpec, names: list[str]) -> None:
    wanted = [(f"modalities.{k}", m.column) for k, m in spec.modalities.items()]
    wanted += [(f"labels.{k}", lab.column) for k, lab in spec.labels.items()]
    wanted += [(key, col) for key, col in (("id_column", spec.id_column),
                                           ("split_column", spec.split_column)) if col]
    absent = [f"{key}: {col!r}" for key, col in wanted if col not in names]
    if absent:
        raise DataError(f"{src}: column(s) named in the spec are not in the table: "
                        f"{', '.join(absent)}; the table has {names}")


def _add_split(table: pa.Table, spec_json: str) -> pa.Table:
    """Adds `id` (from the spec's id column) and each row's split."""
    spec = ImportSpec.model_validate_json(spec_json)
    if spec.id_column and spec.id_column != ID_COLUMN:
        table = table.append_column(ID_COLUMN, table.column(spec.id_column))
    ids = _checked_ids(table.column(ID_COLUMN).to_pylist(), spec.id_column or ID_COLUMN)
    table = table.set_column(table.column_names.index(ID_COLUMN), ID_COLUMN,
                             pa.array(ids, pa.int64()))
    if spec.split_column:
        splits = [str(s) for s in table.column(spec.split_column).to_pylist()]
        bad = [(i, s) for i, s in zip(ids, splits) if s not in SPLIT_NAMES]
        if bad:
            raise DataError(f"row id {bad[0][0]}, column {spec.split_column!r}: split "
                            f"{bad[0][1]!r} is not one of {list(SPLIT_NAMES)}")
    else:
        splits = [_row_split(int(i), spec.fractions, spec.seed) for i in ids]
    return table.append_column(_SPLIT_COLUMN, pa.array(splits, pa.string()))


_INT64 = (-2 ** 63, 2 ** 63 - 1)


def _checked_ids(values: list, column: str) -> list[int]:
    """The id column's values as ints; DataError for one that is not an integer in int64
    (`abc`, empty, `2.5`, 2**63)."""
    out = []
    for v in values:
        i = None
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if isinstance(v, int) and not isinstance(v, bool):
            i = v
        elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
            i = int(v)
        elif isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            i = int(v.strip())
        if i is None or not _INT64[0] <= i <= _INT64[1]:
            raise DataError(f"column {column!r} (the tuple ids): {str(v)[:40]!r} is not an "
                            "integer id (ids are unique integers in the int64 range; "
                            "leave id_column unset to number the rows)")
        out.append(i)
    return out


@dataclass
class ImportResult:
    manifest: Manifest
    dropped: dict[str, int]
    bytes: int
    decode_cpu_s: float = 0.0  # CPU seconds of the decode actors' processes in their blocks
    blocks: list[tuple[int, float]] = field(default_factory=list)  # (rows, end)

    def summary(self) -> str:
        m = self.manifest
        lines = [f"imported {sum(m.splits.values())} tuples: "
                 + ", ".join(f"{k} {v}" for k, v in m.splits.items())
                 + f" ({self.bytes / 1e6:.2f} MB)"]
        missing = {k: v for k, v in m.missing.items() if any(v.values())}
        if missing:
            lines.append("missing modalities: " + "; ".join(
                f"{split}: " + ", ".join(f"{n} {c}" for n, c in counts.items() if c)
                for split, counts in missing.items()))
        lines.append("rows dropped: " + (", ".join(f"{n} ({why})" for why, n in
                                                   self.dropped.items()) or "none"))
        return "\n".join(lines)


def _check_target(fs, path: str, out: str, overwrite: bool) -> None:
    if fs.exists(path) and fs.ls(path, detail=False) and not overwrite:
        raise DataError(f"{out} already exists and is not empty; pass --overwrite to replace "
                        "it, or choose another output folder")


def import_table(src: str, out: str, spec: ImportSpec, overwrite: bool = False,
                 endpoint_url: str | None = None, region: str | None = None,
                 concurrency: int | None = None, address: str | None = None) -> ImportResult:
    """Import SRC into a data set at `out` with `spec` (see the module doc) on the Ray
    initialised here, the cluster at `address`, or a local Ray started for it. Holds the
    output's writer lease throughout (a second import or convert to `out` is refused)."""
    if spec.root and not storage.is_remote(spec.root):  # decode actors run elsewhere
        spec = spec.model_copy(update={"root": os.path.abspath(os.path.expanduser(spec.root))})
    fs, path = storage.filesystem(out, endpoint_url, region)
    if not storage.is_remote(out):
        path = os.path.realpath(path)  # an --out that is a link: its folder is replaced
    with holding_output(out if storage.is_remote(out) else path, endpoint_url, region):
        if not storage.is_remote(out):
            recover_stranded(path)
        _check_target(fs, path, out, overwrite)
        return _import(src, out, spec, fs, path, endpoint_url, region, concurrency, address)


def _import(src: str, out: str, spec: ImportSpec, fs, path: str, endpoint_url, region,
            concurrency, address) -> ImportResult:
    import ray
    import ray.data

    from mmcl.data.pipeline import find_data_error

    sfs, spath = storage.filesystem(src, endpoint_url, region)
    if not sfs.exists(spath):
        raise DataError(f"{src}: no such table or folder")
    fmt = _source_format(src, sfs, spath)
    manifest = build_manifest(spec)
    # A table's columns are checked before Ray starts; webdataset members need Ray's reader.
    names = None if fmt == "webdataset" else _table_columns(src, fmt, sfs, spath, spec)
    if fmt == "webdataset":
        _check_tars(src, sfs, spath)
    # One decode actor and Ray Data's read tasks: at least 2 CPUs (mmcl.cluster).
    connect(address, cpus_per_job=2, job="import", cost="1 decoder + 1 for Ray Data",
            error=DataError)
    ds = _read_source(src, fmt, endpoint_url, region, spec)
    if names is None:
        names = list(ds.schema().names)
    if not spec.id_column and ID_COLUMN in names:  # the table's own ids
        spec = spec.model_copy(update={"id_column": ID_COLUMN})
    _check_columns(src, spec, names)
    base = src.rstrip("/") if fmt == "webdataset" else (
        posixpath.dirname(src) if "://" in src else os.path.dirname(os.path.abspath(src)))
    tmp = f"{path.rstrip('/')}.importing-{uuid.uuid4().hex[:8]}"  # see shards.aside_path
    tmp_url = fs.unstrip_protocol(tmp) if storage.is_remote(out) else tmp
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    try:
        if not spec.id_column:
            ctx.execution_options.preserve_order = True  # ids follow the table's row order
            ds = ds.map_batches(_Numberer, batch_format="pyarrow", batch_size=None,
                                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
                                zero_copy_batch=True)
        # A single table file is read as one block, and a block goes to one actor whole:
        # without this, one decode actor would import the whole table while the others
        # wait. Streaming (no barrier): blocks are cut to rows_per_task rows as they pass.
        ds = ds.repartition(target_num_rows_per_block=spec.rows_per_task)
        ds = ds.map_batches(_add_split, fn_args=(spec.model_dump_json(),),
                            batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        # One CPU stays with the read tasks that feed the decoders.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
        ds = ds.map_batches(
            _ImportBlock,
            fn_constructor_args=(spec.model_dump_json(), manifest.to_json(), base, tmp_url,
                                 endpoint_url, region),
            batch_format="pyarrow", batch_size=spec.rows_per_task,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency or cpus),
            num_cpus=1)
        summaries = [json.loads(r[SUMMARY_COLUMN]) for r in ds.iter_rows()]
        result = _finish(tmp, tmp_url, fs, manifest, summaries, spec)
    except BaseException as err:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        if isinstance(err, DataError):
            raise
        found = find_data_error(err) if isinstance(err, Exception) else None
        if found is None:
            found = _source_error(err, spec)
        if found is None and fmt == "csv" and "Failed to read CSV" in str(err)[:50_000]:
            found = _diagnose_csv(src, spec, endpoint_url, region)
        if found is None and isinstance(err, OSError) and err.errno is not None:
            found = f"cannot write the data set: {err.strerror or err}"
        if found is None:
            raise
        raise DataError(f"{src}: {found}; nothing was written to {out}") from None
    finally:
        ctx.execution_options.preserve_order = before
    if storage.is_remote(out):
        _swap(fs, tmp, path)
    else:
        replace_with(tmp, path)
    return result


def _diagnose_csv(src: str, spec: ImportSpec, endpoint_url, region) -> str | None:
    """Why pyarrow cannot read the CSV table (Ray Data's reader replaces the reason with
    `Failed to read CSV file`): the table streamed once more here, a block at a time."""
    import pyarrow.csv as pacsv

    fs, path = storage.filesystem(src, endpoint_url, region)
    try:
        with fs.open(path, "rb") as f:
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(block_size=_csv_block_bytes(spec)),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            for _ in reader:
                pass
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        return _source_error(err, spec)
    return None


def _source_error(err: BaseException, spec: ImportSpec) -> str | None:
    """The reason a table or tar shard could not be read, when Ray Data's reader failed on
    it (not UTF-8, a row over the block size, a truncated tar): one line, or None."""
    import tarfile

    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or len(seen) > 50:
            continue
        seen.add(id(e))
        # A Ray task's error carries the reader's error as text (its traceback), not as a
        # cause: the line that names the problem is looked up in it.
        lines = str(e)[:50_000].splitlines() or [type(e).__name__]

        def line(*words: str) -> str | None:
            found = [ln.strip() for ln in lines if any(w in ln for w in words)]
            return found[-1][:300] if found else None

        text = lines[0].strip()[:300]
        if isinstance(e, tarfile.TarError):
            return f"a webdataset .tar shard is truncated or corrupt ({text})"
        if isinstance(e, UnicodeDecodeError) or line("UTF8", "UTF-8", "utf-8"):
            text = line("UTF8", "UTF-8", "utf-8") or text
            return f"the table is not valid UTF-8 text ({text}); save it as UTF-8"
        if line("straddling", "block size"):
            text = line("straddling", "block size")
            return (f"a row of the table is longer than max_cell_bytes="
                    f"{spec.max_cell_bytes} bytes ({text}); shorten it, or raise "
                    "max_cell_bytes in the spec")
        if isinstance(e, pa.ArrowInvalid):
            return f"cannot read the table ({text})"
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def _finish(tmp: str, tmp_url: str, fs, manifest: Manifest, summaries: list[dict],
            spec: ImportSpec) -> ImportResult:
    """Rename the blocks' files to part-NNNNN in a stable order and write the manifest."""
    rows: dict[str, int] = {}
    missing: dict[str, dict[str, int]] = {}
    stats = {m: FeatureStats() for m in manifest.modality_names}
    dropped: dict[str, int] = {}
    files: dict[str, list[str]] = {}
    for s in summaries:
        for why, n in s["dropped"].items():
            dropped[why] = dropped.get(why, 0) + n
        for split, part in s["splits"].items():
            rows[split] = rows.get(split, 0) + part["rows"]
            counts = missing.setdefault(split, {m: 0 for m in manifest.modality_names})
            for m, n in part["missing"].items():
                counts[m] += n
            files.setdefault(split, []).extend(part["files"])
            if split == "train":
                for m, raw in part["stats"].items():
                    stats[m].merge(FeatureStats.from_dict(raw))
    if not rows:
        raise DataError("no rows were imported" + (f" (dropped: {dropped})" if dropped else ""))
    if spec.id_column:
        ids = np.concatenate([np.frombuffer(base64.b64decode(s["ids"]), "<i8")
                              for s in summaries if "ids" in s] or [np.zeros(0, "<i8")])
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            twice = values[counts > 1]
            raise DataError(f"column {spec.id_column!r} (the tuple ids) repeats "
                            f"{len(twice)} id(s), e.g. {twice[:3].tolist()}; ids must be "
                            "unique (leave id_column unset to number the rows)")
    total = 0
    for split, names in files.items():
        for i, name in enumerate(sorted(names)):
            target = storage.join(tmp, split, f"part-{i:05d}.parquet")
            fs.mv(fs._strip_protocol(name), target)
            total += fs.size(target)
    ordered = {s: rows[s] for s in [*SPLIT_NAMES, *sorted(rows)] if s in rows}
    out = Manifest(list(manifest.modalities), list(manifest.labels), ordered,
                   manifest.description, manifest.version,
                   {s: missing[s] for s in ordered})
    out = with_stats(out, stats)
    with fs.open(storage.join(tmp, MANIFEST_NAME), "w") as f:
        f.write(out.to_json())
    return ImportResult(out, dropped, total, sum(s.get("cpu_s", 0.0) for s in summaries),
                        sorted(((s["rows_in"], s["done_at"]) for s in summaries
                                if "done_at" in s), key=lambda b: b[1]))


def _swap(fs, tmp: str, path: str) -> None:
    """Put the finished import in place of `path`. An old data set there loses its manifest
    (first) and split folders, as `convert --overwrite` does; other files stay."""
    # Object stores have no rename and no folders: `fs.mv` of the aside "folder" (a key
    # prefix, no key of its own) failed with "The specified key does not exist" and left
    # the aside copy. Each object is copied on its own, the manifest last; the aside copy
    # is removed whatever happens.
    fs.invalidate_cache()  # the decode actors wrote the aside copy through their own clients
    try:
        new = sorted(fs.find(tmp), key=lambda e: (e.endswith(MANIFEST_NAME), e))
        if not new or not new[-1].endswith(MANIFEST_NAME):
            raise FileNotFoundError(f"{fs.unstrip_protocol(tmp)} holds no manifest")
        old = storage.join(path, MANIFEST_NAME)
        names = set(SPLIT_NAMES)
        if fs.exists(old):
            try:
                names |= set(Manifest.from_json(fs.cat_file(old).decode()).splits)
            except DataError:
                pass
            fs.rm(old)
        for name in sorted(names):
            if fs.exists(storage.join(path, name)):
                fs.rm(storage.join(path, name), recursive=True)
        for entry in new:  # manifest last
            fs.copy(entry, storage.join(path, posixpath.relpath(entry, tmp.rstrip("/"))))
    except OSError as err:
        raise DataError(f"cannot put the import in place at {fs.unstrip_protocol(path)}: "
                        f"{err.strerror or err}") from None
    finally:
        try:
            fs.rm(tmp, recursive=True)
        except OSError:
            pass
        fs.invalidate_cache()
