"""SupCon (Khosla et al., 2020): the supervised reference, not self-supervised.

The fused embeddings of the two augmented views are the V = 2 views of each tuple; every view
is an anchor and its positives are all other views with the same label.
"""

from __future__ import annotations

import torch

from mmcl.objectives.base import FusedObjective, LossOutput
from mmcl.objectives.functional import sup_con
from mmcl.objectives.registry import register


@register
class SupCon(FusedObjective):
    name = "supcon"

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.label_column, _ = self.classification_label(cfg.label_column)

    def forward(self, views, batch, generator=None):
        view1, view2 = views
        z1 = self.project(self.encoder.encode(view1))
        z2 = self.project(self.encoder.encode(view2))
        loss = sup_con(torch.stack([z1, z2], dim=1), batch[self.label_column],
                       self.cfg.temperature)
        return LossOutput(loss, {})
