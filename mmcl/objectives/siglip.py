"""SigLIP (Zhai et al., ICCV 2023; docs/methods.md, "Baselines").

The pairwise sigmoid loss between the embeddings of two modalities of the same tuple: every
pair (x_i, y_j) is scored on its own, z_ij = t x_i·y_j + b, as a binary problem (+1 for the
same tuple, -1 otherwise), with no softmax over the batch. The temperature t = exp(t') and the
bias b are learnt, from the paper's t' = log 10, b = -10 (the bias offsets the N - 1 negatives
per anchor at the start). With more than two modalities the loss is averaged over the modality
pairs, one t' and one b shared by all pairs. One augmented view (CLIP's work per step), no
fusion module: the representation downstream is the concatenation of the per-modality
embeddings, as `cross`; for retrieval, ranking by the projections' dot product is ranking by
z_ij (t > 0 and b scale and shift every score alike).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
from torch import nn

from mmcl.objectives.base import CrossModalObjective, LossOutput, pair_present
from mmcl.objectives.functional import sigmoid_pairwise
from mmcl.objectives.registry import register


@register
class SigLIP(CrossModalObjective):
    name = "siglip"
    # data.missing=mask: a pair's loss runs over the tuples holding both modalities only.
    supports_missing = True
    num_views = 1

    def __init__(self, cfg, manifest, model_cfg):
        super().__init__(cfg, manifest, model_cfg)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))
        self.bias = nn.Parameter(torch.tensor(float(cfg.bias_init)))

    def forward(self, views, batch, generator=None):
        z = self.project(views[0])
        pairs = list(combinations(self.modalities, 2))
        loss = sum(sigmoid_pairwise(z[a], z[b], self.log_temperature, self.bias,
                                    valid=pair_present(batch, a, b))
                   for a, b in pairs) / len(pairs)
        return LossOutput(loss, {"siglip": loss.detach(),
                                 "temperature": self.log_temperature.detach().exp(),
                                 "bias": self.bias.detach().clone()})
