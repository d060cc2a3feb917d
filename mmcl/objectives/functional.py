"""Pure contrastive losses and mutual-information bounds (docs/methods.md has the math).

Callers pass L2-normalised embeddings; sim(a, b) = a·b / tau. Every embedding-taking loss has
`distributed: bool | None = None`: None gathers candidates across ranks when
torch.distributed runs with more than one process, True always gathers (a no-op in one
process), False keeps the loss local to this rank's batch.

Distributed convention (see mmcl.objectives.distributed): on each rank the loss is the mean
over that rank's LOCAL anchors scored against the GLOBAL candidates, so the mean of the ranks'
losses is the single-process loss on the concatenated batch, and DDP's averaged gradients are
the single-process gradients. Each rank builds n_local x N_global logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.objectives.distributed import gather_no_grad, gather_with_grad, local_offset, world

# ------------------------------------------------------------------------------ helpers


def _gathering(distributed: bool | None) -> bool:
    """Whether to gather: the caller's choice, or automatically when several ranks run."""
    return world()[1] > 1 if distributed is None else bool(distributed)


def _global(x: Tensor, gather: bool) -> Tensor:
    return gather_with_grad(x) if gather else x


def _offset(n_local: int, gather: bool) -> int:
    """Global index of the first local row among the candidates."""
    return local_offset(n_local) if gather else 0


def _local_targets(n_local: int, offset: int, device) -> Tensor:
    """Column of each local row's positive among the global candidates."""
    return torch.arange(offset, offset + n_local, device=device)


def _one_way(query: Tensor, keys: Tensor, offset: int, temperature: float) -> Tensor:
    """InfoNCE from local queries to global keys: mean_i -log softmax_j(q_i·k_j/tau)[offset+i]."""
    logits = query @ keys.T / temperature
    return F.cross_entropy(logits, _local_targets(len(query), offset, query.device))


def _nt_xent(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, offset: int,
             temperature: float) -> Tensor:
    """NT-Xent of local anchors [a; b] against global candidates [a_all; b_all] (2N of them):
    the positive of a_i is b_i and vice versa, the anchor itself is excluded, the other 2N - 2
    are negatives."""
    n, big_n = len(a), len(a_all)
    anchors = torch.cat([a, b])
    logits = anchors @ torch.cat([a_all, b_all]).T / temperature  # (2n, 2N)
    rows = _local_targets(n, offset, a.device)
    self_cols = torch.cat([rows, rows + big_n])
    positive_cols = torch.cat([rows + big_n, rows])
    # -inf, not a large negative: the anchor must vanish from the softmax exactly.
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=a.device), self_cols] = True
    return F.cross_entropy(logits.masked_fill(self_mask, -math.inf), positive_cols)


# ------------------------------------------------------------------------------ losses


def info_nce(a: Tensor, b: Tensor, temperature: float, *,
             distributed: bool | None = None, valid: Tensor | None = None) -> Tensor:
    """CLIP's symmetric InfoNCE between aligned rows of a and b (N x d each).

    L = 1/2 [ mean_i -log softmax_j(a_i·b_j/tau)[i] + mean_i -log softmax_j(b_i·a_j/tau)[i] ].

    `valid` (bool (N,)): the rows that are pairs (both sides present, data.missing=mask); the
    others are neither anchors nor candidates, so they contribute nothing: the loss equals
    InfoNCE on the valid rows alone (over ranks too: each rank divides its sum by the global
    count over the world size). No valid row anywhere: a zero that keeps the graph.
    """
    gather = _gathering(distributed)
    offset = _offset(len(a), gather)
    a_all, b_all = _global(a, gather), _global(b, gather)
    if valid is None:
        return 0.5 * (_one_way(a, b_all, offset, temperature)
                      + _one_way(b, a_all, offset, temperature))
    valid = valid.to(device=a.device, dtype=torch.bool).reshape(len(a))
    valid_all = gather_no_grad(valid.to(torch.uint8)).bool() if gather else valid
    count = valid_all.sum()
    if not bool(count):
        return 0.0 * (a.sum() + b.sum())
    ranks = len(valid_all) / len(valid)   # the world size (every rank holds N rows)
    return 0.5 * (_one_way_masked(a, b_all, offset, temperature, valid, valid_all)
                  + _one_way_masked(b, a_all, offset, temperature, valid, valid_all)
                  ) * ranks / count


def _one_way_masked(query: Tensor, keys: Tensor, offset: int, temperature: float,
                    valid: Tensor, valid_all: Tensor) -> Tensor:
    """The SUM over valid local queries of -log softmax over the valid keys (-inf masks the
    others out of the softmax exactly)."""
    logits = (query @ keys.T / temperature).masked_fill(~valid_all[None, :], -math.inf)
    logits = logits.masked_fill(~valid[:, None], 0.0)   # invalid queries: finite, dropped
    losses = F.cross_entropy(logits, _local_targets(len(query), offset, query.device),
                             reduction="none")
    return losses.masked_fill(~valid, 0.0).sum()


def sigmoid_pairwise(a: Tensor, b: Tensor, log_temperature: Tensor, bias: Tensor, *,
                     distributed: bool | None = None, valid: Tensor | None = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) between aligned rows of a and b:

        z_ij = exp(t') a_i·b_j + b,   label_ij = +1 if i = j else -1,
        L = -(1/N) sum_i sum_j log sigmoid(label_ij z_ij),

    normalised by the number of anchors N, as the paper. Every pair is scored on its own (no
    softmax), so one direction covers all N^2 pairs: each rank scores its local a against the
    global b (gathered with gradient) and divides its sum by its local N, so the mean over ranks
    is the single-process loss (open_clip passes b around the ranks instead; the sum is the
    same). `log_temperature` (t') and `bias` (b) are scalar tensors, learnt by the caller.

    `valid` (bool (N,)): the rows that are pairs (data.missing=mask); the others are neither
    anchors nor candidates, and the loss is the one on the valid rows alone, normalised by
    their global count. No valid row anywhere: a zero that keeps the graph.
    """
    gather = _gathering(distributed)
    offset = _offset(len(a), gather)
    b_all = _global(b, gather)
    logits = log_temperature.exp() * (a @ b_all.T) + bias          # (n, N)
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[torch.arange(len(a), device=a.device),
             _local_targets(len(a), offset, a.device)] = True
    pair_losses = -F.logsigmoid(torch.where(positive, logits, -logits))
    if valid is None:
        return pair_losses.sum() / len(a)
    valid = valid.to(device=a.device, dtype=torch.bool).reshape(len(a))
    valid_all = gather_no_grad(valid.to(torch.uint8)).bool() if gather else valid
    count = valid_all.sum()
    if not bool(count):
        return 0.0 * (a.sum() + b.sum() + log_temperature + bias)
    ranks = len(valid_all) / len(valid)   # the world size (every rank holds N rows)
    keep = valid[:, None] & valid_all[None, :]
    return pair_losses.masked_fill(~keep, 0.0).sum() * ranks / count


def nt_xent(a: Tensor, b: Tensor, temperature: float, *,
            distributed: bool | None = None) -> Tensor:
    """SimCLR's NT-Xent: each of the 2N embeddings [a; b] is an anchor, its partner (b_i for a_i,
    a_i for b_i) the positive, the other 2N - 2 the negatives (the anchor itself excluded):

        L = mean over the 2N anchors z of -log( exp(z·z+/tau) / sum_{z' != z} exp(z·z'/tau) ).

    Symmetric in (a, b).
    """
    gather = _gathering(distributed)
    offset = _offset(len(a), gather)
    return _nt_xent(a, b, _global(a, gather), _global(b, gather), offset, temperature)


def comm_loss(views1: Sequence[Tensor], views2: Sequence[Tensor], temperature: float,
              reduction: str = "mean", *, distributed: bool | None = None) -> Tensor:
    """CoMM: views are [Z_1, ..., Z_M, Z] (one embedding per single-modality mask, then the full
    tuple) of the two augmentations. Term i (i = 0..M) is

        T_i = 1/2 [ NT-Xent(views1[i], views2[-1]) + NT-Xent(views2[i], views1[-1]) ];

    T_M is NT-Xent(Z', Z'') (redundancy, uniqueness and synergy), T_i for i < M is L_i of
    docs/methods.md. reduction "mean" averages the M + 1 terms (CoMM's code), "sum" adds them
    (its paper).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if len(views1) != len(views2) or len(views1) < 2:
        raise ValueError("views1 and views2 must be lists of the same length M + 1 >= 2 "
                         f"(masked views, then the full tuple); got {len(views1)} and "
                         f"{len(views2)}")
    gather = _gathering(distributed)
    offset = _offset(len(views1[0]), gather)
    # Gather every view once: the full-tuple views take part in all M + 1 terms.
    all1 = [_global(v, gather) for v in views1]
    all2 = [_global(v, gather) for v in views2]
    terms = [0.5 * (_nt_xent(views1[i], views2[-1], all1[i], all2[-1], offset, temperature)
                    + _nt_xent(views2[i], views1[-1], all2[i], all1[-1], offset, temperature))
             for i in range(len(views1))]
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


def tuple_info_nce(anchor: Tensor, positive: Tensor, disturbed: Sequence[Tensor],
                   log_weights: Sequence[float], temperature: float, *,
                   distributed: bool | None = None) -> Tensor:
    """TupleInfoNCE, one direction (anchor -> positive).

    disturbed[k][j] is tuple j with modality k taken from another tuple; log_weights[k] is
    log alpha_k. Row i scores every candidate:
        anchor_i·positive_j / tau                       for all j (target: j = i),
        anchor_i·disturbed[k]_j / tau + log alpha_k      for all k, j,
    and L = mean_i -log softmax(row i)[positive_i]. Adding log alpha_k to a logit multiplies
    that negative's exp-score by alpha_k: the exact form of drawing negatives from the mixture.
    A block with log alpha_k = -inf (alpha_k = 0) is dropped, not added as -inf, so it can
    never turn into NaN. With no disturbed sets this is one-direction InfoNCE.
    """
    if len(disturbed) != len(log_weights):
        raise ValueError(f"{len(disturbed)} disturbed sets but {len(log_weights)} log-weights")
    weights = [float(w) for w in log_weights]
    if any(math.isnan(w) or w == math.inf for w in weights):
        raise ValueError(f"log-weights must be finite or -inf, got {weights}")
    gather = _gathering(distributed)
    offset = _offset(len(anchor), gather)
    blocks = [anchor @ _global(positive, gather).T / temperature]
    for negatives, w in zip(disturbed, weights):
        if w == -math.inf:
            continue  # alpha_k = 0: these negatives are switched off
        if negatives.shape != positive.shape:
            raise ValueError(f"disturbed set of shape {tuple(negatives.shape)}, positives "
                             f"have {tuple(positive.shape)}")
        blocks.append(anchor @ _global(negatives, gather).T / temperature + w)
    logits = torch.cat(blocks, dim=1)
    return F.cross_entropy(logits, _local_targets(len(anchor), offset, anchor.device))


def sup_con(embeddings: Tensor, labels: Tensor, temperature: float, *,
            distributed: bool | None = None) -> Tensor:
    """Supervised contrastive loss L_out (Khosla et al., 2020).

    embeddings (N, V, d): V views of N samples; labels (N,). Each of the N·V views z is an
    anchor; P(z) are the other views with its label; the denominator runs over the N·V - 1
    views other than z:

        l(z) = -1/|P(z)| sum_{p in P(z)} log( exp(z·p/tau) / sum_{z' != z} exp(z·z'/tau) ),

    L = mean of l(z) over the anchors with at least one positive (with V >= 2 that is every
    anchor; an anchor without positives has no defined term). No temperature/base_temperature
    rescaling (Khosla's code multiplies by it; with their defaults the factor is 1).
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (N, V, d), got shape {tuple(embeddings.shape)}")
    n, views, dim = embeddings.shape
    labels = labels.to(embeddings.device).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    gather = _gathering(distributed)
    offset = _offset(n, gather)
    all_embeddings = _global(embeddings, gather)
    all_labels = gather_no_grad(labels) if gather else labels

    # Sample-major flattening: view v of sample i is row i*V + v, so the local rows stay
    # contiguous (starting at offset*V) among the global ones.
    anchors = embeddings.reshape(n * views, dim)
    candidates = all_embeddings.reshape(-1, dim)
    anchor_labels = labels.repeat_interleave(views)
    candidate_labels = all_labels.repeat_interleave(views)

    logits = anchors @ candidates.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(n * views, device=logits.device),
              torch.arange(offset * views, (offset + n) * views, device=logits.device)] = True
    logits = logits.masked_fill(self_mask, -math.inf)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (anchor_labels[:, None] == candidate_labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    # masked_fill before summing: the self entry is -inf and -inf * 0 would be NaN.
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1) / n_pos.clamp(min=1)

    # Normalise by the GLOBAL number of anchors with positives (known from the gathered
    # labels), scaled by N/n = W, so that the mean over ranks is the single-process loss even
    # when ranks hold different numbers of such anchors.
    _, counts = torch.unique(candidate_labels, return_counts=True)
    n_valid = int(counts[counts > 1].sum())
    if n_valid == 0:
        return per_anchor.sum() * 0.0  # no anchor has a positive: nothing to learn
    scale = len(candidates) / len(anchors)
    return per_anchor[n_pos > 0].sum() * scale / n_valid


# ------------------------------------------------------------------------------ MI bounds


def _check_scores(scores: Tensor, offset: int) -> tuple[int, int]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (R, C), got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if not 0 <= offset <= rows - cols:
        raise ValueError(f"positives at rows offset..offset+C-1 = {offset}..{offset + cols - 1} "
                         f"do not fit in {rows} rows")
    return rows, cols


def _positives(scores: Tensor, offset: int) -> Tensor:
    """s[offset + j, j] for every column j."""
    cols = torch.arange(scores.shape[1], device=scores.device)
    return scores[offset + cols, cols]


def nce_lower_bound(scores: Tensor, offset: int = 0) -> Tensor:
    """I_NCE from critic scores s[i, j] = f(x_i, y_j), x over R rows (possibly the global batch),
    y over the C local columns, the positive of column j at row offset + j:

        I_NCE = mean_j s[offset+j, j] - mean_j logsumexp_i s[i, j] + log R.

    Negatives run over x for each y, as FactorCL's code. A lower bound on I(X; Y) (at most
    log R); returns the bound, not a loss.
    """
    rows, _ = _check_scores(scores, offset)
    return (_positives(scores, offset).mean() - torch.logsumexp(scores, dim=0).mean()
            + math.log(rows))


def club_upper_bound(scores: Tensor, offset: int = 0) -> Tensor:
    """NCE-CLUB from critic scores (same layout as nce_lower_bound):

        I_CLUB = mean_j s[offset+j, j] - mean_{i,j} s[i, j],

    an upper bound on I(X; Y) when f is an InfoNCE-optimal critic (f = pmi + c(y), and c(y)
    cancels). Returns the bound, not a loss.
    """
    _check_scores(scores, offset)
    return _positives(scores, offset).mean() - scores.mean()


def _check_sampled(scores: Tensor) -> int:
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"sampled scores must be (C, 1 + K) with K >= 1, got shape "
                         f"{tuple(scores.shape)}")
    return scores.shape[1]


def nce_lower_bound_sampled(scores: Tensor) -> Tensor:
    """I_NCE from sampled critic scores: s[j, 0] = f(x_j, y_j) (the positive), s[j, 1:] =
    f(x_i, y_j) for K sampled other rows i:

        I_NCE = mean_j s[j, 0] - mean_j logsumexp_k s[j, k] + log(1 + K),

    the bound of `nce_lower_bound` with 1 + K candidates per y instead of all R (at most
    log(1 + K): biased low when I(X; Y) approaches it).
    """
    return (scores[:, 0].mean() - torch.logsumexp(scores, dim=1).mean()
            + math.log(_check_sampled(scores)))


def club_upper_bound_sampled(scores: Tensor) -> Tensor:
    """NCE-CLUB from sampled critic scores (layout of `nce_lower_bound_sampled`):
    mean_j s[j, 0] - mean_{j, k>=1} s[j, k], the product-of-marginals mean estimated from the
    K sampled pairs per y (unbiased for it; `club_upper_bound` also counts the positive in the
    mean, a difference of O(1/R))."""
    _check_sampled(scores)
    return scores[:, 0].mean() - scores[:, 1:].mean()


__all__ = ["club_upper_bound", "club_upper_bound_sampled", "comm_loss", "info_nce",
           "nce_lower_bound", "nce_lower_bound_sampled", "nt_xent", "sigmoid_pairwise",
           "sup_con", "tuple_info_nce"]
