"""The data plane: shards -> Ray Data -> one stream of torch batches per training worker.

    build_dataset(root, split, manifest, ...)      read_parquet over the split's shard files,
                                                   seeded file shuffle, column selection and a
                                                   fused per-block check of non-finite rows
    TorchTrainer(datasets={"train": ds},           what the training run uses: Train V2 splits
        dataset_config=train_data_config())        the dataset with streaming_split(n, equal=True)
    ray.train.get_dataset_shard("train")           inside each worker
    iter_worker_batches(shard, batch_size, ...)    dict[str, torch.Tensor], drop_last=True

Facts this module relies on (Ray 2.60, verified; see notes/ray_train_v2.md):

- Ray Data turns Arrow's canonical `arrow.fixed_shape_tensor` columns into (N, *shape) float32
  ndarrays / tensors by itself in `iter_batches(batch_format="numpy")` and
  `iter_torch_batches`, so no decode step is needed (an extra pyarrow->numpy decode
  `map_batches` only costs time: docs/performance.md, section 3). The only per-block UDF here
  checks finiteness (and the column types) and hands the Arrow table on unchanged; it is fused
  into the read task.
- `ray.train.DataConfig` (the V2 default) gives every worker `ds.streaming_split(world_size,
  equal=True)`: every worker gets exactly the same number of rows (the remainder, fewer than
  `num_workers` rows, is dropped); with `drop_last=True` and one batch size every worker then
  takes the same number of steps, so per-step collectives (all_gather of negatives, DDP's
  all-reduce) cannot deadlock on a short worker.
- Each epoch (each new iteration over the shard) re-executes the dataset. A seeded
  FileShuffleConfig gives a different file order on each execution; mmcl's own
  (`EpochFileShuffle`) derives it from (seed, first epoch + execution index), so the order
  belongs to the epoch, also in a run resumed by a new driver. With `preserve_order=True`
  the blocks reach the splitter in a fixed order, so which rows each worker sees, and in
  which order, is repeatable given the seed. Without it the assignment follows task
  completion order.
- An exception raised in a Ray Data UDF reaches the consumer as
  `RayTaskError(UserCodeException)` whose cause chain is lost; only the text survives.
  `iter_worker_batches` turns it back into `DataError` (see `find_data_error`).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa

from mmcl import storage
from mmcl.data.schema import ID_COLUMN, DataError, Manifest, ModalitySpec, present_column

if TYPE_CHECKING:  # Ray is imported lazily: importing mmcl.data stays cheap.
    import ray.data
    import ray.train
    import torch

logger = logging.getLogger(__name__)

NonFinite = Literal["fail", "drop"]
Missing = Literal["fail", "drop", "mask"]


# ------------------------------------------------------------------------------ seeds


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (same on every machine and Python run)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


_FILE_SALT = 0x5EED_F11E & 0x7FFFFFFF
_LOCAL_SALT = 0x10CA_15EE & 0x7FFFFFFF


def file_shuffle_seed(seed: int, epoch: int = 0) -> int:
    """Seed of the file order of epoch `epoch` (see mmcl.data.epoch_shuffle)."""
    return derive_seed(_FILE_SALT, seed, epoch)


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one worker's in-stream shuffle buffer in one epoch."""
    return derive_seed(_LOCAL_SALT, seed, epoch, rank)


# ----------------------------------------------------------------- non-finite row counter


@dataclass
class DropCounter:
    """Counts the rows Ray Data tasks drop: for NaN/inf (data.nonfinite="drop") and, apart
    from those, for a missing modality (data.missing="drop").

    A zero-CPU actor behind a picklable handle: create it on the driver, pass it to
    `build_dataset(drop_counter=...)`, read it with `counts()` from the driver or a worker.
    Counts accumulate over executions (epochs); take differences for per-epoch numbers.
    """

    handle: Any

    @classmethod
    def create(cls) -> "DropCounter":
        import ray

        return cls(_counter_actor().remote())

    def add(self, split: str, rows: int, by_modality: dict[str, int],
            total_key: str = "rows") -> None:
        import ray

        ray.get(self.handle.add.remote(split, rows, by_modality, total_key))

    def add_missing(self, split: str, rows: int, by_modality: dict[str, int]) -> None:
        self.add(split, rows, {f"{m}{MISSING_SUFFIX}": n for m, n in by_modality.items()},
                 MISSING_ROWS)

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {"rows": n, <modality>: n, ...}} for rows with NaN/inf, plus
        "missing_rows" and "<modality>__missing" for tuples dropped as incomplete."""
        import ray

        return ray.get(self.handle.get.remote())


MISSING_ROWS, MISSING_SUFFIX = "missing_rows", "__missing"


class EpochDrops:
    """Rows dropped per epoch, from a DropCounter (None: nothing is dropped, 0 each epoch).

    Ray Data counts a block's drops before any worker receives it, and a worker's EpochStream
    runs ahead into the next epoch, so a count read when training finishes epoch e would
    already hold rows of epoch e + 1. The stream calls `mark(e)` instead when this worker's
    split of epoch e is exhausted and before it asks for epoch e + 1: epoch e's execution has
    produced (and counted) every block by then, and epoch e + 1's has not started, because Ray
    Data starts an epoch only once every split asked for it. Create it before the stream
    starts, so that the base excludes what earlier attempts of the run counted."""

    KEYS = {"dropped_rows": "rows", "dropped_missing_rows": MISSING_ROWS}

    def __init__(self, counter: DropCounter | None, split: str):
        self.counter, self.split = counter, split
        self.marks: dict[int, dict[str, int]] = {}
        self.base = self._totals()

    def _totals(self) -> dict[str, int]:
        counts = self.counter.counts().get(self.split, {}) if self.counter is not None else {}
        return {name: int(counts.get(key, 0)) for name, key in self.KEYS.items()}

    def mark(self, epoch: int) -> None:
        """Epoch `epoch` has been read in full (EpochStream's `on_epoch_read`)."""
        self.marks[epoch] = self._totals()

    def of_epoch(self, epoch: int) -> dict[str, int]:
        """{"dropped_rows": NaN/inf rows, "dropped_missing_rows": incomplete tuples} of
        `epoch`; call it after the stream has read the epoch, epochs in order."""
        totals = self.marks.get(epoch) or self._totals()
        dropped = {k: totals[k] - self.base[k] for k in totals}
        self.base = totals
        return dropped


_COUNTER_CLS = None


def _counter_actor():
    global _COUNTER_CLS
    if _COUNTER_CLS is None:
        import ray

        @ray.remote(num_cpus=0)
        class _DropCounterActor:
            def __init__(self) -> None:
                self._counts: dict[str, dict[str, int]] = {}

            def add(self, split: str, rows: int, by_modality: dict[str, int],
                    total_key: str = "rows") -> None:
                c = self._counts.setdefault(split, {})
                c[total_key] = c.get(total_key, 0) + int(rows)
                for name, n in by_modality.items():
                    c[name] = c.get(name, 0) + int(n)

            def get(self) -> dict[str, dict[str, int]]:
                return {k: dict(v) for k, v in self._counts.items()}

        _COUNTER_CLS = _DropCounterActor
    return _COUNTER_CLS


# --------------------------------------------------------------------- per-block check


def _tensor_rows(column: pa.ChunkedArray | pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(values as (N, width) float array, valid-row mask) of a fixed-shape tensor column,
    zero-copy where Arrow allows. Null rows are reported invalid."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    values, valid = [], []
    for chunk in chunks:
        st = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        flat = st.values.slice(st.offset * width, len(st) * width)
        values.append(flat.to_numpy(zero_copy_only=False).reshape(len(st), width))
        ok = np.ones(len(st), dtype=bool)
        if st.null_count:
            ok &= ~st.is_null().to_numpy(zero_copy_only=False)
        valid.append(ok)
    if not values:
        return np.zeros((0, width), np.float32), np.zeros(0, bool)
    return np.concatenate(values), np.concatenate(valid)


def _expected_type(shape: tuple[int, ...], dtype: str = "float32") -> pa.DataType:
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), list(shape))


def _type_matches(t: pa.DataType, shape: tuple[int, ...], dtype: str = "float32") -> bool:
    """Fixed-shape tensor of `dtype` and `shape`, row-major (no permutation), dim names
    ignored."""
    return (isinstance(t, pa.FixedShapeTensorType)
            and t.value_type == pa.from_numpy_dtype(np.dtype(dtype))
            and list(t.shape) == list(shape)
            and (t.permutation is None or list(t.permutation) == list(range(len(shape)))))


def _type_error(split: str, name: str, expected: pa.DataType, got: pa.DataType) -> DataError:
    return DataError(f"split {split!r}: modality {name!r} is stored as {got}, but the manifest "
                     f"says {expected}; rewrite the shards with `mmcl data` or fix manifest.json")


class _CheckRows:
    """The per-block UDF: validates modality column types, handles non-finite rows and (for
    nullable modalities) absent ones. Arrow in, Arrow out (Ray decodes the tensor columns
    when a consumer iterates)."""

    def __init__(self, split: str, modalities: dict[str, ModalitySpec], nonfinite: NonFinite,
                 counter: DropCounter | None, missing: Missing = "mask"):
        self.split, self.modalities, self.nonfinite, self.counter = (
            split, modalities, nonfinite, counter)
        self.missing = missing

    def _present(self, table: pa.Table, spec: ModalitySpec) -> np.ndarray | None:
        if not spec.nullable:
            return None
        return table.column(present_column(spec.name)).to_numpy(zero_copy_only=False)

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        keep = np.ones(n, dtype=bool)
        bad_by_mod: dict[str, int] = {}
        absent_rows = np.zeros(n, dtype=bool)
        absent_by_mod: dict[str, int] = {}
        for name, spec in self.modalities.items():
            shape = spec.shape
            col = table.column(name)
            if not _type_matches(col.type, shape, spec.dtype):
                raise _type_error(self.split, name, _expected_type(shape, spec.dtype), col.type)
            present = self._present(table, spec)
            if present is not None and self.missing != "mask":
                if self.missing == "fail" and not present.all():
                    from mmcl.data.shards import missing_error
                    raise missing_error(self.split, name, int((~present).sum()))
                absent_rows |= ~present
                if not present.all():
                    absent_by_mod[name] = int((~present).sum())
            if np.dtype(spec.dtype).kind != "f":
                continue  # integers cannot be NaN or inf
            values, valid = _tensor_rows(col, int(np.prod(shape)))
            ok = valid & np.isfinite(values).all(axis=1)
            if present is not None:  # absent values are zeros in storage, not bad rows
                ok |= ~present
            nbad = int(n - ok.sum())
            if nbad:
                bad_by_mod[name] = nbad
                if self.nonfinite == "fail":
                    ids = table.column(ID_COLUMN).to_numpy()[~ok][:5].tolist()
                    raise DataError(
                        f"split {self.split!r}: modality {name!r} has {nbad} row(s) with NaN, "
                        f"inf or null values in this block (ids {ids}); clean the data or set "
                        f"data.nonfinite=drop to skip such rows")
                keep &= ok
        if absent_rows.any():
            if self.counter is not None:  # counted apart from the NaN rows below
                self.counter.add_missing(self.split, int(absent_rows.sum()), absent_by_mod)
            table = table.filter(pa.array(~absent_rows))
            keep = keep[~absent_rows]
            n = table.num_rows
        if not bad_by_mod:
            return table
        dropped = int(n - keep.sum())
        logger.warning("split %r: dropped %d row(s) with NaN/inf (%s)", self.split, dropped,
                       ", ".join(f"{k}: {v}" for k, v in bad_by_mod.items()))
        if self.counter is not None:
            self.counter.add(self.split, dropped, bad_by_mod)
        return table.filter(pa.array(keep))


# -------------------------------------------------------------------------- the dataset

FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
FILES_PER_FOOTER_ACTOR = 100
MAX_FOOTER_ACTORS = 32  # Ray Data's own default


def footer_actor_count(n_files: int) -> int:
    """FooterReader actors for a V2 read of `n_files` Parquet files: one per 100 files, at
    least 1, at most Ray Data's default of 32."""
    return max(1, min(MAX_FOOTER_ACTORS, math.ceil(n_files / FILES_PER_FOOTER_ACTOR)))


@contextmanager
def parquet_reader(n_files: int):
    """The Parquet reader of a `ray.data.read_parquet` made inside the block.

    Ray Data 2.60 reads Parquet through DataSourceV2 by default. V2 lists the files of every
    execution -- every epoch -- by reading their footers on a pool of FooterReader actors that
    it creates and kills again each time: 32 by default, whatever the number of files. Each is
    a new worker process; on a small machine that costs seconds of CPU per epoch, taken from
    the training workers, while every worker waits for its first batch. V1 reads the file
    metadata once, when the dataset is built, and an execution only runs read tasks on
    pooled worker processes (the same seeded per-execution file shuffle, the same projection
    push-down). `mmcl bench perf` measures the data wait of each reader, epochs of each
    interleaved in one run (docs/performance.md, section 3).

    So mmcl reads with V1, unless the user chose a reader in the environment
    ($RAY_DATA_USE_DATASOURCE_V2, which Ray reads at import) -- then V2 runs with its footer
    pool sized to the files (one actor per 100, unless $RAY_DATA_PARQUET_FOOTER_NUM_ACTORS is
    set). Both are read on the driver while `read_parquet` builds the dataset, so they are set
    for that call only and restored after.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    set_env = False
    if DATASOURCE_V2_ENV not in os.environ:
        ctx.use_datasource_v2 = False
    elif FOOTER_ACTORS_ENV not in os.environ:
        os.environ[FOOTER_ACTORS_ENV] = str(footer_actor_count(n_files))
        set_env = True
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before
        if set_env:
            os.environ.pop(FOOTER_ACTORS_ENV, None)


def _shard_files(root: str, split: str, endpoint_url: str | None,
                 region: str | None) -> tuple[list[str], Any]:
    """(paths for read_parquet, pyarrow filesystem or None) of one split's shards."""
    from mmcl.data.shards import list_shards

    files = list(list_shards(root, split, endpoint_url, region))
    if not files:
        raise DataError(f"split {split!r} of {root} has no shard files "
                        f"({storage.join(root, split)}/part-*.parquet)")
    if not storage.is_remote(root):
        return [f[len("file://"):] if f.startswith("file://") else f for f in files], None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = storage.filesystem(root, endpoint_url, region)
    return [fs._strip_protocol(f) for f in files], PyFileSystem(FSSpecHandler(fs))


def _check_schema(path: str, filesystem: Any, split: str, manifest: Manifest,
                  modalities: list[str], labels: list[str]) -> None:
    """Fail on the driver, before any Ray Data task runs, if a column is missing or mistyped."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path, filesystem=filesystem)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"split {split!r}: cannot read the Parquet schema of {path}: {err}") from None
    for name in [ID_COLUMN, *modalities, *labels]:
        if name not in schema.names:
            raise DataError(f"split {split!r}: shard {path} has no column {name!r} "
                            f"(it has {schema.names})")
    for name in [m for m in modalities if m in manifest.modality_names]:
        spec = manifest.modality(name)
        if not _type_matches(schema.field(name).type, spec.shape, spec.dtype):
            raise _type_error(split, name, _expected_type(spec.shape, spec.dtype),
                              schema.field(name).type)


def complete_rows(root: str, split: str, manifest: Manifest, modalities: list[str],
                  endpoint_url: str | None = None, region: str | None = None) -> int:
    """Rows of a split that hold every one of `modalities`: what data.missing="drop" trains
    on. The manifest counts absent values per modality, not how they overlap, so this reads
    the split's presence columns (one bool per row and nullable modality, nothing else)."""
    import pyarrow.parquet as pq

    nullable = [present_column(m) for m in modalities if manifest.modality(m).nullable
                and manifest.missing.get(split, {}).get(m, 0)]
    if not nullable:
        return manifest.splits.get(split, 0)
    paths, filesystem = _shard_files(root, split, endpoint_url, region)
    rows = 0
    for path in paths:
        table = pq.read_table(path, columns=nullable, filesystem=filesystem)
        present = np.ones(table.num_rows, dtype=bool)
        for name in nullable:
            present &= table.column(name).to_numpy(zero_copy_only=False).astype(bool)
        rows += int(present.sum())
    return rows


def build_dataset(root: str, split: str, manifest: Manifest,
                  columns: list[str] | None = None, *, seed: int = 0, epoch: int = 0,
                  shuffle_files: bool = True, nonfinite: NonFinite = "fail",
                  drop_counter: DropCounter | None = None, endpoint_url: str | None = None,
                  region: str | None = None, missing: Missing = "mask") -> "ray.data.Dataset":
    """A lazy Ray Dataset of one split: `id`, the selected modality and label columns.

    `columns` names modalities and/or labels to keep (None: every column in the manifest);
    `id` is always kept. With `shuffle_files` the file order is shuffled on every execution
    (every epoch) from a seed derived from (seed, epoch), where execution k serves epoch
    `epoch` + k; `epoch` is the first epoch this dataset serves (pass the resume epoch: a
    resumed run then reads each epoch in the order a straight run does).
    Modality columns stay Arrow fixed-shape tensors; consumers get (N, *shape) float32 arrays.
    Rows with NaN/inf/null in a modality raise `DataError` (nonfinite="fail") or are dropped
    and counted in `drop_counter` (nonfinite="drop"). A modality's `__len` / `__present`
    columns come with it; tuples lacking a nullable modality raise `DataError` (missing=
    "fail", checked on the driver from the manifest's counts), are dropped ("drop") or kept
    ("mask").
    """
    import ray.data

    from mmcl.data.epoch_shuffle import EpochFileShuffle

    if nonfinite not in ("fail", "drop"):
        raise ValueError(f"nonfinite must be 'fail' or 'drop', got {nonfinite!r}")
    label_names = [lab.name for lab in manifest.labels]
    if columns is None:
        mods, labels = manifest.modality_names, label_names
    else:
        unknown = [c for c in columns
                   if c not in manifest.modality_names and c not in label_names and c != ID_COLUMN]
        if unknown:
            raise DataError(f"columns {unknown} are not in this data set; it has modalities "
                            f"{manifest.modality_names} and labels {label_names}")
        mods = [c for c in manifest.modality_names if c in columns]
        labels = [c for c in label_names if c in columns]
    if missing == "fail":
        for m in mods:
            if manifest.missing.get(split, {}).get(m, 0):
                from mmcl.data.shards import missing_error
                raise missing_error(split, m, manifest.missing[split][m], root)
    stored = [c for m in mods for c in manifest.modality(m).storage_columns]
    paths, filesystem = _shard_files(root, split, endpoint_url, region)
    _check_schema(paths[0], filesystem, split, manifest, stored, labels)

    shuffle = EpochFileShuffle(seed=seed, first_epoch=epoch) if shuffle_files else None
    # select_columns is pushed down into the Parquet read: other columns are never decoded.
    try:
        with parquet_reader(len(paths)):
            ds = ray.data.read_parquet(paths, filesystem=filesystem, shuffle=shuffle,
                                       partitioning=None).select_columns(
                                           [ID_COLUMN, *stored, *labels])
    except Exception:  # noqa: BLE001 - a damaged shard becomes a DataError naming it
        # Ray Data samples the files while it builds the dataset; its error does not say
        # which file is damaged (RayTaskError(OSError) from _fetch_parquet_file_info).
        from mmcl.data.shards import find_unreadable_shard

        found = find_unreadable_shard(root, split, endpoint_url, region)
        if found is None:
            raise
        raise found from None
    check = _CheckRows(split, {m: manifest.modality(m) for m in mods}, nonfinite,
                       drop_counter, missing)
    # batch_size=None: one call per block, fused into the read task; Arrow in and out.
    return ds.map_batches(check, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


# ------------------------------------------------------------------------ worker splits


def ingest_options() -> "ray.data.ExecutionOptions":
    """Train's default ingest options (carried over from the current DataContext) plus
    preserve_order: with it, each worker's rows and their order are repeatable given a seed."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def train_data_config() -> "ray.train.DataConfig":
    """The `dataset_config=` for `TorchTrainer(datasets={"train": ds, ...})`. Each worker then
    calls `ray.train.get_dataset_shard("train")`; Ray Train builds the shards with
    `ds.streaming_split(num_workers, equal=True)` (this is what mmcl's training uses)."""
    import ray.train

    return ray.train.DataConfig(datasets_to_split="all", execution_options=ingest_options())


# ---------------------------------------------------------------------- worker batches


_DATA_ERROR_TEXT = re.compile(r"(?:mmcl\.data\.schema\.)?DataError: (.+)")


def find_data_error(exc: BaseException) -> DataError | None:
    """The mmcl `DataError` behind an exception from Ray (Ray Data UDF errors arrive as
    `RayTaskError(UserCodeException)` with only the original's text), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    match = _DATA_ERROR_TEXT.search(str(exc))
    return DataError(match.group(1).strip()) if match else None


def iter_worker_batches(shard: "ray.data.DataIterator | ray.data.Dataset", batch_size: int, *,
                        shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0, rank: int = 0,
                        device: "str | torch.device" = "cpu",
                        prefetch_batches: int = 1) -> Iterator[dict[str, "torch.Tensor"]]:
    """One epoch of one worker's shard as dict[column, tensor] batches of exactly
    `batch_size` rows (the rows that do not fill a last batch are left out), modalities
    (B, *shape) float32, `id` int64.

    The in-stream shuffle (`shuffle_buffer` rows; 0 = off) is seeded from (seed, epoch, rank).
    Every worker of an equal split gets the same number of batches, floor(rows / batch_size).
    Batches for a CUDA device come through pinned host memory. A `DataError` raised in the
    data pipeline is re-raised here as `DataError`.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    kwargs: dict[str, Any] = {}
    if shuffle_buffer:
        kwargs.update(local_shuffle_buffer_size=int(shuffle_buffer),
                      local_shuffle_seed=local_shuffle_seed(seed, epoch, rank))
    import torch

    batches = shard.iter_torch_batches(batch_size=int(batch_size), drop_last=False,
                                       device=device, prefetch_batches=prefetch_batches,
                                       pin_memory=torch.device(device).type == "cuda",
                                       **kwargs)
    try:
        yield from full_batches(batches, int(batch_size))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised unless it carries a DataError
        data_error = find_data_error(err)
        if data_error is None:
            raise
        raise data_error from None


def full_batches(batches: Iterable[dict[str, "torch.Tensor"]], batch_size: int
                 ) -> Iterator[dict[str, "torch.Tensor"]]:
    """`batches` re-cut into batches of exactly `batch_size` rows, in order; the rows that
    do not fill a last batch are dropped. Ray Data's local shuffle yields short batches in
    mid-stream at block boundaries, not only at the end (drop_last keeps them): a worker
    then took more, smaller steps than an epoch has, and workers differed in step counts
    (DDP waits forever for the one with fewer)."""
    import torch

    pending: list[dict[str, torch.Tensor]] = []
    rows = 0
    for batch in batches:
        n = len(next(iter(batch.values())))
        if not pending and n == batch_size:
            yield batch  # the common case: nothing to copy
            continue
        pending.append(batch)
        rows += n
        while rows >= batch_size:
            joined = {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            rows -= batch_size
            pending = [{k: v[batch_size:] for k, v in joined.items()}] if rows else []


# --------------------------------------------------------------- a run's stream of epochs

# Batches a worker fetches ahead of its training loop, across epoch boundaries too. While the
# last of them train, the next epoch's execution starts (Ray Data re-executes the dataset every
# epoch; its time to the first batch: docs/performance.md, section 3); 4 demo batches (128
# rows, 3 x 32 floats) are ~0.2 MB, 4 default-size image batches (3 x 96 x 96 uint8 as
# float32) ~56 MB.
AHEAD_BATCHES = 4
_END = object()


class EpochStream:
    """One worker's batches for a run of epochs, fetched by one background thread that runs
    ahead of training by up to `ahead` batches: it starts epoch e + 1 as soon as it has
    fetched the last batch of epoch e, while those batches still train, so no epoch waits for
    its data to start flowing. Start it early (before the model is built) and the first
    epoch's start overlaps with that too.

    `open_epoch(e)` returns epoch e's batch iterator (e.g. `iter_worker_batches` on the Ray
    Data shard, seeded by e). `skip` batches of the first epoch are fetched and dropped (a
    run resumed mid-epoch: the stream of that epoch is deterministic, so what follows is what
    a straight run trained on next). `epoch(e)` yields (index within the epoch, batch); the
    epochs must be consumed in order. Content and order are exactly those of iterating the
    epochs one by one; only the timing differs. Errors of the data pipeline are raised in
    the consumer, as they would be without the thread.

    Every worker of an equal split fetches the same batches per epoch, so each worker's
    thread reaches the next epoch's barrier (Ray Data's split coordinator starts an epoch
    once every split asked for it) after fetching epoch e, never waiting on a worker that
    needs epoch e + 1 to go on."""

    def __init__(self, open_epoch: Callable[[int], Iterable], epochs: Iterable[int],
                 skip: int = 0, ahead: int = AHEAD_BATCHES,
                 on_epoch_read: Callable[[int], None] | None = None):
        self._open, self._epochs, self._skip = open_epoch, list(epochs), int(skip)
        self._on_epoch_read = on_epoch_read
        self._items: queue.Queue = queue.Queue(maxsize=max(1, int(ahead)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fetch, name="mmcl-epoch-stream",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fetch(self) -> None:
        try:
            for n, epoch in enumerate(self._epochs):
                skip = self._skip if n == 0 else 0
                batches = iter(self._open(epoch))
                try:
                    for index, batch in enumerate(batches):
                        if index < skip:
                            continue
                        if not self._put((epoch, index, batch)):
                            return
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()  # ends the split's epoch now, also when stopped early
                if self._on_epoch_read is not None and not self._stop.is_set():
                    self._on_epoch_read(epoch)  # before the next epoch is asked for
                if not self._put((epoch, None, _END)):
                    return
        except BaseException as err:  # noqa: BLE001 - raised again in the consumer
            self._put((None, None, err))

    def epoch(self, epoch: int) -> Iterator[tuple[int, Any]]:
        """(index, batch) of epoch `epoch`, from the first batch not yet consumed."""
        while True:
            got, index, item = self._items.get()
            if isinstance(item, BaseException):
                raise item
            if got != epoch:
                raise RuntimeError(f"EpochStream: epoch {epoch} asked for, but the stream is "
                                   f"at epoch {got}; consume the epochs in order")
            if item is _END:
                return
            yield index, item

    def close(self) -> None:
        """Stop fetching (a run that ends before its last epoch, or fails)."""
        self._stop.set()
