"""Fusion modules: one embedding per modality in, one tuple embedding (B, embed_dim) out.

Both take `keep`, the modalities a (masked) tuple holds; None keeps them all. They differ in
how a left-out modality is treated:
- ConcatFusion replaces it by a learned per-modality "missing" embedding (an MLP needs a fixed
  input size), so its output has a fixed-size input whatever is kept.
- TransformerFusion drops its token from the sequence (CoMM's masking), so the output cannot
  depend on it at all.
The order of modalities is fixed at construction; the order of names in `keep` never matters.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn


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


class ConcatFusion(nn.Module):
    """An MLP over the concatenated modality embeddings -> embed_dim."""

    def __init__(self, modalities: list[str], embed_dim: int, hidden: int):
        super().__init__()
        self.modalities = list(modalities)
        # One tensor for all modalities (not one parameter each): leaving some out still
        # gives the whole tensor a gradient, which DDP needs (zero rows for kept ones).
        self.missing = nn.Parameter(torch.randn(len(self.modalities), embed_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(len(self.modalities) * embed_dim, hidden),
                                 nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, embeddings: Mapping[str, Tensor], keep: list[str] | None = None
                ) -> Tensor:
        kept = check_keep(keep, self.modalities)
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


class TransformerFusion(nn.Module):
    """CoMM's fusion: [CLS, one token per kept modality] -> pre-LN transformer -> CLS token.

    A modality's token is its embedding plus a learned modality-type embedding (there is no
    position: the token set is unordered). Left-out modalities are dropped from the sequence,
    not masked, so the output is exactly independent of them.
    """

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

    def forward(self, embeddings: Mapping[str, Tensor], keep: list[str] | None = None
                ) -> Tensor:
        kept = check_keep(keep, self.modalities)
        index = [self.modalities.index(m) for m in kept]
        tokens = torch.stack([embeddings[m] for m in kept], dim=1)  # (B, K, d)
        tokens = tokens + self.type_embed[index].to(tokens.dtype)
        cls = self.cls.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        h = self.layers(torch.cat([cls, tokens], dim=1))
        return self.norm(h[:, 0])
