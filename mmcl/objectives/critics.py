"""Critics f(x, y) for FactorCL's mutual-information bounds.

Each critic has two methods:
- `critic(x, y)` -> (N,) scores f(x_i, y_i) of aligned pairs;
- `critic.pair_scores(x, y)` -> (Nx, Ny) with s[i, j] = f(x_i, y_j), every pair, computed
  without materialising the Nx * Ny concatenations;
- `critic.sampled_scores(x, y, rows)` -> (Ny, K) with s[j, k] = f(x_{rows[j, k]}, y_j): only
  the K pairs per y that `rows` names (FactorCL's sampled negatives: O(Ny K), not O(Nx Ny)).
ConcatCritic's all-pairs scores can run in chunks of y columns (`chunk`), each chunk
recomputed in the backward pass (activation checkpointing), so their peak memory is one
chunk's Nx x chunk x hidden activations instead of all Nx x Ny.

`pair_scores` reads the parameters through the module's attributes on every call, so
torch.func.functional_call can swap in detached copies (FactorCL's frozen CLUB critics do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear(in, hidden), ReLU, [Linear(hidden, hidden), ReLU] * (layers - 1),
    Linear(hidden, out)."""
    if layers < 1:
        raise ValueError(f"an MLP critic needs at least 1 hidden layer, got {layers}")
    modules: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        modules += [nn.Linear(hidden, hidden), nn.ReLU()]
    modules.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*modules)


class ConcatCritic(nn.Module):
    """f(x, y) = MLP([x, y]) -> scalar, FactorCL's critic (layers=2: in-512-512-1 there).

    All pairs: the first layer is affine in the concatenation, W[x; y] + c = W_x x + W_y y + c,
    so it is evaluated on the Nx rows of x and the Ny rows of y separately and broadcast to
    (Nx, Ny, hidden); only the remaining layers run per pair. Tiling (FactorCL's code) would
    also build Nx * Ny copies of the (x_dim + y_dim)-wide input and multiply each by W.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int, layers: int = 2, chunk: int = 0):
        super().__init__()
        self.x_dim, self.y_dim = x_dim, y_dim
        self.chunk = chunk  # y columns per chunk of pair_scores; 0 = all at once
        self.net = mlp(x_dim + y_dim, hidden, 1, layers)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([x, y], dim=-1)).squeeze(-1)

    def first_layer(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """W_x x + c (Nx, hidden) and W_y y (Ny, hidden): the first layer, split by side (the
        bias counted once, on the x side)."""
        first = self.net[0]
        w_x, w_y = first.weight[:, :self.x_dim], first.weight[:, self.x_dim:]
        return F.linear(x, w_x, first.bias), F.linear(y, w_y)

    def pair_scores(self, x: Tensor, y: Tensor) -> Tensor:
        hx, hy = self.first_layer(x, y)
        if not self.chunk or self.chunk >= len(y):
            return self._rest(hx, hy)
        parts = []
        for part in hy.split(self.chunk):
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._rest, hx, part, use_reentrant=False))
            else:
                parts.append(self._rest(hx, part))
        return torch.cat(parts, dim=1)

    def _rest(self, hx: Tensor, hy: Tensor) -> Tensor:
        h = hx[:, None, :] + hy[None, :, :]  # (Nx, Ny, hidden) = first layer on every [x_i, y_j]
        return self.net[1:](h).squeeze(-1)

    def sampled_scores(self, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        hx, hy = self.first_layer(x, y)
        h = hx[rows] + hy[:, None, :]  # (Ny, K, hidden)
        return self.net[1:](h).squeeze(-1)


class SeparableCritic(nn.Module):
    """f(x, y) = g(x)·h(y) with two MLPs into an embed_dim space: all pairs are one matmul."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int, embed_dim: int = 128,
                 layers: int = 2):
        super().__init__()
        self.g = mlp(x_dim, hidden, embed_dim, layers)
        self.h = mlp(y_dim, hidden, embed_dim, layers)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (self.g(x) * self.h(y)).sum(dim=-1)

    def pair_scores(self, x: Tensor, y: Tensor) -> Tensor:
        return self.g(x) @ self.h(y).T

    def sampled_scores(self, x: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        return torch.einsum("jkd,jd->jk", self.g(x)[rows], self.h(y))


def sample_rows(n_rows: int, offset: int, n_cols: int, k: int,
                generator: torch.Generator | None = None) -> Tensor:
    """(n_cols, 1 + k) rows of x for each column j: its positive offset + j first, then k
    distinct other rows. The k row offsets 1..n_rows-1 are drawn without replacement once per
    call and shared by the columns (row (offset + j + o) mod n_rows), so each column's
    negatives are distinct, never its positive, and each uniform over the other rows."""
    if not 1 <= k <= n_rows - 1:
        raise ValueError(f"k must be in 1..{n_rows - 1} (rows other than the positive), got {k}")
    device = generator.device if generator is not None else "cpu"
    shifts = torch.randperm(n_rows - 1, generator=generator, device=device)[:k] + 1
    positive = torch.arange(offset, offset + n_cols, device=device)
    rows = (positive[:, None] + torch.cat([shifts.new_zeros(1), shifts])[None, :]) % n_rows
    return rows


__all__ = ["ConcatCritic", "SeparableCritic", "mlp", "sample_rows"]
