"""Projection heads: map an embedding into the space where a contrastive loss is computed."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear.

    No BatchNorm (SimCLR's and CoMM's heads use it): under DDP each worker would normalise with
    its own batch statistics, and the small per-worker batches of local runs make those
    statistics noisy; a plain MLP behaves the same for any number of workers.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
