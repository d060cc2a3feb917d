"""Cross-modal retrieval: recall@k and median rank between two modalities of the same tuples,
and, when a label is given, same-label recall@k and mAP beside them.

    retrieval_metrics(a, b)                       in memory: rows of a and b are the pairs
    retrieval_from_parquet(out, "test", "a", "b") the same over `mmcl embed`'s output, in chunks

Query i of modality a retrieves among the tuples' b (the gallery); its match is tuple i's b.
A tuple whose modality is absent (its `<m>__present` flag false, data.missing=mask) is left
out: a tuple lacking a is no a-query and no item of the b -> a gallery, one lacking b no item
of the a -> b gallery; a query needs both sides (its exact match must exist), so both
directions have the same queries. The rank of the match is 1 + the number of *other* gallery
rows scoring strictly higher (ties count in the match's favour), so recall@k = fraction of
queries with rank <= k and the median rank follows exactly. Scores are dot products of the
stored vectors: `mmcl embed` writes each modality's embedding in the space the objective
compares modalities in (`shared_<m>`, already L2-normalised where the loss uses cosine
similarity), so a dot product is the objective's own similarity.

Exact-row recall asks for one tuple among many that often fit as well (another image of the
same digit). With a class label, `label_recall@k` counts a query as found when a gallery item
of its label is in the top k (1 + the number of gallery items scoring strictly higher than
the best-scoring item of its label <= k), and `label_mAP` is the mean over queries of the
average precision of the ranking with the items of the query's label as the relevant ones
(ties as scikit-learn's average_precision_score: precision over every item scoring at least
as high). `label_chance@1` is the mean share of the gallery that has the query's label.

Memory is bounded by two chunks for the exact ranks: for each chunk of queries the gallery is
streamed chunk by chunk and only the count of higher-scoring rows per query is kept (no N x N
matrix). Counting is exact, so any chunking gives the same integers. The label figures hold
the gallery's vectors and labels (N x D, not N x N) and score queries in blocks. Scores are
float64 on the CPU (a float32 tie between a match and another row is then no concern); on a
GPU, float32. Chance: a random ranking gives recall@k = k / N and median rank (N + 1) / 2.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from mmcl.data.schema import ID_COLUMN, present_column
from mmcl.evaluate.embed import EmbedError, _split_files, shared_column

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 4096
LABEL_BLOCK = 1 << 22   # query x gallery scores held at once for the label figures
# (ids, a, b, a present, b present, label or None) of the same rows
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]
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


def _queries(chunk: Chunk) -> np.ndarray:
    """The rows of a chunk that are queries: both modalities present."""
    return np.asarray(chunk[3], bool) & np.asarray(chunk[4], bool)


def _higher_counts(source: ChunkSource, chunk: Chunk, device: str) -> tuple[np.ndarray, ...]:
    """For the queries of `chunk` (rows with both sides present): how many other gallery rows
    outscore the match, a -> b (gallery: rows with b) and b -> a (rows with a), streaming the
    gallery from `source`."""
    import torch

    keep = _queries(chunk)
    ids_q, a_q, b_q = (np.asarray(x)[keep] for x in chunk[:3])
    qa, qb = _tensor(a_q, device), _tensor(b_q, device)
    match = (qa * qb).sum(dim=1)            # the same score in both directions
    ids_q_t = torch.as_tensor(np.array(ids_q, dtype=np.int64), device=device)
    above_ab = torch.zeros(len(ids_q), dtype=torch.int64, device=device)
    above_ba = torch.zeros_like(above_ab)
    for ids_g, a_g, b_g, has_a, has_b, _ in source():
        ga, gb = _tensor(a_g, device), _tensor(b_g, device)
        other = ids_q_t[:, None] != torch.as_tensor(np.array(ids_g, dtype=np.int64),
                                                     device=device)[None, :]
        in_b = torch.as_tensor(np.asarray(has_b, bool), device=device)[None, :]
        in_a = torch.as_tensor(np.asarray(has_a, bool), device=device)[None, :]
        above_ab += ((qa @ gb.T > match[:, None]) & other & in_b).sum(dim=1)
        above_ba += ((qb @ ga.T > match[:, None]) & other & in_a).sum(dim=1)
    return above_ab.cpu().numpy(), above_ba.cpu().numpy()


def _summary(ranks: np.ndarray, ks: Sequence[int], gallery: int) -> dict[str, float]:
    n = len(ranks)
    out = {f"recall@{k}": float((ranks <= k).mean()) if n else float("nan") for k in ks}
    out["median_rank"] = float(np.median(ranks)) if n else float("nan")
    out.update({f"chance@{k}": min(1.0, k / gallery) if gallery else float("nan")
                for k in ks})
    out["chance_median_rank"] = (gallery + 1) / 2
    out["gallery"] = int(gallery)
    return out


def retrieval_ranks(source: ChunkSource, device: str = "auto") -> tuple[np.ndarray, ...]:
    """(ids, rank a -> b, rank b -> a) of every query the source yields (rows with both
    modalities present; ranks start at 1)."""
    device = _device(device)
    ids, ab, ba = [], [], []
    for chunk in source():
        up_ab, up_ba = _higher_counts(source, chunk, device)
        ids.append(np.asarray(chunk[0], dtype=np.int64)[_queries(chunk)])
        ab.append(up_ab + 1)
        ba.append(up_ba + 1)
    if not ids:
        raise ValueError("retrieval needs at least one row")
    return np.concatenate(ids), np.concatenate(ab), np.concatenate(ba)


def _gathered(source: ChunkSource) -> dict[str, np.ndarray]:
    """Every row the source yields, in memory (vectors, flags, labels: N x D, no N x N)."""
    parts = list(source())
    cat = (lambda i: np.concatenate([np.asarray(p[i]) for p in parts]))  # noqa: E731
    out = {"ids": cat(0), "a": cat(1).astype(np.float64), "b": cat(2).astype(np.float64),
           "has_a": cat(3).astype(bool), "has_b": cat(4).astype(bool)}
    if parts and parts[0][5] is not None:
        out["label"] = cat(5)
    return out


def label_figures(queries: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray,
                  g_labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Same-label recall@k, mAP and the chance of a same-label first item, queries against a
    gallery (float64, in blocks of LABEL_BLOCK scores)."""
    q_labels, g_labels = np.asarray(q_labels), np.asarray(g_labels)
    n_q, n_g = len(queries), len(gallery)
    if n_q == 0 or n_g == 0:
        return {**{f"label_recall@{k}": float("nan") for k in ks}, "label_mAP": float("nan")}
    first_rank = np.empty(n_q, dtype=np.int64)
    ap = np.empty(n_q)
    share = np.empty(n_q)
    step = max(1, LABEL_BLOCK // n_g)
    for start in range(0, n_q, step):
        scores = queries[start:start + step] @ gallery.T                  # (q, N)
        relevant = q_labels[start:start + step, None] == g_labels[None, :]
        best = np.where(relevant, scores, -np.inf).max(axis=1)
        first_rank[start:start + step] = 1 + (scores > best[:, None]).sum(axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        s_sorted = np.take_along_axis(scores, order, axis=1)
        r_sorted = np.take_along_axis(relevant, order, axis=1)
        # For each position: how many items score >= its score (the end of its tie group)
        # and how many of those are relevant: the precision at that threshold.
        width = s_sorted.shape[1]
        last = np.ones_like(r_sorted)
        last[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
        ends = np.where(last, np.arange(1, width + 1)[None, :], width)
        ends = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
        cum = np.cumsum(r_sorted, axis=1)
        precision = np.take_along_axis(cum, ends - 1, axis=1) / ends
        total = r_sorted.sum(axis=1)
        ap[start:start + step] = np.where(
            total > 0, (precision * r_sorted).sum(axis=1) / np.maximum(total, 1), 0.0)
        share[start:start + step] = relevant.mean(axis=1)
    out = {f"label_recall@{k}": float((first_rank <= k).mean()) for k in ks}
    out["label_mAP"] = float(ap.mean())
    out["label_chance@1"] = float(share.mean())
    return out


def summarise(ranks_ab: np.ndarray, ranks_ba: np.ndarray, a: str, b: str,
              ks: Sequence[int] = DEFAULT_KS, gallery: tuple[int, int] | None = None,
              absent: int = 0) -> dict:
    """{"a_to_b": {recall@k, median_rank, chance@k, chance_median_rank, gallery}, "b_to_a":
    ..., "n": queries, "absent": tuples left out for lacking a or b}. `gallery`: the sizes
    of the a -> b and b -> a galleries (default: every query)."""
    n = int(len(ranks_ab))
    g_ab, g_ba = gallery or (n, n)
    return {"modalities": [a, b], "n": n, "absent": int(absent),
            f"{a}_to_{b}": _summary(ranks_ab, ks, g_ab),
            f"{b}_to_{a}": _summary(ranks_ba, ks, g_ba)}


def retrieve(source: ChunkSource, a: str, b: str, ks: Sequence[int] = DEFAULT_KS,
             device: str = "auto", label: str | None = None) -> dict:
    """Exact-row figures of every query of `source`, and the same-label ones when its chunks
    carry a label (`label`: the column's name, recorded)."""
    _, ab, ba = retrieval_ranks(source, device)
    rows = _gathered(source)
    has_a, has_b = rows["has_a"], rows["has_b"]
    out = summarise(ab, ba, a, b, ks, gallery=(int(has_b.sum()), int(has_a.sum())),
                    absent=int((~(has_a & has_b)).sum()))
    if "label" in rows:
        q = has_a & has_b
        out["label"] = label
        out[f"{a}_to_{b}"].update(label_figures(rows["a"][q], rows["label"][q],
                                                rows["b"][has_b], rows["label"][has_b], ks))
        out[f"{b}_to_{a}"].update(label_figures(rows["b"][q], rows["label"][q],
                                                rows["a"][has_a], rows["label"][has_a], ks))
    return out


def array_source(a: np.ndarray, b: np.ndarray, chunk_rows: int = DEFAULT_CHUNK,
                 ids: np.ndarray | None = None, present_a: np.ndarray | None = None,
                 present_b: np.ndarray | None = None,
                 labels: np.ndarray | None = None) -> ChunkSource:
    """Chunks of in-memory pairs (row i of a goes with row i of b); `present_*`: which rows
    hold that modality (default: all); `labels`: a class label per row."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0] or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"retrieval needs two (N, D) arrays of one shape, got {a.shape} "
                         f"and {b.shape}")
    ids = np.arange(len(a)) if ids is None else np.asarray(ids)
    pa_ = np.ones(len(a), bool) if present_a is None else np.asarray(present_a, bool)
    pb_ = np.ones(len(a), bool) if present_b is None else np.asarray(present_b, bool)
    step = max(1, int(chunk_rows))

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(a), step):
            cut = slice(start, start + step)
            yield (ids[cut], a[cut], b[cut], pa_[cut], pb_[cut],
                   None if labels is None else np.asarray(labels)[cut])
    return chunks


def retrieval_metrics(a, b, ks: Sequence[int] = DEFAULT_KS, chunk_rows: int = DEFAULT_CHUNK,
                      device: str = "auto", names: tuple[str, str] = ("a", "b"),
                      present_a=None, present_b=None, labels=None,
                      label: str | None = "label") -> dict:
    """Recall@k and median rank both ways between paired rows of a and b (in memory); rows
    whose side is absent (present_* false) left out; same-label figures when `labels`."""
    source = array_source(a, b, chunk_rows, present_a=present_a, present_b=present_b,
                          labels=labels)
    return retrieve(source, *names, ks=ks, device=device,
                    label=label if labels is not None else None)


def parquet_source(files: Sequence[str], column_a: str, column_b: str,
                   chunk_rows: int = DEFAULT_CHUNK, filesystem=None,
                   present_a: str | None = None, present_b: str | None = None,
                   label: str | None = None) -> ChunkSource:
    """Chunks (ids, a, b, a present, b present, label) read batch by batch from Parquet
    files; `present_*` / `label`: column names (None: every row present / no label)."""
    from mmcl.data.shards import tensor_to_numpy

    extra = [c for c in (present_a, present_b, label) if c]

    def chunks() -> Iterator[Chunk]:
        for f in files:
            handle = filesystem.open(f, "rb") if filesystem is not None else f
            try:
                pf = pq.ParquetFile(handle)
                for batch in pf.iter_batches(batch_size=int(chunk_rows),
                                             columns=[ID_COLUMN, column_a, column_b, *extra]):
                    cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
                    a, _ = tensor_to_numpy(cols[column_a], cols[column_a].type.shape)
                    b, _ = tensor_to_numpy(cols[column_b], cols[column_b].type.shape)
                    n = len(a)
                    flag = (lambda c: np.ones(n, bool) if c is None  # noqa: E731
                            else cols[c].to_numpy(zero_copy_only=False).astype(bool))
                    yield (cols[ID_COLUMN].to_numpy(), a.reshape(n, -1), b.reshape(n, -1),
                           flag(present_a), flag(present_b),
                           None if label is None
                           else cols[label].to_numpy(zero_copy_only=False))
            finally:
                if filesystem is not None:
                    handle.close()
    return chunks


def retrieval_from_parquet(out: str, split: str, a: str, b: str,
                           ks: Sequence[int] = DEFAULT_KS, chunk_rows: int = DEFAULT_CHUNK,
                           device: str = "auto", endpoint_url: str | None = None,
                           region: str | None = None, label: str | None = None) -> dict:
    """Retrieval between modalities a and b over one split of an `mmcl embed` output
    (columns shared_<a>, shared_<b>, and `<m>__present` where a modality may be absent), in
    bounded memory; same-label figures when `label` names a class label column there."""
    fs, files = _split_files(out, split, endpoint_url, region)
    if not files:
        raise EmbedError(f"no embeddings of split {split!r} under {out}")
    names = pq.ParquetFile(fs.open(files[0], "rb")).schema_arrow.names
    missing = [c for c in (shared_column(a), shared_column(b)) if c not in names]
    if missing:
        raise EmbedError(f"no shared-space embedding column(s) {missing} in {out}: the "
                         "objective has no space shared by these modalities (see `mmcl eval "
                         "--help`), or the embeddings predate retrieval; rerun `mmcl embed`")
    if label is not None and label not in names:
        raise EmbedError(f"no label column {label!r} in {out} (it has {names})")
    present = [present_column(m) if present_column(m) in names else None for m in (a, b)]
    source = parquet_source(files, shared_column(a), shared_column(b), chunk_rows, fs,
                            *present, label=label)
    return retrieve(source, a, b, ks=ks, device=device, label=label)
