"""CoMM (Dufumier et al., ICLR 2025; docs/methods.md, "CoMM").

Two multimodal augmentations give views X', X''; X_i keeps only modality i (the others'
tokens are dropped from the fusion sequence). One network maps a (masked) tuple to one
embedding, and
    L = -I_NCE(Z', Z'') + sum_i L_i,   L_i = -1/2 [ I_NCE(Z_i, Z') + I_NCE(Z_i, Z'') ].
The first term captures redundancy, uniqueness and synergy; each L_i the redundancy and the
uniqueness of modality i. Each term is SimCLR's NT-Xent. By default the masked embeddings
come from the augmented views and the terms are averaged (CoMM's code); `masked_from:
original` takes them from the un-augmented tuple and `reduction: sum` sums (its paper).
"""

from __future__ import annotations

import torch

from mmcl.objectives.base import FusedObjective, LossOutput
from mmcl.objectives.functional import comm_loss
from mmcl.objectives.registry import register


@register
class CoMM(FusedObjective):
    name = "comm"
    # Its single-modality views of a tuple lacking that modality hold no modality at all.
    supports_missing = False

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.require_modalities(at_least=2)

    def views(self, full_embeddings, masked_embeddings):
        """[Z_1, ..., Z_M, Z]: one embedding per single-modality mask, then the full tuple."""
        masked = [self.project(masked_embeddings, [m]) for m in self.modalities]
        return masked + [self.project(full_embeddings)]

    def forward(self, views, batch, generator=None):
        view1, view2 = views
        e1, e2 = self.encoder.encode(view1), self.encoder.encode(view2)
        if self.cfg.masked_from == "original":
            e0 = self.encoder.encode(batch)
            views1, views2 = self.views(e1, e0), self.views(e2, e0)
        else:
            views1, views2 = self.views(e1, e1), self.views(e2, e2)
        loss = comm_loss(views1, views2, self.cfg.temperature, reduction=self.cfg.reduction)
        return LossOutput(loss, {})

    @torch.no_grad()
    def shared_embeddings(self, batch):
        """Z_i: the tuple with only modality i kept, fused and projected (the L_i terms put
        every Z_i in the space of Z)."""
        encoded = self.encoder.encode(batch)
        return {m: self.project(encoded, [m]) for m in self.modalities}
