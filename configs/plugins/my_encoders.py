"""An example plug-in encoder for configs/custom_encoder.yaml.

Any importable class works the same way: a timm model, an open_clip tower or your own
module, wrapped so that it takes (spec, cfg, embed_dim) and returns (B, embed_dim).
"""

import torch
from torch import nn

import mmcl.models


@mmcl.models.register_encoder("gated_mlp", fits=["vector"])  # also usable as kind: gated_mlp
class GatedMLP(nn.Module):
    """`options.gates` parallel MLP branches mixed by a learned softmax gate per sample."""

    def __init__(self, spec, cfg, embed_dim):
        super().__init__()
        gates = int(cfg.options.get("gates", 2))
        width = spec.shape[0]
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(width, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, embed_dim))
            for _ in range(gates))
        self.gate = nn.Linear(width, gates)

    def forward(self, x, mask=None):  # vectors carry no padding mask
        weights = self.gate(x).softmax(dim=-1)                     # (B, gates)
        outs = torch.stack([b(x) for b in self.branches], dim=1)   # (B, gates, embed_dim)
        return (weights.unsqueeze(-1) * outs).sum(dim=1)
