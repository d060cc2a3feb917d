"""Embeddings of a trained run over a data set: Ray Data batch inference -> Parquet.

    embed_run(run, out)                      every split of the run's data set, on Ray
    embed_run(run, out, use_ray=False)       the same in this process, shard by shard
    read_embeddings(out, "test")             one split back as {column: array}, sorted by id

The output folder is a Hive-partitioned Parquet data set, one folder per split, plus a small
description written last (its presence marks a complete output):

    out/split=train/*.parquet      id (int64), embedding (fixed-shape tensor [d]),
    out/split=val/*.parquet        embedding_<modality> per modality ([d_m]),
    out/split=test/*.parquet       shared_<modality> where the objective has a space shared by
                                   the modalities (cross-modal retrieval; see retrieval.py),
                                   the data set's label and factor columns, unchanged
    out/_embeddings.json           run, data, rows per split, columns, label specs

`pyarrow.parquet.read_table(out)` reads all of it with a `split` column. Embedding columns are
Arrow's canonical `arrow.fixed_shape_tensor` (float32), like the modality columns of the data.

On Ray the splits are read with the data pipeline (`mmcl.data.pipeline.build_dataset`, no file
shuffle), unioned, and `map_batches` runs `Embedder`, a callable class, in an autoscaling actor
pool (1..`concurrency` actors, one GPU each when the cluster has GPUs): each actor loads the
model once with `mmcl.load` and embeds batch after batch; `write_parquet` writes from the
actors. Nothing but file names and counts passes through the driver, so the data set may be
larger than memory. Ray does not keep the row order: match rows by `id`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmcl import storage
from mmcl.cluster import connect
from mmcl.data.schema import ID_COLUMN, DataError, Manifest, present_column

FUSED = "embedding"
SPLIT_COLUMN = "split"
META_NAME = "_embeddings.json"   # "_" prefix: Parquet readers skip it when reading the folder
RAW_MAX_FEATURES = 4096          # raw reference width: larger modalities are projected to it
RAW_PROJECTION_SEED = 0
DEFAULT_BATCH_SIZE = 1024
FORMAT = 1
# use_ray=None embeds splits of at most this many stored bytes in this process: starting Ray
# and an actor pool costs more than the whole job there (the demo's 4,096 tuples: ~20-40 s of
# Ray start and actors against ~2 s of inference).
IN_PROCESS_MAX_BYTES = 256 << 20


class EmbedError(DataError):
    """Embedding cannot run as asked; the message says what to change."""


def modality_column(name: str) -> str:
    """Output column of one modality's own embedding."""
    return f"{FUSED}_{name}"


def raw_column(name: str) -> str:
    """Output column of one modality's raw features, flattened (evaluation reference only)."""
    return f"raw_{name}"


@functools.lru_cache(maxsize=16)
def _sketch(features: int, width: int, seed: int):
    """The count sketch from `features` to `width` sums as a sparse (width, features) matrix:
    a seeded permutation of `i % width` puts every feature in one bucket (each bucket gets
    floor or ceil of features / width of them), with a seeded random sign."""
    from scipy import sparse

    rng = np.random.default_rng([seed, features, width])
    bucket = rng.permutation(np.arange(features) % width)
    sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), features)
    return sparse.csr_matrix((sign, (bucket, np.arange(features))), shape=(width, features))


def raw_reference(x: np.ndarray, limit: int | None = None,
                  seed: int = RAW_PROJECTION_SEED) -> np.ndarray:
    """A modality's raw reference features, (N, ...) -> (N, at most `limit`) float32: the
    flattened values when there are at most `limit` (default RAW_MAX_FEATURES), else a fixed
    seeded sparse random projection to `limit` (a count sketch: each value, times a random
    sign, is added into one of `limit` sums; inner products are kept in expectation, and a
    linear probe of it is a linear probe of the raw values through one fixed linear map).
    Cost: one sparse product, ~0.1 s per 1,024 rows of 16,000 values on one core."""
    limit = RAW_MAX_FEATURES if limit is None else int(limit)
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if x.shape[1] <= limit:
        return x
    projected = _sketch(x.shape[1], limit, seed) @ x.T     # (limit, N)
    return np.ascontiguousarray(np.asarray(projected).T, dtype=np.float32)


def raw_reference_note(features: int, limit: int | None = None) -> str | None:
    """How a modality of `features` values becomes its raw reference (None: as it is)."""
    limit = RAW_MAX_FEATURES if limit is None else int(limit)
    if features <= limit:
        return None
    return (f"{features} values through a fixed seeded random projection to {limit} (each "
            f"value, times a random sign, summed into one of {limit} features)")


def shared_column(name: str) -> str:
    """Output column of one modality's embedding in the objective's cross-modal space
    (`objective.shared_embeddings`; written only for objectives that have one)."""
    return f"shared_{name}"


def split_folder(split: str) -> str:
    return f"{SPLIT_COLUMN}={split}"


# ------------------------------------------------------------------------- the run


@dataclass
class RunInfo:
    """What a run folder says about itself, read without loading any weights."""

    url: str                    # the run folder as given (absolute for local paths)
    model_url: str              # the folder holding weights + config + manifest
    config: Any                 # mmcl.config.RunConfig
    manifest: Manifest          # the modalities (and labels) the model was trained on

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def remote(self) -> dict:
        return self.remote_with()

    def remote_with(self, endpoint_url: str | None = None, region: str | None = None) -> dict:
        """S3 endpoint and region for the run's files: the caller's, else the run's config."""
        return {"endpoint_url": endpoint_url or self.config.storage.endpoint_url,
                "region": region or self.config.storage.region}


def _absolute(url: str) -> str:
    url = str(url)
    return url if storage.is_remote(url) else os.path.abspath(os.path.expanduser(url))


def read_run(run: str, endpoint_url: str | None = None, region: str | None = None) -> RunInfo:
    """The config and model manifest of a run folder (or its model/ or a checkpoint folder).
    Nothing is imported here: a plug-in encoder kind is refused (or allowed) where the model
    is loaded (`mmcl.load(..., trust_plugins)`)."""
    from mmcl.train.checkpoint import (CONFIG, MANIFEST, STATE, WEIGHTS, CheckpointError,
                                       read_config)

    url = _absolute(run)
    fs, root = storage.filesystem(url, endpoint_url, region)
    for folder, shown in ((storage.join(root, "model"), storage.join(url, "model")),
                          (root, url)):
        has_weights = any(fs.exists(storage.join(folder, w)) for w in (WEIGHTS, STATE))
        if has_weights and fs.exists(storage.join(folder, CONFIG)) and \
                fs.exists(storage.join(folder, MANIFEST)):
            cfg = read_config(fs, folder, shown, trust_plugins=True)
            manifest = Manifest.from_json(fs.cat_file(storage.join(folder, MANIFEST)).decode(),
                                          storage.join(shown, MANIFEST))
            parent = url.rstrip("/").rsplit("/", 1)
            if folder == root and len(parent) == 2 and parent[1] == "model" and \
                    fs.exists(storage.join(root.rstrip("/").rsplit("/", 1)[0], "metrics.jsonl")):
                url = parent[0]   # given RUN/model: the run is its parent
            return RunInfo(url, shown, cfg, manifest)
    raise CheckpointError(
        f"no trained model at {run}: expected {WEIGHTS} with {CONFIG} and {MANIFEST} there or "
        f"in its model/ folder. Pass a run folder written by `mmcl pretrain`")


def resolve_run_data(info: RunInfo, data: str | None = None, endpoint_url: str | None = None,
                     region: str | None = None) -> str:
    """The data set to embed: `data` if given; else the run's `data.path`; else the controlled
    data set `mmcl pretrain` generated beside the run (storage.path/_data/...), found from the
    run folder itself so that it does not matter where the command runs; generated (seeded,
    so identical) if it is gone."""
    if data:
        return _absolute(data)
    cfg = info.config
    if cfg.data.path:
        return _absolute(cfg.data.path)
    synth = cfg.data.synth
    parent = info.url.rstrip("/").rsplit("/", 1)[0]
    beside = storage.join(parent, "_data", f"{synth.preset}-n{synth.n}-seed{synth.seed}")
    remote = info.remote_with(endpoint_url, region)
    fs, path = storage.filesystem(beside, **remote)
    if fs.exists(storage.join(path, "manifest.json")):
        return beside
    from mmcl.train.launcher import resolve_data

    moved = cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"path": parent, **remote})})
    return resolve_data(moved)


def check_modalities(model_manifest: Manifest, data_manifest: Manifest, data: str) -> None:
    """The data set must hold every modality the model encodes, with the same shape."""
    problems = []
    for spec in model_manifest.modalities:
        if spec.name not in data_manifest.modality_names:
            problems.append(f"modality {spec.name!r} is missing (the data set has "
                            f"{data_manifest.modality_names})")
        elif data_manifest.modality(spec.name).shape != spec.shape:
            problems.append(f"modality {spec.name!r} has shape "
                            f"{list(data_manifest.modality(spec.name).shape)}, the model was "
                            f"trained on {list(spec.shape)}")
    if problems:
        raise EmbedError(f"the data set at {data} does not fit the model: "
                         + "; ".join(problems) + ". Pass the data set the run was trained on "
                         "(--data) or one with the same modalities")


# --------------------------------------------------------------------------- the UDF


def _tensor_column(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if len(values):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(values)
    t = pa.fixed_shape_tensor(pa.float32(), list(values.shape[1:]))
    return pa.ExtensionArray.from_storage(t, pa.array([], type=t.storage_type))


def label_column(values: np.ndarray) -> pa.Array:
    """A label column as the data set stores it: 1-D values as a plain column, multi-hot
    (N, K) targets (task "multilabel") as a fixed-shape tensor column of their own dtype
    (`pa.array` takes 1-D data only)."""
    if values.ndim == 1:
        return pa.array(values)
    values = np.ascontiguousarray(values)
    if len(values):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(values)
    t = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(values.shape[1:]))
    return pa.ExtensionArray.from_storage(t, pa.array([], type=t.storage_type))


class Embedder:
    """The `map_batches` callable class: loads the model once (per actor), then turns batches
    {id, modalities..., labels...} into Arrow tables {id, embedding, embedding_<m>...,
    raw_<m>..., labels...}. Also used as-is by the in-process path."""

    def __init__(self, model_url: str, modalities: Sequence[str], labels: Sequence[str],
                 raw: Sequence[str] = (), device: str = "auto", endpoint_url: str | None = None,
                 region: str | None = None, passthrough: Sequence[str] = (),
                 trust_plugins: bool = False, raw_limit: int | None = None):
        import torch

        import mmcl

        self.model = mmcl.load(model_url, endpoint_url, region, trust_plugins=trust_plugins)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model.objective.to(device)
        self.modalities, self.labels = list(modalities), list(labels)
        self.raw, self.passthrough = list(raw), list(passthrough)
        self.raw_limit = raw_limit or RAW_MAX_FEATURES

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        import torch

        # Stored dtypes (and `<m>__len` / `<m>__present`): the model's Preparer casts them.
        inputs = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in batch.items()
                  if k.split("__")[0] in self.modalities}
        with torch.no_grad():
            fused = self.model.embed(inputs).float().cpu().numpy()
            own = {m: v.float().cpu().numpy()
                   for m, v in self.model.modality_embeddings(inputs).items()}
            shared = {m: v.float().cpu().numpy()
                      for m, v in self.model.shared_embeddings(inputs).items()}
        cols: dict[str, pa.Array] = {ID_COLUMN: pa.array(np.asarray(batch[ID_COLUMN]),
                                                         pa.int64())}
        cols[FUSED] = _tensor_column(fused)
        for m in self.modalities:
            cols[modality_column(m)] = _tensor_column(own[m].reshape(len(own[m]), -1))
        for m in self.modalities:
            if m in shared:   # only objectives with a cross-modal space (retrieval)
                cols[shared_column(m)] = _tensor_column(shared[m].reshape(len(shared[m]), -1))
        for m in self.modalities:
            if present_column(m) in batch:   # a nullable modality: retrieval leaves absent out
                cols[present_column(m)] = pa.array(np.asarray(batch[present_column(m)], bool))
        for m in self.raw:
            cols[raw_column(m)] = _tensor_column(raw_reference(batch[m], self.raw_limit))
        for name in [*self.labels, *self.passthrough]:
            cols[name] = label_column(np.asarray(batch[name]))
        return pa.table(cols)


class _AddSplit:
    """Tags each row with its split (fused into the read task; Arrow in, Arrow out)."""

    def __init__(self, split: str):
        self.split = split

    def __call__(self, table: pa.Table) -> pa.Table:
        return table.append_column(SPLIT_COLUMN, pa.array([self.split] * table.num_rows,
                                                          pa.string()))


# ------------------------------------------------------------------------------ main


@dataclass
class EmbedResult:
    out: str
    data: str
    run: str
    rows: dict[str, int]
    dims: dict[str, int]
    labels: list[dict] = field(default_factory=list)
    backend: str = "ray"
    elapsed_s: float = 0.0

    def summary(self) -> str:
        rows = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        dims = ", ".join(f"{k} [{v}]" for k, v in self.dims.items())
        return (f"embedded {sum(self.rows.values())} tuples ({rows}) in {self.elapsed_s:.1f}s "
                f"({self.backend})\n  run:     {self.run}\n  data:    {self.data}\n"
                f"  columns: {dims}\n  out:     {self.out}   "
                f"(pyarrow.parquet.read_table(out) or mmcl.evaluate.embed.read_embeddings)")


def _prepare_out(out: str, overwrite: bool, endpoint_url, region) -> None:
    fs, path = storage.filesystem(out, endpoint_url, region)
    if fs.exists(path) and fs.ls(path, detail=False):
        if not overwrite:
            raise EmbedError(f"{out} already exists and is not empty; pass --overwrite to "
                             "replace it, or choose another output folder")
        meta = storage.join(path, META_NAME)
        if fs.exists(meta):
            fs.rm(meta)   # first: a half-replaced output never looks complete
        for entry in fs.ls(path, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1].startswith(f"{SPLIT_COLUMN}="):
                fs.rm(entry, recursive=True)
    fs.makedirs(path, exist_ok=True)


def embed_run(run: str, out: str, data: str | None = None, splits: Sequence[str] | None = None,
              *, use_ray: bool | None = True, address: str | None = None,
              concurrency: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              use_gpu: bool | None = None, raw: bool | Sequence[str] = False,
              overwrite: bool = False, endpoint_url: str | None = None,
              region: str | None = None, trust_plugins: bool = False,
              verbose: bool = False) -> EmbedResult:
    """Embed every split (or `splits`) of the run's data set (or `data`) into `out`.
    `use_ray=None`: in this process when the splits are small (`fits_in_process`) and no
    `address` or `concurrency` asks for Ray, else on Ray. `verbose`: Ray's own output too
    (quiet by default, as `mmcl pretrain`: mmcl.train.console).
    `trust_plugins`: import a plug-in encoder kind the run's recorded config names (refused
    by default, see mmcl.load).

    `raw=True` also writes each modality's raw reference as `raw_<m>` (its flattened values,
    or for a modality of more than RAW_MAX_FEATURES values a fixed random projection to that
    many, see `raw_reference`): the reference `mmcl eval` probes beside the embeddings.
    `use_gpu=None` uses one GPU per actor when the Ray cluster has GPUs."""
    from mmcl.data.shards import list_shards, read_manifest

    start = time.perf_counter()
    if batch_size < 1:
        raise EmbedError("--batch-size must be >= 1")
    if concurrency is not None and concurrency < 1:
        raise EmbedError("--concurrency must be >= 1")
    info = read_run(run, endpoint_url, region)
    # Resolved here (flag, the run's config, then $AWS_ENDPOINT_URL/$AWS_REGION): the actors
    # that load the model on other machines do not see this machine's environment.
    endpoint_url = storage.endpoint(endpoint_url or info.config.storage.endpoint_url)
    region = storage.region_name(region or info.config.storage.region)
    root = resolve_run_data(info, data, endpoint_url, region)
    data_manifest = read_manifest(root, endpoint_url, region)
    check_modalities(info.manifest, data_manifest, root)
    modalities = info.manifest.modality_names
    labels = [lab for lab in data_manifest.labels]
    label_names = [lab.name for lab in labels]
    names = [ID_COLUMN, FUSED, *map(modality_column, modalities), *map(raw_column, modalities),
             *map(shared_column, modalities)]
    clash = sorted(set(label_names) & set(names + [SPLIT_COLUMN]))
    if clash:
        raise EmbedError(f"label column(s) {clash} collide with the output's own columns; "
                         "rename them in the data set")
    if splits is None:
        splits = [s for s in data_manifest.splits if data_manifest.splits[s] > 0]
    unknown = [s for s in splits if s not in data_manifest.splits]
    if unknown:
        raise EmbedError(f"split(s) {unknown} are not in the data set at {root}; it has "
                         f"{sorted(data_manifest.splits)}")
    splits = [s for s in splits if list_shards(root, s, endpoint_url, region)]
    if not splits:
        raise EmbedError(f"the data set at {root} has no shards in the requested splits")
    # Every modality has a raw reference; one above RAW_MAX_FEATURES values is projected.
    raw_mods = list(modalities) if raw is True else [m for m in (raw or []) if m in modalities]
    raw_notes = {m: note for m in raw_mods
                 if (note := raw_reference_note(int(np.prod(data_manifest.modality(m).shape))))}
    out = _absolute(out)
    # Weights that do not fit the run's config (a checkpoint of another config) are refused
    # here, once, before anything is written or an actor starts.
    from mmcl.train.checkpoint import load as load_model

    load_model(info.model_url, endpoint_url, region, trust_plugins=trust_plugins)
    _prepare_out(out, overwrite, endpoint_url, region)
    kwargs = dict(model_url=info.model_url, modalities=modalities, labels=label_names,
                  raw=raw_mods, endpoint_url=endpoint_url, region=region,
                  trust_plugins=trust_plugins, raw_limit=RAW_MAX_FEATURES)
    nonfinite = info.config.data.nonfinite
    if use_ray is None:
        use_ray = bool(address or concurrency) or not fits_in_process(data_manifest, splits,
                                                                      modalities)
    if use_ray:
        backend = _embed_on_ray(root, data_manifest, splits, out, kwargs, nonfinite,
                                address=address, concurrency=concurrency,
                                batch_size=batch_size, use_gpu=use_gpu, verbose=verbose)
    else:
        backend = _embed_in_process(root, data_manifest, splits, out, kwargs, nonfinite,
                                    batch_size=batch_size)
    rows, dims = _count_output(out, splits, endpoint_url, region)
    result = EmbedResult(out, root, info.url, rows, dims, [asdict(lab) for lab in labels],
                         backend, time.perf_counter() - start)
    meta = {"format": FORMAT, "run": info.url, "model": info.model_url, "data": root,
            "objective": info.config.objective.name, "modalities": modalities,
            "raw": raw_mods, "raw_projected": raw_notes, "rows": rows, "columns": dims, "labels": result.labels,
            "backend": backend, "nonfinite": nonfinite,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fs, path = storage.filesystem(out, endpoint_url, region)
    with fs.open(storage.join(path, META_NAME), "w") as f:
        f.write(json.dumps(meta, indent=2))
    return result


def stored_bytes(manifest: Manifest, splits: Sequence[str],
                 modalities: Sequence[str]) -> int:
    """Bytes of the modalities' values in `splits`, uncompressed (rows x shape x dtype)."""
    row = sum(int(np.prod(manifest.modality(m).shape)) *
              np.dtype(manifest.modality(m).dtype).itemsize for m in modalities)
    return sum(int(manifest.splits.get(s, 0)) for s in splits) * row


def fits_in_process(manifest: Manifest, splits: Sequence[str],
                    modalities: Sequence[str]) -> bool:
    """Whether `use_ray=None` embeds these splits in this process (IN_PROCESS_MAX_BYTES)."""
    return stored_bytes(manifest, splits, modalities) <= IN_PROCESS_MAX_BYTES


def _embed_on_ray(root: str, manifest: Manifest, splits: Sequence[str], out: str,
                  kwargs: dict, nonfinite: str, *, address: str | None,
                  concurrency: int | None, batch_size: int, use_gpu: bool | None,
                  verbose: bool = False) -> str:
    import ray
    import ray.data

    from mmcl.data.pipeline import build_dataset, find_data_error
    from mmcl.train import console

    # pretrain's console rules: Ray's known-harmless notices and Ray Data's banners and
    # per-operator output off; one overall Ray Data bar on a terminal.
    console.quiet_driver(verbose)
    # One embedding actor and Ray Data's read tasks: at least 2 CPUs (mmcl.cluster).
    connect(address, cpus_per_job=2, job="embedding", cost="1 actor + 1 for Ray Data",
            error=EmbedError, init_kwargs=console.driver_init_kwargs(verbose))
    console.filter_worker_logs(verbose)
    console.quiet_data(verbose, bar=True)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and gpus < 1:
        raise EmbedError("a GPU was asked for but the Ray cluster has none; drop --gpu")
    if use_gpu:
        actors = min(concurrency or gpus, max(gpus, 1))
    else:
        # One CPU stays with Ray Data's read tasks (see DESIGN: a pool that takes every CPU
        # starves the reads that feed it).
        actors = concurrency or max(1, min(4, int(resources.get("CPU", 2)) - 1))
    columns = [*kwargs["modalities"], *kwargs["labels"]]
    parts = []
    for split in splits:
        ds = build_dataset(root, split, manifest, columns, shuffle_files=False,
                           nonfinite=nonfinite, endpoint_url=kwargs["endpoint_url"],
                           region=kwargs["region"])
        parts.append(ds.map_batches(_AddSplit(split), batch_format="pyarrow", batch_size=None,
                                    zero_copy_batch=True))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        Embedder, fn_constructor_kwargs={**kwargs, "device": "cuda" if use_gpu else "cpu",
                                         "passthrough": [SPLIT_COLUMN]},
        batch_size=batch_size, batch_format="numpy", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=int(actors)),
        num_gpus=1 if use_gpu else None, num_cpus=None if use_gpu else 1,
        udf_modifying_row_count=False)
    path, filesystem = storage.pyarrow_filesystem(out, kwargs["endpoint_url"],
                                                  kwargs["region"])
    try:
        ds.write_parquet(path, filesystem=filesystem, partition_cols=[SPLIT_COLUMN])
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a DataError from the pipeline, else re-raised
        data_error = find_data_error(err)
        if data_error is None:
            raise
        raise data_error from None
    return f"ray ({actors} actor{'s' if actors > 1 else ''} max, "\
           f"{'1 GPU' if use_gpu else '1 CPU'} each)"


def _embed_in_process(root: str, manifest: Manifest, splits: Sequence[str], out: str,
                      kwargs: dict, nonfinite: str, *, batch_size: int) -> str:
    from mmcl.data.shards import storage_columns
    from mmcl.train.console import show_bar

    embedder = Embedder(**kwargs, device="auto")
    columns = [ID_COLUMN, *storage_columns(manifest, kwargs["modalities"]), *kwargs["labels"]]
    fs, path = storage.filesystem(out, kwargs["endpoint_url"], kwargs["region"])
    bar = None
    if show_bar():   # the console's rule: a bar on a terminal only
        from tqdm import tqdm

        bar = tqdm(total=sum(int(manifest.splits.get(s, 0)) for s in splits), unit="tuple",
                   desc="embedding", leave=False, file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5)
    try:
        _embed_splits(embedder, root, splits, columns, manifest, kwargs, nonfinite, fs, path,
                      batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    return "in-process (" + embedder.device + ")"


def _embed_splits(embedder, root, splits, columns, manifest, kwargs, nonfinite, fs, path,
                  batch_size, bar) -> None:
    from mmcl.data.shards import iter_batches

    for split in splits:
        folder = storage.join(path, split_folder(split))
        fs.makedirs(folder, exist_ok=True)
        writer = sink = None
        try:
            for _, record in iter_batches(root, split, columns, batch_size,
                                          kwargs["endpoint_url"], kwargs["region"]):
                arrays = record_arrays(record, manifest, kwargs["modalities"],
                                       kwargs["labels"], split, nonfinite)
                if not len(arrays[ID_COLUMN]):
                    continue
                result = embedder(arrays)
                if bar is not None:
                    bar.update(len(arrays[ID_COLUMN]))
                if writer is None:
                    sink = fs.open(storage.join(folder, "part-00000.parquet"), "wb")
                    writer = pq.ParquetWriter(sink, result.schema)
                writer.write_table(result)
        finally:
            if writer is not None:
                writer.close()
            if sink is not None:
                sink.close()


def record_arrays(record: pa.RecordBatch, manifest: Manifest, modalities: Sequence[str],
                  labels: Sequence[str], split: str, nonfinite: str) -> dict[str, np.ndarray]:
    """One record batch of a shard as the model's input arrays: each modality in its stored
    dtype with its `__len`/`__present` columns, the labels, rows with NaN/inf handled as
    `data.nonfinite` says."""
    from mmcl.data.shards import _handle_nonfinite, tensor_to_numpy

    table = pa.Table.from_batches([record])
    arrays, valid = {ID_COLUMN: table.column(ID_COLUMN).to_numpy()}, {}
    for m in modalities:
        spec = manifest.modality(m)
        arrays[m], valid[m] = tensor_to_numpy(table.column(m), spec.shape, spec.dtype)
        for aux in spec.storage_columns[1:]:
            arrays[aux] = table.column(aux).to_numpy(zero_copy_only=False)
    for name in labels:
        arrays[name] = _label_values(table.column(name))
    return _handle_nonfinite(arrays, valid, split, nonfinite)


def _label_values(column: pa.ChunkedArray) -> np.ndarray:
    """A label column as numpy: (N,) values, or (N, K) for a multi-hot tensor column."""
    from mmcl.data.shards import tensor_to_numpy

    if isinstance(column.type, pa.FixedShapeTensorType):
        return tensor_to_numpy(column, column.type.shape,
                               column.type.value_type.to_pandas_dtype())[0]
    return column.to_numpy()


# --------------------------------------------------------------------------- reading


def _split_files(out: str, split: str, endpoint_url=None, region=None) -> tuple[Any, list[str]]:
    fs, path = storage.filesystem(out, endpoint_url, region)
    files = sorted(fs.glob(storage.join(path, split_folder(split), "*.parquet")))
    return fs, files


def _count_output(out: str, splits: Sequence[str], endpoint_url, region
                  ) -> tuple[dict[str, int], dict[str, int]]:
    """(rows per split from the Parquet footers, width of every tensor column)."""
    rows, dims = {}, {}
    for split in splits:
        fs, files = _split_files(out, split, endpoint_url, region)
        rows[split] = 0
        for f in files:
            with fs.open(f, "rb") as handle:
                pf = pq.ParquetFile(handle)
                rows[split] += pf.metadata.num_rows
                for fld in pf.schema_arrow:
                    if isinstance(fld.type, pa.FixedShapeTensorType):
                        dims[fld.name] = int(np.prod(fld.type.shape))
    return rows, dims


def read_meta(out: str, endpoint_url: str | None = None, region: str | None = None) -> dict:
    fs, path = storage.filesystem(out, endpoint_url, region)
    meta = storage.join(path, META_NAME)
    if not fs.exists(meta):
        raise EmbedError(f"no complete embeddings at {out} ({META_NAME} is missing); write "
                         "them with `mmcl embed --run RUN --out ...`")
    return json.loads(fs.cat_file(meta).decode())


def read_embeddings(out: str, split: str, columns: Sequence[str] | None = None,
                    endpoint_url: str | None = None,
                    region: str | None = None) -> dict[str, np.ndarray]:
    """One split of an embedding output in memory, sorted by id: {"id": (N,), "embedding":
    (N, d) float32, "embedding_<m>": (N, d_m), labels: (N,) ...}. `columns` picks columns
    (`id` always comes)."""
    from mmcl.data.shards import tensor_to_numpy

    fs, files = _split_files(out, split, endpoint_url, region)
    if not files:
        raise EmbedError(f"no embeddings of split {split!r} under {out} "
                         f"({split_folder(split)}/*.parquet)")
    tables = []
    for f in files:
        with fs.open(f, "rb") as handle:
            pf = pq.ParquetFile(handle)
            names = pf.schema_arrow.names
            wanted = names if columns is None else [ID_COLUMN, *[c for c in columns
                                                                if c != ID_COLUMN]]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise EmbedError(f"{f}: no column(s) {missing} (it has {names})")
            tables.append(pf.read(columns=wanted))
    table = pa.concat_tables(tables)
    ids = table.column(ID_COLUMN).to_numpy()
    order = np.argsort(ids, kind="stable")
    result: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name)
        if isinstance(col.type, pa.FixedShapeTensorType):   # embeddings, multi-hot labels
            values, _ = tensor_to_numpy(col, col.type.shape,
                                        col.type.value_type.to_pandas_dtype())
        else:
            values = col.to_numpy()
        result[name] = values[order]
    return result
