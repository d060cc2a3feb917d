"""The tuple shard format: write, list, validate and read Parquet shards of a data set.

    root/manifest.json                 written last: its presence marks a complete data set
    root/<split>/part-00000.parquet    one row per tuple: int64 `id`, one fixed-shape tensor
    root/<split>/part-00001.parquet    column per modality (its manifest dtype; float32 in
                                       version 1) with its `__len` / `__present` columns,
                                       label columns (int64 classification, float32
                                       regression, (K,) uint8 multilabel)

`root` is a local path or any fsspec URL (s3://bucket/prefix); S3 endpoint and region come
from the arguments or the AWS environment (see `mmcl.storage`). Nothing here imports Ray:
`mmcl.data.pipeline` streams these shards into Ray Data; `read_split` loads a whole split into
memory for small data, tests and in-process training.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcl import storage
from mmcl.data.stats import FeatureStats, chunk_stats, with_stats
from mmcl.data.schema import (ID_COLUMN, LENGTH_SUFFIX, MANIFEST_NAME, PRESENT_SUFFIX,
                               DataError, LabelSpec, Manifest, ModalitySpec)

NonFinite = Literal["fail", "drop"]
Missing = Literal["fail", "drop", "mask"]
DEFAULT_SPLITS = ("train", "val", "test")
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_REWRITE_HINT = ("rewrite the data set with `mmcl data convert` / `mmcl data synth` (or "
                 "mmcl.data.shards.write_dataset), or fix manifest.json")


# ------------------------------------------------------------------------------ types


def modality_type(shape: Sequence[int], dtype: str = "float32") -> pa.DataType:
    """Arrow type of a modality column: a row-major fixed-shape tensor of `dtype`."""
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), [int(s) for s in shape])


def label_type(spec: LabelSpec) -> pa.DataType:
    """Arrow type of a label column: int64 for classification, float32 for regression, a
    (K,) uint8 tensor for multilabel."""
    if spec.task == "multilabel":
        return modality_type((spec.num_classes,), "uint8")
    return pa.int64() if spec.task == "classification" else pa.float32()


def modality_fields(spec: ModalitySpec) -> list[pa.Field]:
    """The Arrow fields a modality is stored as: its tensor, then its length and presence
    columns where it has them (see mmcl.data.schema)."""
    fields = [pa.field(spec.name, modality_type(spec.shape, spec.dtype))]
    if spec.variable_length:
        fields.append(pa.field(spec.name + LENGTH_SUFFIX, pa.int32()))
    if spec.nullable:
        fields.append(pa.field(spec.name + PRESENT_SUFFIX, pa.bool_()))
    return fields


def arrow_schema(manifest: Manifest) -> pa.Schema:
    """The Arrow schema every shard of a data set with this manifest has."""
    fields = [pa.field(ID_COLUMN, pa.int64(), nullable=False)]
    for m in manifest.modalities:
        fields += modality_fields(m)
    fields += [pa.field(lab.name, label_type(lab)) for lab in manifest.labels]
    return pa.schema(fields)


def storage_columns(manifest: Manifest, modalities: Sequence[str] | None = None) -> list[str]:
    """The stored columns behind `modalities` (None: all): each one's tensor, length and
    presence columns."""
    names = manifest.modality_names if modalities is None else modalities
    return [c for n in names for c in manifest.modality(n).storage_columns]


def _is_row_major_tensor(t: pa.DataType, shape: Sequence[int], dtype: str = "float32") -> bool:
    """Fixed-shape tensor of `dtype` and `shape` in row-major order (dim names ignored)."""
    return (isinstance(t, pa.FixedShapeTensorType)
            and t.value_type == pa.from_numpy_dtype(np.dtype(dtype))
            and list(t.shape) == list(shape)
            and (t.permutation is None or list(t.permutation) == list(range(len(shape)))))


def _column_problem(path: str, name: str, schema: pa.Schema, manifest: Manifest) -> str | None:
    """Why column `name` of shard `path` disagrees with the manifest, or None if it agrees."""
    expected = arrow_schema(manifest).field(name).type
    if name not in schema.names:
        return (f"{path}: column {name!r} is missing (expected {expected}); the shard has "
                f"columns {schema.names}")
    found = schema.field(name).type
    if name in manifest.modality_names:
        spec = manifest.modality(name)
        if _is_row_major_tensor(found, spec.shape, spec.dtype):
            return None
        hint = ""
        if pa.types.is_list(found) or pa.types.is_large_list(found) or \
                pa.types.is_fixed_size_list(found):
            hint = (" (modalities must be fixed-shape tensors, not lists: write them with "
                    "pa.FixedShapeTensorArray.from_numpy_ndarray or mmcl's ShardWriter)")
        return f"{path}: column {name!r} is {found}, expected {expected}{hint}"
    if found != expected:
        return f"{path}: column {name!r} is {found}, expected {expected}"
    return None


# --------------------------------------------------------------------------- locations


def _fs(root: str, endpoint_url: str | None, region: str | None):
    return storage.filesystem(root, endpoint_url, region)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _display(fs, path: str, root: str) -> str:
    """A path as the user should see it: plain for local data, with protocol for remote."""
    return fs.unstrip_protocol(path) if storage.is_remote(root) else path


def read_manifest(root: str, endpoint_url: str | None = None,
                  region: str | None = None) -> Manifest:
    """The manifest of the data set at `root`."""
    fs, path = _fs(root, endpoint_url, region)
    mpath = storage.join(path, MANIFEST_NAME)
    shown = storage.join(str(root), MANIFEST_NAME)
    try:
        with fs.open(mpath, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"no mmcl data set at {root}: {shown} does not exist. Create one with "
                        f"`mmcl data convert FILE.npz --out {root}` or `mmcl data synth "
                        f"--preset rus --out {root}`") from None
    manifest = Manifest.from_json(text, source=shown)
    manifest.location = str(root)
    return manifest


def list_shards(root: str, split: str, endpoint_url: str | None = None,
                region: str | None = None) -> list[str]:
    """Sorted shard files of one split (empty if the split has none): plain paths for local
    data sets, URLs with protocol (s3://bucket/x/train/part-00000.parquet) for remote ones."""
    fs, path = _fs(root, endpoint_url, region)
    found = fs.glob(storage.join(path, split, "part-*.parquet"))
    return sorted(_display(fs, p, root) for p in found)


def _open_path(fs, shown: str) -> str:
    """The filesystem-internal path of a path returned by `list_shards`."""
    return fs._strip_protocol(shown)


# ------------------------------------------------------------------------------ writing


def _check_chunk(columns: Mapping[str, np.ndarray], manifest: Manifest) -> dict[str, np.ndarray]:
    """Arrays of one chunk, checked against the manifest and cast to their storage dtypes."""
    expected = arrow_schema(manifest).names
    missing = [c for c in expected if c not in columns]
    if missing:
        raise DataError(f"column(s) {missing} missing from the arrays to write; the manifest "
                        f"needs {expected}")
    extra = [c for c in columns if c not in expected]
    if extra:
        raise DataError(f"column(s) {extra} are not in the manifest (it has {expected}); add "
                        f"them to the manifest or leave them out")
    arrays = {c: np.asarray(columns[c]) for c in expected}
    n = len(arrays[ID_COLUMN]) if arrays[ID_COLUMN].ndim else -1
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if arr.ndim == 0 or len(arr) != n:
            raise DataError(f"column {name!r} has {len(arr) if arr.ndim else 'no'} rows but "
                            f"{ID_COLUMN!r} has {n}: every column needs the same first axis")
        out[name] = _cast_column(name, arr, manifest)
    return out


def _cast_column(name: str, arr: np.ndarray, manifest: Manifest) -> np.ndarray:
    """One column cast to its storage dtype; DataError naming the column if it cannot be."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"column {name!r} has dtype {arr.dtype}; it must be numeric")
    aux = _aux_column(name, arr, manifest)
    if aux is not None:
        return aux
    if name == ID_COLUMN:
        if arr.ndim != 1 or arr.dtype.kind not in "biu":
            raise DataError(f"column {ID_COLUMN!r} must be a 1-D integer array, got dtype "
                            f"{arr.dtype} and shape {arr.shape}")
        return arr.astype(np.int64, copy=False)
    if name in manifest.modality_names:
        shape = manifest.modality(name).shape
        if tuple(arr.shape[1:]) != shape:
            raise DataError(f"modality {name!r}: rows have shape {list(arr.shape[1:])}, the "
                            f"manifest says {list(shape)}")
        return _to_storage_dtype(name, arr, manifest.modality(name).dtype)
    spec = manifest.label(name)
    if spec.task == "multilabel":
        if arr.shape[1:] != (spec.num_classes,) or not np.isin(arr, (0, 1)).all():
            raise DataError(f"label {name!r} is multilabel: rows must be 0/1 multi-hot vectors "
                            f"of {spec.num_classes} classes, got shape {list(arr.shape[1:])}")
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 1:
        raise DataError(f"label {name!r} must be 1-D (one value per tuple), got shape "
                        f"{arr.shape}")
    if spec.task == "regression":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise DataError(f"label {name!r} is a classification label but holds non-integer "
                        "values")
    values = arr.astype(np.int64)
    if len(values) and (values.min() < 0 or values.max() >= spec.num_classes):
        raise DataError(f"label {name!r}: values must be in 0..{spec.num_classes - 1} "
                        f"(num_classes={spec.num_classes}), found {values.min()}..{values.max()}")
    return values


def _to_storage_dtype(name: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """A modality cast to its storage dtype; integer dtypes refuse values they cannot hold."""
    target = np.dtype(dtype)
    if target.kind in "iu":
        info = np.iinfo(target)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise DataError(f"modality {name!r} is stored as {dtype} but holds non-integer "
                            "values")
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DataError(f"modality {name!r}: values {arr.min()}..{arr.max()} do not fit "
                            f"its dtype {dtype}")
    return np.ascontiguousarray(arr, dtype=target)


def _aux_column(name: str, arr: np.ndarray, manifest: Manifest) -> np.ndarray | None:
    """A checked length (int32) or presence (bool) column, or None if `name` is neither."""
    for spec in manifest.modalities:
        if spec.variable_length and name == spec.name + LENGTH_SUFFIX:
            size = spec.shape[0]
            if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() > size)):
                raise DataError(f"column {name!r}: lengths must be 1-D in 0..{size}")
            return arr.astype(np.int32)
        if spec.nullable and name == spec.name + PRESENT_SUFFIX:
            if arr.ndim != 1:
                raise DataError(f"column {name!r}: presence must be 1-D booleans")
            return arr.astype(bool)
    return None


def _to_table(arrays: Mapping[str, np.ndarray], manifest: Manifest) -> pa.Table:
    """Checked arrays -> an Arrow table with the data set's schema."""
    schema = arrow_schema(manifest)
    cols = []
    for f in schema:
        arr = arrays[f.name]
        if isinstance(f.type, pa.FixedShapeTensorType):
            if len(arr):
                cols.append(pa.FixedShapeTensorArray.from_numpy_ndarray(arr))
            else:
                cols.append(pa.ExtensionArray.from_storage(
                    f.type, pa.array([], type=f.type.storage_type)))
        else:
            cols.append(pa.array(arr, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)


class ShardWriter:
    """Streams chunks of tuples into `root/split/part-NNNNN.parquet`: the streaming API for
    writing a data set from your own code (see README "Data").

    Starts a new part file once the current one holds `max_rows_per_shard` rows or about
    `max_bytes_per_shard` bytes (uncompressed Arrow size). Use as a context manager or call
    `close()`, which returns the number of rows written. A split with no rows still gets one
    empty shard (its schema). `write` takes {column: array} with every stored column: `id`,
    each modality (N, *shape) in any numeric dtype that casts to its storage dtype, its
    `<m>__len` (variable-length) and `<m>__present` (nullable) columns, each label.

    While writing it counts absent values (`missing`) and accumulates normalisation sums
    (`stats`, see mmcl.data.stats); `finish_dataset` turns writers into the manifest.
    `prefix` names the part files (`<prefix>-NNNNN.parquet`): several writers of one split
    (parallel tasks) use distinct prefixes and `finish_dataset` renames their files.
    """

    def __init__(self, root: str, split: str, manifest: Manifest, *,
                 max_rows_per_shard: int = DEFAULT_MAX_ROWS,
                 max_bytes_per_shard: int = DEFAULT_MAX_BYTES,
                 endpoint_url: str | None = None, region: str | None = None,
                 prefix: str = "part"):
        if max_rows_per_shard < 1 or max_bytes_per_shard < 1:
            raise ValueError("max_rows_per_shard and max_bytes_per_shard must be >= 1")
        self.root, self.split, self.manifest = root, split, manifest
        self.max_rows, self.max_bytes = int(max_rows_per_shard), int(max_bytes_per_shard)
        self.fs, path = _fs(root, endpoint_url, region)
        self.dir = storage.join(path, split)
        self.schema = arrow_schema(manifest)
        self.rows = 0
        self.prefix = prefix
        self.missing = {m.name: 0 for m in manifest.modalities if m.nullable}
        self.stats: dict[str, FeatureStats] = {m.name: FeatureStats()
                                               for m in manifest.modalities}
        self.files: list[str] = []
        self._file = self._writer = None
        self._rows_in_file = self._bytes_in_file = 0
        self._closed = False

    # -- context manager
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing
    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append a chunk: {column: array}, every manifest column, same first axis."""
        if self._closed:
            raise RuntimeError("this ShardWriter is closed")
        checked = _check_chunk(columns, self.manifest)
        for spec in self.manifest.modalities:
            self.stats[spec.name].merge(chunk_stats(spec, checked))
            if spec.nullable:
                self.missing[spec.name] += int((~checked[spec.name + PRESENT_SUFFIX]).sum())
        table = _to_table(checked, self.manifest)
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        start = 0
        while start < table.num_rows:
            if self._writer is not None and self._full(row_bytes):
                self._finish_file()
            if self._writer is None:
                self._open_file()
            room_rows = self.max_rows - self._rows_in_file
            room_bytes = max(1, (self.max_bytes - self._bytes_in_file) // row_bytes)
            take = min(room_rows, room_bytes, table.num_rows - start)
            piece = table.slice(start, take)
            self._writer.write_table(piece)
            self._rows_in_file += take
            self._bytes_in_file += take * row_bytes
            self.rows += take
            start += take

    def _full(self, row_bytes: int) -> bool:
        return (self._rows_in_file >= self.max_rows
                or self._bytes_in_file + row_bytes > self.max_bytes)

    def _open_file(self) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)
        path = storage.join(self.dir, f"{self.prefix}-{len(self.files):05d}.parquet")
        self._file = self.fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._file, self.schema)
        self.files.append(path)
        self._rows_in_file = self._bytes_in_file = 0

    def _finish_file(self) -> None:
        self._writer.close()
        self._file.close()
        self._file = self._writer = None

    def close(self) -> int:
        """Finish the last part file; returns the number of rows written."""
        if not self._closed:
            if self._writer is None and not self.files:
                self._open_file()  # an empty split still records its schema
            if self._writer is not None:
                self._finish_file()
            self._closed = True
        return self.rows


def _prepare_target(fs, path: str, root: str, splits: Sequence[str], overwrite: bool) -> None:
    """Refuse a non-empty target unless `overwrite`; with it, remove the old manifest (first)
    and the split folders. Other files in the folder are left alone."""
    if not fs.exists(path):
        return
    entries = fs.ls(path, detail=False)
    if not entries:
        return
    if not overwrite:
        raise DataError(f"{root} already exists and is not empty; pass --overwrite "
                        "(overwrite=True) to replace it, or choose another output folder")
    old = storage.join(path, MANIFEST_NAME)
    names = set(DEFAULT_SPLITS) | set(splits)
    if fs.exists(old):
        with fs.open(old, "r") as f:
            try:
                names |= set(Manifest.from_json(f.read()).splits)
            except DataError:
                pass
        fs.rm(old)
    for name in sorted(names):
        sub = storage.join(path, name)
        if fs.exists(sub):
            fs.rm(sub, recursive=True)


def write_dataset(root: str, manifest: Manifest, splits: Mapping[str, Mapping[str, np.ndarray]],
                  overwrite: bool = False, max_rows_per_shard: int = DEFAULT_MAX_ROWS,
                  max_bytes_per_shard: int = DEFAULT_MAX_BYTES, endpoint_url: str | None = None,
                  region: str | None = None, stats_split: str | None = None) -> Manifest:
    """Write whole splits ({split: {column: array}}) as a data set; returns the manifest with
    its row counts. Ids must be unique over all splits. With `stats_split` (e.g. "train") the
    manifest records normalisation constants computed on that split.

    While it writes it holds the output's lease (a second writer of `root` is refused). A
    local data set is written aside (`ROOT.converting-*`) and put in place with one atomic
    rename (see `replace_with`): a write killed or failing at any point leaves an existing
    data set whole. On object storage manifest.json is written last, so an interrupted
    write never looks like a complete data set."""
    ids = [np.asarray(cols.get(ID_COLUMN, [])) for cols in splits.values()]
    all_ids = np.concatenate([i.ravel() for i in ids]) if ids else np.zeros(0)
    if len(np.unique(all_ids)) != len(all_ids):
        raise DataError(f"column {ID_COLUMN!r} has repeated values; ids must be unique over all "
                        "splits")
    for split, cols in splits.items():  # check everything before touching the target
        _check_chunk(cols, manifest)
    fs, path = _fs(root, endpoint_url, region)
    sizes = dict(max_rows_per_shard=max_rows_per_shard, max_bytes_per_shard=max_bytes_per_shard,
                 endpoint_url=endpoint_url, region=region)
    if not storage.is_remote(root):
        path = os.path.realpath(path)  # a root that is a link: the folder it names is replaced
    with holding_output(root if storage.is_remote(root) else path, endpoint_url, region):
        if storage.is_remote(root):
            _prepare_target(fs, path, root, list(splits), overwrite)
            fs.makedirs(path, exist_ok=True)
            return _write_splits(root, manifest, splits, stats_split, sizes)
        recover_stranded(path)
        check_target(fs, path, root, overwrite)
        tmp = aside_path(path, "converting")
        try:
            written = _write_splits(tmp, manifest, splits, stats_split, sizes)
        except BaseException as err:
            remove_aside(tmp)
            if isinstance(err, OSError):
                raise DataError(f"cannot write the data set {root}: {err.strerror or err}; "
                                f"nothing was changed at {root}") from None
            raise
        replace_with(tmp, path)
        return written


def _write_splits(root: str, manifest: Manifest, splits, stats_split, sizes) -> Manifest:
    writers = {}
    for split, cols in splits.items():
        with ShardWriter(root, split, manifest, **sizes) as writer:
            writer.write(cols)
        writers[split] = writer
    return finish_dataset(root, manifest, writers, stats_split, sizes["endpoint_url"],
                          sizes["region"])


# ------------------------------------------------------- one writer, whole replacements
#
# `mmcl data import` and `mmcl data convert` (and write_dataset's other callers) hold a
# lease beside their output while they write it, write a local data set aside, and put it
# in place with one rename: renameat2(RENAME_EXCHANGE) swaps the new folder with the old
# one atomically (where the filesystem cannot, the old folder is renamed to ROOT.replaced-*
# first, and a kill between the two renames is undone by the next run). Files of the old
# folder that are not part of a data set (a README, a contact sheet) are moved into the
# new one. The next writer of the same output removes (or, when the output lost its data
# set, restores) what a killed one left beside it.

ASIDE_KINDS = ("importing", "converting", "replaced")


def _parent_and_name(root: str) -> tuple[str, str]:
    text = str(root).rstrip("/")
    if storage.is_remote(text):
        parent, _, name = text.rpartition("/")
        return parent, name
    text = os.path.abspath(os.path.expanduser(text))
    return os.path.dirname(text), os.path.basename(text)


def output_lease(root: str, endpoint_url: str | None = None, region: str | None = None):
    """The lease a command writing the data set `root` holds: `.NAME.mmcl-lease` beside it
    (beside, not inside: replacing the folder keeps it), the same kind of lease as a run's
    (mmcl.train.lease: exclusive create; a lease of a killed process is taken over)."""
    from mmcl.train.lease import Lease

    parent, name = _parent_and_name(root)
    return Lease(parent, endpoint_url, region, name=f".{name}.mmcl-lease",
                 what=f"mmcl command is writing the data set {root}",
                 instead="write to another --out")


@contextmanager
def holding_output(root: str, endpoint_url: str | None = None, region: str | None = None):
    """Hold `root`'s writer lease for the body (renewed like a run's); DataError naming the
    holder when another command holds it."""
    from mmcl.train.lease import RunBusyError, run_lease

    parent, name = _parent_and_name(root)
    if not name or parent.endswith(":/"):  # a bucket's root: no folder beside it for a lease
        yield
        return
    held = run_lease(parent, endpoint_url, region, name=f".{name}.mmcl-lease",
                     what=f"mmcl command is writing the data set {root}",
                     instead="write to another --out")
    try:
        held.__enter__()
    except RunBusyError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"cannot write next to {root} (its writer lease): "
                        f"{err.strerror or err}") from None
    try:
        yield
    finally:
        held.__exit__(None, None, None)


def check_target(fs, path: str, root: str, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite`."""
    if fs.exists(path) and fs.ls(path, detail=False) and not overwrite:
        raise DataError(f"{root} already exists and is not empty; pass --overwrite "
                        "(overwrite=True) to replace it, or choose another output folder")


def aside_path(path: str, kind: str) -> str:
    """A fresh folder name beside `path` for a data set being written."""
    return f"{str(path).rstrip('/')}.{kind}-{uuid.uuid4().hex[:8]}"


def remove_aside(tmp: str) -> None:
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: str, b: str) -> None:
    """Swap the two local paths `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE);
    OSError (EINVAL, ENOSYS, ...) where the filesystem or platform cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a)


def _dataset_entries(folder: str) -> set[str]:
    names = {MANIFEST_NAME, *DEFAULT_SPLITS}
    try:
        with open(os.path.join(folder, MANIFEST_NAME)) as f:
            names |= set(Manifest.from_json(f.read()).splits)
    except (OSError, DataError, ValueError):
        pass
    return names


def _settle(old: str, path: str) -> None:
    """`old` (a folder that was at `path` before it was replaced, or a new one that never got
    there): move its files that are not part of a data set into `path` where that has none
    of that name, then remove it."""
    keep = _dataset_entries(old)
    for entry in sorted(os.listdir(old)):
        if entry not in keep and not os.path.lexists(os.path.join(path, entry)):
            os.rename(os.path.join(old, entry), os.path.join(path, entry))
    shutil.rmtree(old, ignore_errors=True)


def replace_with(tmp: str, path: str) -> None:
    """Put the complete local data set `tmp` at `path` with one atomic rename."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    try:
        _exchange(tmp, path)
        old = tmp
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
            raise
        old = aside_path(path, "replaced")
        os.rename(path, old)
        os.rename(tmp, path)
    _settle(old, path)


def recover_stranded(path: str) -> list[str]:
    """Folders a killed import / convert of `path` left beside it (call with the output's
    lease held: nobody else is writing them). Returns what was done, also printed."""
    parent, name = os.path.split(str(path).rstrip("/"))
    parent = parent or "."
    done = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return done
    for entry in entries:
        kind = entry[len(name) + 1:].split("-", 1)[0] if entry.startswith(name + ".") else ""
        stranded = os.path.join(parent, entry)
        if kind not in ASIDE_KINDS or os.path.islink(stranded) or not os.path.isdir(stranded):
            continue
        complete = os.path.exists(os.path.join(stranded, MANIFEST_NAME))
        if not os.path.exists(os.path.join(path, MANIFEST_NAME)) and complete:
            # The output lost its data set in a swap that was cut short: restore this one.
            os.makedirs(path, exist_ok=True)
            for item in sorted(os.listdir(stranded), key=lambda e: e == MANIFEST_NAME):
                if not os.path.lexists(os.path.join(path, item)):
                    os.rename(os.path.join(stranded, item), os.path.join(path, item))
            shutil.rmtree(stranded, ignore_errors=True)
            done.append(f"restored the data set at {path} from {stranded}, left by an "
                        "interrupted import or convert")
        else:
            if os.path.exists(path) and complete:
                _settle(stranded, path)
            shutil.rmtree(stranded, ignore_errors=True)
            done.append(f"removed {stranded}, left by an interrupted import or convert")
    for line in done:
        print(f"[mmcl] {line}", flush=True)
    return done


def finish_dataset(root: str, manifest: Manifest, writers: Mapping[str, "ShardWriter"],
                   stats_split: str | None = None, endpoint_url: str | None = None,
                   region: str | None = None) -> Manifest:
    """Write manifest.json for the closed `writers` ({split: writer}): row and missing
    counts, and the normalisation constants of `stats_split` when given. Returns it."""
    fs, path = _fs(root, endpoint_url, region)
    counts = {split: w.rows for split, w in writers.items()}
    missing = {split: dict(w.missing) for split, w in writers.items() if w.missing}
    out = Manifest(list(manifest.modalities), list(manifest.labels), counts,
                   manifest.description, manifest.version, missing)
    if stats_split is not None and stats_split in writers:
        out = with_stats(out, writers[stats_split].stats)
    with fs.open(storage.join(path, MANIFEST_NAME), "w") as f:
        f.write(out.to_json())
    return out


# ---------------------------------------------------------------------------- validation


def _split_names(manifest: Manifest, splits: Sequence[str] | None, root: str) -> list[str]:
    names = list(manifest.splits) if splits is None else list(splits)
    unknown = [s for s in names if s not in manifest.splits]
    if unknown:
        raise DataError(f"split(s) {unknown} are not in the data set at {root}; it has "
                        f"{sorted(manifest.splits)}")
    return names


def validate(root: str, splits: Sequence[str] | None = None, endpoint_url: str | None = None,
             region: str | None = None) -> Manifest:
    """Check every shard's schema and row count (Parquet footers only, no data) against the
    manifest; returns the manifest. One DataError lists every problem found."""
    manifest = read_manifest(root, endpoint_url, region)
    fs, _ = _fs(root, endpoint_url, region)
    columns = arrow_schema(manifest).names
    problems: list[str] = []
    for split in _split_names(manifest, splits, root):
        files = list_shards(root, split, endpoint_url, region)
        if not files:
            problems.append(f"split {split!r}: no shard files under "
                            f"{storage.join(str(root), split)}/ (expected part-*.parquet)")
            continue
        rows = 0
        for shown in files:
            try:
                with fs.open(_open_path(fs, shown), "rb") as f:
                    pf = pq.ParquetFile(f)
                    schema, n = pf.schema_arrow, pf.metadata.num_rows
            except (OSError, pa.ArrowException) as err:
                problems.append(f"{shown}: not a readable Parquet file ({err})")
                continue
            rows += n
            problems += [p for c in columns
                         if (p := _column_problem(shown, c, schema, manifest))]
        if rows != manifest.splits[split]:
            problems.append(f"split {split!r}: the shards hold {rows} rows, the manifest says "
                            f"{manifest.splits[split]}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"the data set at {root} does not match its manifest:\n  "
                        + "\n  ".join(problems[:20]) + more + f"\nTo fix: {_REWRITE_HINT}")
    return manifest


# ------------------------------------------------------------------------------- reading


def tensor_to_numpy(column: pa.ChunkedArray | pa.Array, shape: Sequence[int],
                    dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """(values of shape (N, *shape) and `dtype`, valid-row mask) of a fixed-shape tensor
    column. Null rows come back invalid (as NaN for float dtypes, 0 for integers)."""
    shape = tuple(int(s) for s in shape)
    width = int(np.prod(shape))
    target = np.dtype(dtype)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    values, valid = [np.zeros((0, width), target)], [np.zeros(0, bool)]
    for chunk in chunks:
        st = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        flat = st.values.slice(st.offset * width, len(st) * width)
        vals = flat.to_numpy(zero_copy_only=False).astype(target, copy=False)
        vals = vals.reshape(len(st), width)
        ok = np.ones(len(st), dtype=bool)
        if st.null_count:
            ok = ~st.is_null().to_numpy(zero_copy_only=False)
            fill = np.nan if target.kind == "f" else 0
            vals = np.where(ok[:, None], vals, np.array(fill, target))
        values.append(vals)
        valid.append(ok)
    return np.concatenate(values).reshape(-1, *shape), np.concatenate(valid)


def _select(manifest: Manifest, columns: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(modalities, labels) to read, in manifest order."""
    labels = [lab.name for lab in manifest.labels]
    if columns is None:
        return manifest.modality_names, labels
    unknown = [c for c in columns
               if c not in manifest.modality_names and c not in labels and c != ID_COLUMN]
    if unknown:
        raise DataError(f"columns {unknown} are not in this data set; it has modalities "
                        f"{manifest.modality_names} and labels {labels}")
    return ([m for m in manifest.modality_names if m in columns],
            [lab for lab in labels if lab in columns])


def unreadable_shard(shown: str, err: BaseException) -> DataError:
    """The DataError for a shard that cannot be read (truncated, corrupt, not Parquet, no
    permission); its message names the file."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, PermissionError):
        return DataError(f"{shown}: cannot read this shard ({first}); fix its permissions")
    return DataError(f"{shown}: not a readable Parquet file, truncated or corrupt ({first}). "
                     f"To fix: {_REWRITE_HINT}")


# Errors that mean "this file is damaged or unreadable" rather than "the storage is down":
# a missing file, refused credentials or a lost connection keep their own errors.
_PASS_THROUGH = (FileNotFoundError, ConnectionError, TimeoutError)


@contextmanager
def _reading(shown: str):
    try:
        yield
    except _PASS_THROUGH:
        raise
    except (OSError, pa.ArrowException) as err:
        raise unreadable_shard(shown, err) from None


def find_unreadable_shard(root: str, split: str, endpoint_url: str | None = None,
                          region: str | None = None) -> DataError | None:
    """The DataError naming the first shard of `split` that cannot be read in full (a
    truncated or corrupt file whose footer still parses), or None when every shard reads.
    For the error path of readers that do not say which file failed (Ray Data's)."""
    fs, _ = _fs(root, endpoint_url, region)
    for shown in list_shards(root, split, endpoint_url, region):
        try:
            with _reading(shown), fs.open(_open_path(fs, shown), "rb") as f:
                pq.ParquetFile(f).read()
        except DataError as err:
            return err
    return None


def _read_shard(fs, shown: str, names: list[str], manifest: Manifest) -> pa.Table:
    """One shard's columns, after checking their types against the manifest."""
    with _reading(shown), fs.open(_open_path(fs, shown), "rb") as f:
        pf = pq.ParquetFile(f)
        problems = [p for c in names if (p := _column_problem(shown, c, pf.schema_arrow,
                                                              manifest))]
        if problems:
            raise DataError("; ".join(problems) + f". To fix: {_REWRITE_HINT}")
        return pf.read(columns=names)


def _table_to_arrays(table: pa.Table, mods: list[str], labels: list[str], manifest: Manifest,
                     shown: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(arrays, valid-row masks per modality) of one shard's table."""
    out = {ID_COLUMN: table.column(ID_COLUMN).to_numpy().astype(np.int64, copy=False)}
    valid = {}
    for m in mods:
        spec = manifest.modality(m)
        out[m], valid[m] = tensor_to_numpy(table.column(m), spec.shape, spec.dtype)
        for aux in spec.storage_columns[1:]:
            out[aux] = table.column(aux).to_numpy(zero_copy_only=False)
        if spec.nullable:  # absent values are stored as zeros: not a non-finite row
            valid[m] = valid[m] | ~out[m + PRESENT_SUFFIX]
    for lab in labels:
        col = table.column(lab)
        if col.null_count:
            raise DataError(f"{shown}: label column {lab!r} has {col.null_count} null value(s)")
        spec = manifest.label(lab)
        if spec.task == "multilabel":
            out[lab] = tensor_to_numpy(col, (spec.num_classes,), "uint8")[0]
            continue
        dtype = np.int64 if spec.task == "classification" else np.float32
        out[lab] = col.to_numpy().astype(dtype, copy=False)
    return out, valid


def _empty_split(mods: list[str], labels: list[str], manifest: Manifest) -> dict[str, np.ndarray]:
    out = {ID_COLUMN: np.zeros(0, np.int64)}
    for m in mods:
        spec = manifest.modality(m)
        out[m] = np.zeros((0, *spec.shape), spec.dtype)
        if spec.variable_length:
            out[m + LENGTH_SUFFIX] = np.zeros(0, np.int32)
        if spec.nullable:
            out[m + PRESENT_SUFFIX] = np.zeros(0, bool)
    for lab in labels:
        spec = manifest.label(lab)
        if spec.task == "multilabel":
            out[lab] = np.zeros((0, spec.num_classes), np.uint8)
            continue
        out[lab] = np.zeros(0, np.int64 if spec.task == "classification" else np.float32)
    return out


def read_split(root: str, split: str, columns: Sequence[str] | None = None,
               nonfinite: NonFinite = "fail", endpoint_url: str | None = None,
               region: str | None = None, missing: Missing = "mask") -> dict[str, np.ndarray]:
    """A whole split in memory: {"id": int64 (N,), modality: (N, *shape) in its storage dtype
    (float32 in version 1), its `__len`/`__present` columns, label: int64 or float32 (N,) or
    uint8 (N, K)}. `columns` picks modalities/labels (None: all; `id` always comes).
    Rows with NaN/inf/null in a selected modality raise DataError (nonfinite="fail") or are
    dropped (nonfinite="drop"). Tuples lacking a selected modality raise DataError
    (missing="fail"), are dropped ("drop") or kept with their presence column ("mask")."""
    if nonfinite not in ("fail", "drop"):
        raise ValueError(f"nonfinite must be 'fail' or 'drop', got {nonfinite!r}")
    manifest = read_manifest(root, endpoint_url, region)
    _split_names(manifest, [split], root)
    mods, labels = _select(manifest, columns)
    fs, _ = _fs(root, endpoint_url, region)
    parts, masks = [], []
    for shown in list_shards(root, split, endpoint_url, region):
        table = _read_shard(fs, shown, [ID_COLUMN, *storage_columns(manifest, mods), *labels],
                            manifest)
        arrays, valid = _table_to_arrays(table, mods, labels, manifest, shown)
        parts.append(arrays)
        masks.append(valid)
    if not parts:
        if manifest.splits[split]:
            raise DataError(f"split {split!r} of {root} has no shard files "
                            f"({storage.join(str(root), split)}/part-*.parquet)")
        return _empty_split(mods, labels, manifest)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = _handle_nonfinite(out, {m: np.concatenate([v[m] for v in masks]) for m in mods},
                            split, nonfinite, where=str(root))
    return handle_missing(out, manifest, mods, split, missing, where=str(root))


def missing_error(split: str, modality: str, count: int, where: str = "") -> DataError:
    return DataError(f"split {split!r}{' of ' + where if where else ''}: modality "
                     f"{modality!r} is missing in {count} tuple(s); set data.missing=drop to "
                     f"skip those tuples, or data.missing=mask to train with a presence mask "
                     f"(objectives and fusions that support absent modalities)")


def handle_missing(out: dict[str, np.ndarray], manifest: Manifest, mods: Sequence[str],
                   split: str, missing: Missing, where: str = "") -> dict[str, np.ndarray]:
    """Apply `missing` (fail / drop / mask) to in-memory columns of nullable modalities."""
    if missing not in ("fail", "drop", "mask"):
        raise ValueError(f"missing must be fail, drop or mask, got {missing!r}")
    keep = np.ones(len(out[ID_COLUMN]), dtype=bool)
    for m in mods:
        if not manifest.modality(m).nullable:
            continue
        present = out[m + PRESENT_SUFFIX]
        absent = int((~present).sum())
        if absent and missing == "fail":
            raise missing_error(split, m, absent, where)
        if missing == "drop":
            keep &= present
    if keep.all():
        return out
    return {k: v[keep] for k, v in out.items()}


def _handle_nonfinite(out: dict[str, np.ndarray], valid: dict[str, np.ndarray], split: str,
                      nonfinite: NonFinite, where: str = "") -> dict[str, np.ndarray]:
    keep = np.ones(len(out[ID_COLUMN]), dtype=bool)
    for name, ok in valid.items():
        if out[name].dtype.kind == "f":
            ok = ok & np.isfinite(out[name].reshape(len(ok), -1)).all(axis=1)
        bad = int((~ok).sum())
        if bad and nonfinite == "fail":
            ids = out[ID_COLUMN][~ok][:5].tolist()
            raise DataError(f"split {split!r}{' of ' + where if where else ''}: modality "
                            f"{name!r} has {bad} row(s) with NaN, inf "
                            f"or null values (ids {ids}{'...' if bad > 5 else ''}); clean the "
                            "data or set data.nonfinite=drop to skip such rows")
        keep &= ok
    if keep.all():
        return out
    return {k: v[keep] for k, v in out.items()}


def iter_batches(root: str, split: str, columns: Sequence[str], batch_size: int = 8192,
                 endpoint_url: str | None = None,
                 region: str | None = None) -> Any:
    """Yield (shard path, pa.RecordBatch) of the given columns, shard by shard, batch by batch
    (bounded memory; used by `mmcl data inspect`). Column types are checked first."""
    manifest = read_manifest(root, endpoint_url, region)
    fs, _ = _fs(root, endpoint_url, region)
    for shown in list_shards(root, split, endpoint_url, region):
        with _reading(shown), fs.open(_open_path(fs, shown), "rb") as f:
            pf = pq.ParquetFile(f)
            problems = [p for c in columns if c != ID_COLUMN and
                        (p := _column_problem(shown, c, pf.schema_arrow, manifest))]
            if problems:
                raise DataError("; ".join(problems) + f". To fix: {_REWRITE_HINT}")
            # read errors surface while iterating: named per file too
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
                yield shown, batch
