"""The comparison baseline for TupleInfoNCE's step: what the reference code does.

hoi4d/TupleInfoNCE builds every disturbed tuple from the raw inputs (modality k taken from
another row) and runs it through the whole network: encoders, fusion and head. mmcl's
objective (mmcl.objectives.tuple_infonce) runs the encoders once per view and, per disturbed
tuple, only what its swapped token changes (MultimodalEncoder.fuse_swapped), which gives the
same loss because every encoder maps a row independently of the other rows
(encode(x[perm]) == encode(x)[perm]) and the fusion's first layer acts per token.

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

    def forward(self, views, batch, generator: torch.Generator | None = None) -> LossOutput:
        view1, view2 = views
        z1, z2 = self._full(view1), self._full(view2)
        loss = self.direction(z1, z2, view2, generator)
        if self.objective.cfg.symmetric:
            loss = 0.5 * (loss + self.direction(z2, z1, view1, generator))
        return LossOutput(loss, {})
