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
from torch import nn

from mmcl.models import ProjectionHead
from mmcl.objectives.base import LossOutput, Objective, normalize
from mmcl.objectives.functional import info_nce, nt_xent
from mmcl.objectives.registry import register


@register
class Cross(Objective):
    name = "cross"
    has_unused_parameters = True  # the fusion module is never used

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.require_modalities(at_least=2)
        self.num_views = getattr(cfg, "views", 2)
        d = model_cfg.embed_dim
        self.heads = nn.ModuleDict({
            m: ProjectionHead(d, model_cfg.proj_hidden, model_cfg.proj_dim)
            for m in self.modalities})

    def project(self, view) -> dict[str, torch.Tensor]:
        embeddings = self.encoder.encode(view)
        return {m: normalize(self.heads[m](e)) for m, e in embeddings.items()}

    def cross_loss(self, z1, z2) -> torch.Tensor:
        """Over the modality pairs (a, b): InfoNCE of a in z1 against b in z2, averaged with
        a in z2 against b in z1 when the views differ (z1 is z2: one view)."""
        tau = self.cfg.temperature
        pairs = list(combinations(self.modalities, 2))
        if z1 is z2:
            return sum(info_nce(z1[a], z1[b], tau) for a, b in pairs) / len(pairs)
        return sum(0.5 * (info_nce(z1[a], z2[b], tau) + info_nce(z2[a], z1[b], tau))
                   for a, b in pairs) / len(pairs)

    def forward(self, views, batch, generator=None):
        z = [self.project(view) for view in views]
        loss = self.cross_loss(z[0], z[-1])
        return LossOutput(loss, {"cross": loss.detach()})

    @torch.no_grad()
    def embed(self, batch):
        return torch.cat(list(self.encoder.encode(batch).values()), dim=-1)

    @torch.no_grad()
    def shared_embeddings(self, batch):
        """Each modality through its own head, normalised: the space of the InfoNCE."""
        return self.project(batch)


@register
class CrossSelf(Cross):
    name = "cross_self"

    def forward(self, views, batch, generator=None):
        z1, z2 = (self.project(view) for view in views)
        cross = self.cross_loss(z1, z2)
        self_terms = sum(nt_xent(z1[m], z2[m], self.cfg.temperature)
                         for m in self.modalities) / len(self.modalities)
        loss = cross + self.cfg.self_weight * self_terms
        return LossOutput(loss, {"cross": cross.detach(), "self": self_terms.detach()})
