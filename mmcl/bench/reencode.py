"""The comparison baseline for TupleInfoNCE's step: what the reference code does.

hoi4d/TupleInfoNCE builds every disturbed tuple from the raw inputs (modality k taken from
another row) and runs it through the whole network: encoders, fusion and head. mmcl's
objective (mmcl.objectives.tuple_infonce) runs the encoders once per view and only the fusion
and the head again per disturbed set, which gives the same loss because every encoder maps a
row independently of the other rows (encode(x[perm]) == encode(x)[perm]).

This module exists only so `mmcl bench perf` can time both on the same weights; it draws the
same derangements from the same generator in the same order, so on the same batch and
generator state both give the same loss (the benchmark records the difference). It is not an
objective and is not registered.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcl.objectives.base import LossOutput
from mmcl.objectives.functional import tuple_info_nce
from mmcl.objectives.tuple_infonce import TupleInfoNCE, derangement


class ReencodingTupleInfoNCE(nn.Module):
    """Wraps a TupleInfoNCE objective (sharing its weights) and computes its loss the
    reference code's way. Drop-in for `Engine.model`."""

    def __init__(self, objective: TupleInfoNCE):
        super().__init__()
        if not isinstance(objective, TupleInfoNCE):
            raise TypeError(f"needs a TupleInfoNCE objective, got {type(objective).__name__}")
        self.objective = objective

    def _full(self, view) -> Tensor:
        """normalize(head(fuse(encoders(view)))): the whole network on a batch of tuples."""
        return self.objective.project(self.objective.encoder.encode(view))

    def direction(self, anchor: Tensor, positive: Tensor, key_view, generator) -> Tensor:
        active = self.objective.active_modalities()
        disturbed = []
        for modality, _ in active:
            x = key_view[modality]
            perm = derangement(x.shape[0], generator, x.device)
            disturbed.append(self._full({**key_view, modality: x[perm]}))
        return tuple_info_nce(anchor, positive, disturbed, [w for _, w in active],
                              self.objective.cfg.temperature)

    def forward(self, view1, view2, batch, generator: torch.Generator | None = None
                ) -> LossOutput:
        z1, z2 = self._full(view1), self._full(view2)
        loss = self.direction(z1, z2, view2, generator)
        if self.objective.cfg.symmetric:
            loss = 0.5 * (loss + self.direction(z2, z1, view1, generator))
        return LossOutput(loss, {})


# --------------------------------------------------------------- proposed faster variants
#
# At the default model sizes the transformer fusion, not the encoders, is most of a step, and
# TupleInfoNCE re-runs it for every disturbed set. Two changes, measured by `mmcl bench perf`
# as proposals for mmcl.objectives.tuple_infonce and mmcl.models.fusion (same loss, same
# gradients; tested in tests/test_bench.py):
#   batched_disturbed  all disturbed sets of a direction go through fusion + head in one call
#                      (M x B rows) instead of M calls of B rows: fewer, larger kernels;
#   cls_only_fusion    the last transformer layer computes only the CLS token (its query, the
#                      residual and the feed-forward), the only token the fusion returns.


def cls_only_forward(fusion, embeddings, keep=None) -> Tensor:
    """TransformerFusion.forward with the last layer computed for the CLS token only (pre-LN:
    x_cls + attn(LN(x)_cls, LN(x), LN(x)), then + FF(LN(.)): the same output)."""
    from mmcl.models.fusion import check_keep

    kept = check_keep(keep, fusion.modalities)
    index = [fusion.modalities.index(m) for m in kept]
    tokens = torch.stack([embeddings[m] for m in kept], dim=1)
    tokens = tokens + fusion.type_embed[index].to(tokens.dtype)
    cls = fusion.cls.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    layers = fusion.layers.layers
    for layer in layers[:-1]:
        x = layer(x)
    last = layers[-1]
    if not last.norm_first:
        raise ValueError("cls_only_forward supports pre-LN layers only")
    h = last.norm1(x)
    attn = last.self_attn(h[:, :1], h, h, need_weights=False)[0]
    y = x[:, :1] + last.dropout1(attn)
    y = y + last._ff_block(last.norm2(y))
    return fusion.norm(y[:, 0])


def use_cls_only_fusion(objective) -> None:
    """Swap the objective's transformer fusion's forward for `cls_only_forward`."""
    from mmcl.models.fusion import TransformerFusion

    fusion = objective.encoder.fusion
    if isinstance(fusion, TransformerFusion):
        fusion.forward = lambda embeddings, keep=None: cls_only_forward(fusion, embeddings, keep)


class BatchedTupleInfoNCE(nn.Module):
    """Wraps a TupleInfoNCE objective (sharing its weights): the same loss, with every
    disturbed set of a direction fused and projected in one call. Same derangements from the
    same generator in the same order as mmcl's objective."""

    def __init__(self, objective: TupleInfoNCE):
        super().__init__()
        if not isinstance(objective, TupleInfoNCE):
            raise TypeError(f"needs a TupleInfoNCE objective, got {type(objective).__name__}")
        self.objective = objective

    def direction(self, anchor: Tensor, positive: Tensor, key_embeddings, generator) -> Tensor:
        active = self.objective.active_modalities()
        if not active:
            return tuple_info_nce(anchor, positive, [], [], self.objective.cfg.temperature)
        n = positive.shape[0]
        stacked = {m: [] for m in key_embeddings}
        for modality, _ in active:
            e = key_embeddings[modality]
            perm = derangement(n, generator, e.device)
            for m, v in key_embeddings.items():
                stacked[m].append(v[perm] if m == modality else v)
        z = self.objective.project({m: torch.cat(v) for m, v in stacked.items()})
        return tuple_info_nce(anchor, positive, list(z.split(n)), [w for _, w in active],
                              self.objective.cfg.temperature)

    def forward(self, view1, view2, batch, generator: torch.Generator | None = None
                ) -> LossOutput:
        obj = self.objective
        e1, e2 = obj.encoder.encode(view1), obj.encoder.encode(view2)
        z1, z2 = obj.project(e1), obj.project(e2)
        loss = self.direction(z1, z2, e2, generator)
        if obj.cfg.symmetric:
            loss = 0.5 * (loss + self.direction(z2, z1, e1, generator))
        return LossOutput(loss, {})
