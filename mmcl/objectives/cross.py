"""Cross (CLIP / CMC) and Cross+Self baselines (docs/methods.md, "Baselines").

Cross: symmetric InfoNCE between the embeddings of two modalities of the same tuple, averaged
over all modality pairs. By default on one augmented view (CLIP / CMC: each encoder runs once
per tuple); with `views: 2` modality a is taken from one view and b from the other (and the
reverse), at twice the encoder work. It learns only what modalities share.
Cross+Self adds, for every modality, SimCLR (NT-Xent) between its two augmentations, so it
always takes two views.
Neither trains the fusion module: the representation downstream is the concatenation of the
per-modality embeddings.
"""

from __future__ import annotations

from itertools import combinations

import torch

from mmcl.objectives.base import CrossModalObjective, LossOutput, pair_present
from mmcl.objectives.functional import info_nce, nt_xent
from mmcl.objectives.registry import register


@register
class Cross(CrossModalObjective):
    name = "cross"
    # data.missing=mask: a pair's InfoNCE runs over the tuples holding both modalities only.
    supports_missing = True

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.num_views = getattr(cfg, "views", 2)  # cross_self's config has none: two

    def cross_loss(self, z1, z2, batch=None) -> torch.Tensor:
        """Over the modality pairs (a, b): InfoNCE of a in z1 against b in z2, averaged with
        a in z2 against b in z1 when the views differ (z1 is z2: one view). With `batch`'s
        presence flags, a pair's rows lacking a or b are neither anchors nor candidates."""
        tau = self.cfg.temperature
        pairs = list(combinations(self.modalities, 2))
        ok = {(a, b): pair_present(batch, a, b) if batch is not None else None
              for a, b in pairs}
        if z1 is z2:
            return sum(info_nce(z1[a], z1[b], tau, valid=ok[a, b])
                       for a, b in pairs) / len(pairs)
        return sum(0.5 * (info_nce(z1[a], z2[b], tau, valid=ok[a, b])
                          + info_nce(z2[a], z1[b], tau, valid=ok[a, b]))
                   for a, b in pairs) / len(pairs)

    def forward(self, views, batch, generator=None):
        z = [self.project(view) for view in views]
        loss = self.cross_loss(z[0], z[-1], batch)
        return LossOutput(loss, {"cross": loss.detach()})


@register
class CrossSelf(Cross):
    name = "cross_self"
    supports_missing = False  # its SimCLR terms would contrast absent values

    def forward(self, views, batch, generator=None):
        z1, z2 = (self.project(view) for view in views)
        cross = self.cross_loss(z1, z2)
        self_terms = sum(nt_xent(z1[m], z2[m], self.cfg.temperature)
                         for m in self.modalities) / len(self.modalities)
        loss = cross + self.cfg.self_weight * self_terms
        return LossOutput(loss, {"cross": cross.detach(), "self": self_terms.detach()})
