"""Two gloo processes, each with half the batch, against one process with the whole batch.

Expected relation (mmcl/objectives/distributed.py): rank r's loss L_r is the mean over its
local anchors against the global candidates, so
    mean_r L_r = L                                  (the single-process loss);
all_gather's backward sums over ranks the gradients sent to each rank's piece, so rank r's
local inputs x_r receive
    sum_r' dL_r'/dx_r = W * dL/dx_r                 (W = world size);
and the replicated parameters' gradients, averaged over ranks as DDP does, are dL/dθ exactly.

The process group is spawned ONCE for the module: both ranks run every case and save their
results, which the tests then compare with a single-process run of the same cases.
"""

import math
import socket
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmcl.objectives.critics import ConcatCritic
from mmcl.objectives.distributed import gather_no_grad, gather_with_grad, local_offset, world
from mmcl.objectives.functional import (club_upper_bound, comm_loss, info_nce,
                                        nce_lower_bound, nt_xent, sigmoid_pairwise, sup_con,
                                        tuple_info_nce)

WORLD, N, D_IN, D, TAU = 2, 8, 5, 4, 0.2
INPUTS = ("a", "b", "c", "d", "e", "f")
LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 1])
# With one view only label-0 anchors have a positive: rank 0 holds two, rank 1 one, so the
# ranks' losses must be normalised by the global count for their mean to be the global loss.
SPARSE_LABELS = torch.tensor([0, 0, 1, 2, 0, 3, 4, 5])



def _sup_con_two_views(z, labels):
    return sup_con(torch.stack([z["a"], z["b"]], dim=1), labels, TAU)


def _critic_bound(bound, sign):
    def case(z, labels, critic):
        # As FactorCL's `scores`: x gathered (with grad), y local, positives at the offset.
        s = critic.pair_scores(gather_with_grad(z["a"]), z["b"]) / TAU
        return sign * bound(s, offset=local_offset(len(z["b"])))
    return case


CASES = {
    "info_nce": lambda z, lab, _: info_nce(z["a"], z["b"], TAU),
    # data.missing=mask: rows whose label is 0 lack a side (rank 0 keeps 2 rows, rank 1 3)
    "info_nce_masked": lambda z, lab, _: info_nce(z["a"], z["b"], TAU, valid=lab != 0),
    "nt_xent": lambda z, lab, _: nt_xent(z["a"], z["b"], TAU),
    "tuple_info_nce": lambda z, lab, _: tuple_info_nce(
        z["a"], z["b"], [z["c"], z["d"], z["e"]], [0.0, -math.inf, math.log(2.0)], TAU),
    "tuple_info_nce_plain": lambda z, lab, _: tuple_info_nce(z["a"], z["b"], [], [], TAU),
    "comm_mean": lambda z, lab, _: comm_loss([z["a"], z["b"], z["c"]],
                                             [z["d"], z["e"], z["f"]], TAU),
    "comm_sum": lambda z, lab, _: comm_loss([z["a"], z["b"], z["c"]],
                                            [z["d"], z["e"], z["f"]], TAU, reduction="sum"),
    "sup_con": lambda z, lab, _: _sup_con_two_views(z, lab),
    "sup_con_one_view": lambda z, lab, _: sup_con(z["a"][:, None], lab, TAU),
    # SigLIP: t' and b are replicated parameters (on the critic module, so that their
    # DDP-averaged gradients are compared with the others)
    "siglip": lambda z, lab, critic: sigmoid_pairwise(z["a"], z["b"], *critic.siglip),
    "siglip_masked": lambda z, lab, critic: sigmoid_pairwise(
        z["a"], z["b"], *critic.siglip, valid=lab != 0),
    "nce_critic": _critic_bound(nce_lower_bound, -1.0),
    "club_critic": _critic_bound(club_upper_bound, 1.0),
}


def run_cases(rank: int, world_size: int) -> dict:
    """Every case on this rank's rows: loss, grads of the raw local inputs, and the parameter
    grads averaged over ranks (what DDP hands the optimiser)."""
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(N, D_IN, generator=g, dtype=torch.float64) for k in INPUTS}
    rows = slice(rank * N // world_size, (rank + 1) * N // world_size)
    torch.manual_seed(0)  # the same replicated parameters on every rank
    net = torch.nn.Linear(D_IN, D).double()
    critic = ConcatCritic(D, D, hidden=8).double()
    # SigLIP's log-temperature t' = log 5 and bias b = -2 (both terms carry gradient)
    critic.siglip = torch.nn.Parameter(torch.tensor([math.log(5.0), -2.0], dtype=torch.float64))
    params = list(net.parameters()) + list(critic.parameters())
    out = {}
    for name, case in CASES.items():
        raw = {k: v[rows].clone().requires_grad_() for k, v in full.items()}
        z = {k: F.normalize(net(v), dim=-1) for k, v in raw.items()}
        labels = (SPARSE_LABELS if name == "sup_con_one_view" else LABELS)[rows]
        loss = case(z, labels, critic)
        grads = torch.autograd.grad(loss, [raw[k] for k in INPUTS] + params,
                                    allow_unused=True, materialize_grads=True)
        input_grads, param_grads = grads[:len(INPUTS)], grads[len(INPUTS):]
        if world_size > 1:
            for p in param_grads:  # DDP: all-reduce, then divide by the world size
                dist.all_reduce(p)
                p /= world_size
        out[name] = {"loss": loss.detach(), "inputs": [t.detach() for t in input_grads],
                     "params": [t.detach() for t in param_grads]}
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        assert world() == (rank, world_size)
        n_local = N // world_size
        extra = {"gathered_labels": gather_no_grad(LABELS[rank * n_local:(rank + 1) * n_local]),
                 "offset": torch.tensor(local_offset(n_local))}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cases = run_cases(rank, world_size)
        extra["warnings"] = [str(w.message) for w in caught
                             if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        torch.save({"cases": cases, **extra}, f"{out_dir}/rank{rank}.pt")
        # Both ranks finish every gloo operation before either tears its group down: a rank
        # destroying its group while the peer still talks to it aborted the process
        # ("terminate called without an active exception") on a loaded machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:  # only the two processes this fixture started
                p.kill()
            pytest.fail("the two-process gloo run did not finish in 180 s")
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    return run_cases(0, 1), ranks


def test_helpers(runs):
    _, ranks = runs
    for r, result in enumerate(ranks):
        assert torch.equal(result["gathered_labels"], LABELS)
        assert result["offset"].item() == r * N // WORLD
    assert world() == (0, 1)  # this process has no group
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x and local_offset(3) == 0


def test_the_gather_uses_no_deprecated_torch_api(runs):
    # torch.distributed.nn.functional.all_gather warned once per call (49 lines per demo run).
    _, ranks = runs
    assert [r["warnings"] for r in ranks] == [[], []]


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_ranks_equal_one_process(runs, name):
    single, ranks = runs
    one, per_rank = single[name], [r["cases"][name] for r in ranks]
    tol = dict(rtol=1e-9, atol=1e-10)
    # mean_r L_r = L
    torch.testing.assert_close(sum(r["loss"] for r in per_rank) / WORLD, one["loss"], **tol)
    # rank r's inputs get W times the single-process gradient of its rows
    n_local = N // WORLD
    for r, result in enumerate(per_rank):
        for got, full in zip(result["inputs"], one["inputs"]):
            torch.testing.assert_close(got, WORLD * full[r * n_local:(r + 1) * n_local], **tol)
    # DDP-averaged parameter gradients are the single-process ones (identical on both ranks)
    for r, result in enumerate(per_rank):
        for got, full in zip(result["params"], one["params"]):
            torch.testing.assert_close(got, full, **tol)


def test_cases_really_use_the_other_rank(runs):
    # Guard against a vacuous pass: a rank's local loss differs from the loss on its half alone.
    _, ranks = runs
    g = torch.Generator().manual_seed(0)
    full = {k: torch.randn(N, D_IN, generator=g, dtype=torch.float64) for k in INPUTS}
    torch.manual_seed(0)
    net = torch.nn.Linear(D_IN, D).double()
    z = {k: F.normalize(net(v[:N // WORLD]), dim=-1) for k, v in full.items()}
    alone = info_nce(z["a"], z["b"], TAU).detach()
    assert not torch.isclose(alone, ranks[0]["cases"]["info_nce"]["loss"])
