"""Gathering embeddings across data-parallel ranks, for contrastive losses with global negatives.

Convention ("local loss", as open_clip): rank r holds n local rows of a global batch of
N = W * n rows (W ranks, rows of rank r at global positions r*n .. r*n + n - 1). Its loss L_r is
the mean over its LOCAL anchors, each scored against the GLOBAL (gathered) candidates. Then

    L = (1/W) * sum_r L_r            (the single-process loss on the concatenated batch).

Gradients. `gather_with_grad` uses torch's functional collective `all_gather_single`
(torch.distributed._functional_collectives, the replacement torch names for the deprecated
torch.distributed.nn.functional.all_gather), whose backward is a reduce-scatter that SUMS over
ranks the gradients that every rank's loss sends to each gathered piece, and returns
to rank r the sum for its own piece. Rank r's local rows x_r therefore receive

    g_r = sum_r' dL_r'/dx_r = d(sum_r' L_r')/dx_r = W * dL/dx_r,

i.e. W times the single-process gradient of those rows. Backpropagating g_r into the
(replicated) parameters and letting DDP AVERAGE over the W ranks gives
(1/W) * sum_r (dx_r/dθ)^T W dL/dx_r = dL/dθ: exactly the single-process parameter gradient.
(This needs every rank to run the same backward: the all_gather backward is a collective.)

Memory is linear in the local batch: each rank builds n x N logits, never N x N.
All ranks must hold the same number of rows (all_gather needs equal shapes; the data pipeline
drops ragged last batches so this holds). Nothing here imports Ray.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """cat([x of rank 0, ..., x of rank W-1], dim 0), differentiable.

    Backward: rank r's x receives the sum over all ranks of the gradient sent to its piece
    (see the module docstring for why that makes DDP's averaged gradient exact). Every rank
    must pass a tensor of the same shape. Identity in a single process.
    """
    _, world_size = world()
    if world_size == 1:
        return x
    # Imported here: functional collectives load torch's c10d ops, which not every build has.
    from torch.distributed import _functional_collectives as funcol

    gathered = funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    # The result may be an AsyncCollectiveTensor; waiting here keeps the collective's cost
    # where it is incurred, as the old blocking all_gather did.
    return funcol.wait_tensor(gathered) if isinstance(gathered, funcol.AsyncCollectiveTensor) \
        else gathered


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """cat over ranks along dim 0 without autograd (labels, indices). Identity in one process."""
    _, world_size = world()
    if world_size == 1:
        return x
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(pieces, x)
    return torch.cat(pieces, dim=0)


def local_offset(n_local: int) -> int:
    """Global index of this rank's first row: rank * n_local (equal local batch sizes)."""
    rank, _ = world()
    return rank * n_local
