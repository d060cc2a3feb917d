"""Fusion modules: one embedding per modality in, one tuple embedding (B, embed_dim) out.

`fusion(embeddings, keep=None, present=None)`:
- `keep`, the modalities a (masked) tuple holds; None keeps them all.
- `present`, modality -> bool (B,): which rows actually have that modality (real data with
  missing modalities); None, or a modality it does not name, means present in every row.
  Only a fusion with `supports_missing = True` can treat an absent row exactly.

How a left-out modality is treated:
- ConcatFusion / LinearFusion replace it by a learned per-modality "missing" embedding (an MLP
  needs a fixed input size). They cannot tell "absent in this row" from a real value, so they
  refuse `present` masks with absent rows (`supports_missing = False`).
- TransformerFusion drops its token from the sequence (CoMM's masking), so the output cannot
  depend on it at all; an absent row's token is key-padded out of the attention, which is
  exactly the same as dropping it for that row.
The order of modalities is fixed at construction; the order of names in `keep` never matters.

`fuse_swapped(embeddings, swaps, present)` fuses several "swapped" tuple sets at once, set p
being the tuples with modality swaps[p][0] taken from rows swaps[p][1] (TupleInfoNCE's
disturbed negatives). It equals fusing each set's embeddings from scratch; TransformerFusion
computes only what the swap changes (see its docstring).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Swap = tuple[str, Tensor]  # (modality, row index (B,)): that modality taken from those rows


def check_keep(keep: Iterable[str] | str | None, modalities: list[str]) -> list[str]:
    """The kept modalities in the fixed modality order; ValueError for an empty `keep` or an
    unknown name. A single string is read as one modality name, not as its characters."""
    if keep is None:
        return list(modalities)
    names = [keep] if isinstance(keep, str) else list(keep)
    if not names:
        raise ValueError(f"keep is empty: a tuple needs at least one modality; known "
                         f"modalities: {modalities}")
    unknown = sorted(set(names) - set(modalities))
    if unknown:
        raise ValueError(f"keep names unknown modalities {unknown}; known modalities: "
                         f"{modalities}")
    return [m for m in modalities if m in names]


def swapped_embeddings(embeddings: Mapping[str, Tensor], swaps: Sequence[Swap]
                       ) -> dict[str, Tensor]:
    """All swapped sets stacked along the batch: row p*B + i is tuple i of set p."""
    return {m: torch.cat([e[rows] if m == modality else e for modality, rows in swaps])
            for m, e in embeddings.items()}


def swapped_present(present: Mapping[str, Tensor] | None, swaps: Sequence[Swap]
                    ) -> dict[str, Tensor] | None:
    """`present` of the stacked swapped sets: a swapped-in modality brings its row's presence."""
    return None if not present else swapped_embeddings(present, swaps)


class ConcatFusion(nn.Module):
    """An MLP over the concatenated modality embeddings -> embed_dim."""

    supports_missing = False

    def __init__(self, modalities: list[str], embed_dim: int, hidden: int):
        super().__init__()
        self.modalities = list(modalities)
        # One tensor for all modalities (not one parameter each): leaving some out still
        # gives the whole tensor a gradient, which DDP needs (zero rows for kept ones).
        self.missing = nn.Parameter(torch.randn(len(self.modalities), embed_dim) * 0.02)
        self.mlp = self.build_mlp(len(self.modalities) * embed_dim, hidden, embed_dim)

    def build_mlp(self, in_dim: int, hidden: int, out_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, embeddings: Mapping[str, Tensor], keep: list[str] | None = None,
                present: Mapping[str, Tensor] | None = None) -> Tensor:
        kept = check_keep(keep, self.modalities)
        refuse_absent_rows(self, present, kept)
        ref = embeddings[kept[0]]
        parts = [embeddings[m] if m in kept
                 else self.missing[i].to(ref.dtype).expand(ref.shape[0], -1)
                 for i, m in enumerate(self.modalities)]
        out = self.mlp(torch.cat(parts, dim=-1))
        if len(kept) == len(self.modalities):
            # Objectives that always fuse full tuples never use `missing`; DDP without
            # find_unused_parameters then fails. A zero-valued term gives it a (zero) gradient.
            out = out + 0.0 * self.missing.sum()
        return out

    def fuse_swapped(self, embeddings: Mapping[str, Tensor], swaps: Sequence[Swap],
                     present: Mapping[str, Tensor] | None = None) -> Tensor:
        return self(swapped_embeddings(embeddings, swaps), None, swapped_present(present, swaps))


class LinearFusion(ConcatFusion):
    """One Linear layer over the concatenated modality embeddings (CoMM's fusion ablation);
    left-out modalities take the learned "missing" embedding as in ConcatFusion."""

    def build_mlp(self, in_dim: int, hidden: int, out_dim: int) -> nn.Module:
        return nn.Linear(in_dim, out_dim)


def refuse_absent_rows(fusion: nn.Module, present: Mapping[str, Tensor] | None,
                       kept: list[str]) -> None:
    """ValueError when a fusion without `supports_missing` is given absent rows."""
    if not present or fusion.supports_missing:
        return
    absent = [m for m in kept if m in present and not bool(present[m].all())]
    if absent:
        raise ValueError(f"{type(fusion).__name__} cannot treat missing modalities exactly "
                         f"(rows without {absent}); use model.fusion=transformer")


class TransformerFusion(nn.Module):
    """CoMM's fusion: [CLS, one token per kept modality] -> pre-LN transformer -> CLS token.

    A modality's token is its embedding plus a learned modality-type embedding (there is no
    position: the token set is unordered). Left-out modalities are dropped from the sequence,
    not masked, so the output is exactly independent of them; absent rows (`present`) are
    key-padded out of every attention (their values are also zeroed, so that not even a NaN
    in an absent row reaches the output).

    Only the CLS token leaves the fusion, so the last layer computes the CLS row only (its
    query's attention over all keys, output projection and feed-forward): the same output
    for a fraction of the work. The parameters are those of nn.TransformerEncoder (the
    checkpoint layout is unchanged); the layers are evaluated by `_attend` / `_finish` below.

    `fuse_swapped`: a tuple with modality k swapped in from row perm[i] differs from tuple i
    only in token k. The first layer's LayerNorm and Q/K/V projections act per token, so the
    swapped set's queries, keys and values are the original ones with token k's rows taken
    from perm: they are computed once for the batch, gathered per set, and only the attention
    (CLS query only, for a 1-layer fusion), output projection and feed-forward run per set.
    """

    supports_missing = True

    def __init__(self, modalities: list[str], embed_dim: int, layers: int, heads: int,
                 dropout: float = 0.0):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by heads={heads}")
        self.modalities = list(modalities)
        self.cls = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        # One tensor, indexed per kept modality, so DDP always sees it used (see ConcatFusion).
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities), embed_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim, heads, dim_feedforward=4 * embed_dim, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True)
        # Nested tensors only help with padding masks, which dropped tokens never need.
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)  # pre-LN leaves the residual stream un-normalised

    # -- the sequence
    def _sequence(self, embeddings: Mapping[str, Tensor], kept: list[str],
                  present: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor | None]:
        """x = [CLS, tokens] (B, 1+K, d) and allowed (B, 1+K) bool (True = attend; None = all)."""
        index = [self.modalities.index(m) for m in kept]
        tokens = torch.stack([embeddings[m] for m in kept], dim=1)  # (B, K, d)
        tokens = tokens + self.type_embed[index].to(tokens.dtype)
        b = tokens.shape[0]
        allowed = None
        if present and any(m in present for m in kept):
            flags = [present[m].to(torch.bool).reshape(b) if m in present
                     else torch.ones(b, dtype=torch.bool, device=tokens.device) for m in kept]
            keep_rows = torch.stack(flags, dim=1)  # (B, K)
            tokens = tokens.masked_fill(~keep_rows[..., None], 0.0)
            allowed = torch.cat([keep_rows.new_ones(b, 1), keep_rows], dim=1)
        cls = self.cls.to(tokens.dtype).expand(b, -1, -1)
        return torch.cat([cls, tokens], dim=1), allowed

    def forward(self, embeddings: Mapping[str, Tensor], keep: list[str] | None = None,
                present: Mapping[str, Tensor] | None = None) -> Tensor:
        x, allowed = self._sequence(embeddings, check_keep(keep, self.modalities), present)
        return self._run(x, allowed, list(self.layers.layers))

    def fuse_swapped(self, embeddings: Mapping[str, Tensor], swaps: Sequence[Swap],
                     present: Mapping[str, Tensor] | None = None) -> Tensor:
        """(len(swaps) * B, d): row p*B + i is the fused tuple i with modality swaps[p][0]
        taken from row swaps[p][1][i]; equal to `self(swapped_embeddings(...))`."""
        x, allowed = self._sequence(embeddings, self.modalities, present)
        b, t = x.shape[:2]
        # source[p*B + i, j]: the row whose token j set p's tuple i holds (CLS: its own).
        source = torch.arange(b, device=x.device).repeat(len(swaps), 1)  # (P, B)
        source = source[:, :, None].expand(-1, -1, t).clone()
        for p, (modality, rows) in enumerate(swaps):
            source[p, :, 1 + self.modalities.index(modality)] = rows.to(x.device)
        source = source.reshape(-1, t)
        columns = torch.arange(t, device=x.device)
        first, *rest = self.layers.layers
        q, k, v = _qkv(first, x)
        gather = lambda a: a[source, columns]  # noqa: E731 - (P*B, T, d) from (B, T, d)
        allowed_s = None if allowed is None else gather(allowed)
        if not rest:  # the first layer is the last: only the CLS row is needed
            rows = source[:, 0]
            y = _finish(first, x[rows, :1], _attend(first, q[rows, :1], gather(k), gather(v),
                                                    allowed_s))
            return self.norm(y[:, 0])
        h = _finish(first, gather(x), _attend(first, gather(q), gather(k), gather(v),
                                              allowed_s))
        return self._run(h, allowed_s, rest)

    def _run(self, x: Tensor, allowed: Tensor | None, layers: list[nn.Module]) -> Tensor:
        """The given layers on x, the last one for the CLS row only; normalised CLS out."""
        *full, last = layers
        for layer in full:
            q, k, v = _qkv(layer, x)
            x = _finish(layer, x, _attend(layer, q, k, v, allowed))
        q, k, v = _qkv(last, x)
        y = _finish(last, x[:, :1], _attend(last, q[:, :1], k, v, allowed))
        return self.norm(y[:, 0])


# -- one pre-LN nn.TransformerEncoderLayer, evaluated piecewise with its own parameters


def _qkv(layer: nn.TransformerEncoderLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of every token of x (B, T, d), from LN1(x)."""
    attn = layer.self_attn
    return F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)


def _attend(layer: nn.TransformerEncoderLayer, q: Tensor, k: Tensor, v: Tensor,
            allowed: Tensor | None) -> Tensor:
    """Multi-head attention of q (B, Tq, d) over k, v (B, T, d), then the output projection.
    allowed (B, T): False keys get weight exactly 0 (-inf logits)."""
    attn = layer.self_attn
    b, tq, d = q.shape
    heads = attn.num_heads
    split = lambda a: a.reshape(b, a.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)  # (B, h, Tq, T)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None, None, :], -math.inf)
    weights = F.dropout(logits.softmax(dim=-1), attn.dropout, layer.training)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, tq, d)
    return attn.out_proj(out)


def _finish(layer: nn.TransformerEncoderLayer, x: Tensor, attended: Tensor) -> Tensor:
    """Residual, then the pre-LN feed-forward block, for the rows of x that were queried."""
    y = x + layer.dropout1(attended)
    return y + layer._ff_block(layer.norm2(y))


__all__ = ["ConcatFusion", "LinearFusion", "Swap", "TransformerFusion", "check_keep",
           "swapped_embeddings"]
