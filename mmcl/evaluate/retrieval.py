"""Cross-modal retrieval: recall@k and median rank between two modalities of the same tuples.

    retrieval_metrics(a, b)                       in memory: rows of a and b are the pairs
    retrieval_from_parquet(out, "test", "a", "b") the same over `mmcl embed`'s output, in chunks

Query i of modality a retrieves among every tuple's b (the gallery); its match is tuple i's b.
The rank of the match is 1 + the number of *other* gallery rows scoring strictly higher (ties
count in the match's favour), so recall@k = fraction of queries with rank <= k and the median
rank follows exactly. Scores are dot products of the stored vectors: `mmcl embed` writes each
modality's embedding in the space the objective compares modalities in (`shared_<m>`,
already L2-normalised where the loss uses cosine similarity), so a dot product is the
objective's own similarity.

Memory is bounded by two chunks: for each chunk of queries the gallery is streamed chunk by
chunk and only the count of higher-scoring rows per query is kept (no N x N matrix, no top-k
lists: the count gives the exact rank, which a top-k merge cannot give beyond k). Counting is
exact, so any chunking gives the same integers. Scores are float64 on the CPU (a float32 tie
between a match and another row is then no concern); on a GPU, float32. Chance: a random
ranking gives recall@k = k / N and median rank (N + 1) / 2.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from mmcl.data.schema import ID_COLUMN
from mmcl.evaluate.embed import EmbedError, _split_files, shared_column

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 4096
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]   # (ids, a, b) of the same rows
ChunkSource = Callable[[], Iterator[Chunk]]


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _tensor(x: np.ndarray, device: str):
    import torch

    dtype = torch.float64 if device == "cpu" else torch.float32
    return torch.as_tensor(np.array(x, copy=True)).to(device=device, dtype=dtype)


def _higher_counts(source: ChunkSource, chunk: Chunk, device: str) -> tuple[np.ndarray, ...]:
    """For the queries of `chunk`: how many other gallery rows outscore the match, a -> b and
    b -> a, streaming the gallery from `source`."""
    import torch

    ids_q, a_q, b_q = chunk
    qa, qb = _tensor(a_q, device), _tensor(b_q, device)
    match = (qa * qb).sum(dim=1)            # the same score in both directions
    ids_q_t = torch.as_tensor(np.array(ids_q, dtype=np.int64), device=device)
    above_ab = torch.zeros(len(ids_q), dtype=torch.int64, device=device)
    above_ba = torch.zeros_like(above_ab)
    for ids_g, a_g, b_g in source():
        ga, gb = _tensor(a_g, device), _tensor(b_g, device)
        other = ids_q_t[:, None] != torch.as_tensor(np.array(ids_g, dtype=np.int64),
                                                     device=device)[None, :]
        above_ab += ((qa @ gb.T > match[:, None]) & other).sum(dim=1)
        above_ba += ((qb @ ga.T > match[:, None]) & other).sum(dim=1)
    return above_ab.cpu().numpy(), above_ba.cpu().numpy()


def _summary(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    n = len(ranks)
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out.update({f"chance@{k}": min(1.0, k / n) for k in ks})
    out["chance_median_rank"] = (n + 1) / 2
    return out


def retrieval_ranks(source: ChunkSource, device: str = "auto") -> tuple[np.ndarray, ...]:
    """(ids, rank a -> b, rank b -> a) of every row the source yields (ranks start at 1)."""
    device = _device(device)
    ids, ab, ba = [], [], []
    for chunk in source():
        up_ab, up_ba = _higher_counts(source, chunk, device)
        ids.append(np.asarray(chunk[0], dtype=np.int64))
        ab.append(up_ab + 1)
        ba.append(up_ba + 1)
    if not ids:
        raise ValueError("retrieval needs at least one row")
    return np.concatenate(ids), np.concatenate(ab), np.concatenate(ba)


def summarise(ranks_ab: np.ndarray, ranks_ba: np.ndarray, a: str, b: str,
              ks: Sequence[int] = DEFAULT_KS) -> dict:
    """{"a_to_b": {recall@k, median_rank, chance@k, chance_median_rank}, "b_to_a": ..., "n"}."""
    return {"modalities": [a, b], "n": int(len(ranks_ab)),
            f"{a}_to_{b}": _summary(ranks_ab, ks), f"{b}_to_{a}": _summary(ranks_ba, ks)}


def array_source(a: np.ndarray, b: np.ndarray, chunk_rows: int = DEFAULT_CHUNK,
                 ids: np.ndarray | None = None) -> ChunkSource:
    """Chunks of in-memory pairs (row i of a goes with row i of b)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0] or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"retrieval needs two (N, D) arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    ids = np.arange(len(a)) if ids is None else np.asarray(ids)
    step = max(1, int(chunk_rows))

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(a), step):
            yield ids[start:start + step], a[start:start + step], b[start:start + step]
    return chunks


def retrieval_metrics(a, b, ks: Sequence[int] = DEFAULT_KS, chunk_rows: int = DEFAULT_CHUNK,
                      device: str = "auto", names: tuple[str, str] = ("a", "b")) -> dict:
    """Recall@k and median rank both ways between paired rows of a and b (in memory)."""
    _, ab, ba = retrieval_ranks(array_source(a, b, chunk_rows), device)
    return summarise(ab, ba, *names, ks=ks)


def parquet_source(files: Sequence[str], column_a: str, column_b: str,
                   chunk_rows: int = DEFAULT_CHUNK, filesystem=None) -> ChunkSource:
    """Chunks (ids, a, b) read batch by batch from Parquet files; nothing else stays in
    memory."""
    from mmcl.data.shards import tensor_to_numpy

    def chunks() -> Iterator[Chunk]:
        for f in files:
            handle = filesystem.open(f, "rb") if filesystem is not None else f
            try:
                pf = pq.ParquetFile(handle)
                for batch in pf.iter_batches(batch_size=int(chunk_rows),
                                             columns=[ID_COLUMN, column_a, column_b]):
                    cols = [batch.column(i) for i in range(3)]
                    a, _ = tensor_to_numpy(cols[1], cols[1].type.shape)
                    b, _ = tensor_to_numpy(cols[2], cols[2].type.shape)
                    yield cols[0].to_numpy(), a.reshape(len(a), -1), b.reshape(len(b), -1)
            finally:
                if filesystem is not None:
                    handle.close()
    return chunks


def retrieval_from_parquet(out: str, split: str, a: str, b: str,
                           ks: Sequence[int] = DEFAULT_KS, chunk_rows: int = DEFAULT_CHUNK,
                           device: str = "auto", endpoint_url: str | None = None,
                           region: str | None = None) -> dict:
    """Retrieval between modalities a and b over one split of an `mmcl embed` output
    (columns shared_<a>, shared_<b>), in bounded memory."""
    fs, files = _split_files(out, split, endpoint_url, region)
    if not files:
        raise EmbedError(f"no embeddings of split {split!r} under {out}")
    names = pq.ParquetFile(fs.open(files[0], "rb")).schema_arrow.names
    missing = [c for c in (shared_column(a), shared_column(b)) if c not in names]
    if missing:
        raise EmbedError(f"no shared-space embedding column(s) {missing} in {out}: the "
                         "objective has no space shared by these modalities (see `mmcl eval "
                         "--help`), or the embeddings predate retrieval; rerun `mmcl embed`")
    source = parquet_source(files, shared_column(a), shared_column(b), chunk_rows, fs)
    _, ab, ba = retrieval_ranks(source, device)
    return summarise(ab, ba, a, b, ks=ks)
