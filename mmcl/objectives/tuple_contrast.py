"""Tuple: plain tuple contrast (docs/methods.md, "Baselines").

InfoNCE between the fused tuple embeddings of two augmented views, in both directions
(CLIP-style) or from view 1 to view 2 only. TupleInfoNCE with every disturbed-negative weight
switched off reduces exactly to this (tests hold both to it).
"""

from __future__ import annotations

from mmcl.objectives.base import FusedObjective, LossOutput
from mmcl.objectives.functional import info_nce, tuple_info_nce
from mmcl.objectives.registry import register


@register
class TupleContrast(FusedObjective):
    name = "tuple"

    def forward(self, views, batch, generator=None):
        view1, view2 = views
        z1 = self.project(self.encoder.encode(view1))
        z2 = self.project(self.encoder.encode(view2))
        tau = self.cfg.temperature
        if self.cfg.symmetric:
            loss = info_nce(z1, z2, tau)
        else:  # one direction, no disturbed negatives
            loss = tuple_info_nce(z1, z2, [], [], tau)
        return LossOutput(loss, {})
