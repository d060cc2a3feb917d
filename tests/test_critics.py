"""Critics: the cheap all-pairs scores equal scoring each pair on its own, and FactorCL's bounds
bracket the known mutual information of correlated Gaussians."""

import math

import pytest
import torch

from mmcl.bench.perf import tiled_pair_scores
from mmcl.objectives.critics import ConcatCritic, SeparableCritic, sample_rows
from mmcl.objectives.functional import (club_upper_bound, club_upper_bound_sampled,
                                        nce_lower_bound, nce_lower_bound_sampled)

CRITICS = {
    "concat": lambda: ConcatCritic(3, 5, hidden=8),
    "concat_1_layer": lambda: ConcatCritic(3, 5, hidden=8, layers=1),
    "concat_3_layers": lambda: ConcatCritic(3, 5, hidden=8, layers=3),
    "separable": lambda: SeparableCritic(3, 5, hidden=8, embed_dim=6),
}



def one_by_one(critic, x, y):
    """s[i, j] = critic(x_i, y_j), one call per pair."""
    return torch.stack([torch.stack([critic(x[i:i + 1], y[j:j + 1])[0] for j in range(len(y))])
                        for i in range(len(x))])


@pytest.mark.parametrize("name", sorted(CRITICS))
def test_pair_scores_equal_scoring_every_pair(name):
    torch.manual_seed(0)
    critic = CRITICS[name]().double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    fast, slow = critic.pair_scores(x, y), one_by_one(critic, x, y)
    assert fast.shape == (4, 6)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(tiled_pair_scores(critic, x, y), slow)
    # Aligned pairs are the diagonal.
    torch.testing.assert_close(critic(x[:4], y[:4]), slow[:, :4].diagonal())
    # Gradients w.r.t. the inputs and every parameter, through a non-trivial function.
    weights = torch.randn(4, 6, dtype=torch.float64)
    inputs = (x, y, *critic.parameters())
    fast_grads = torch.autograd.grad((weights * fast.tanh()).sum(), inputs)
    slow_grads = torch.autograd.grad((weights * slow.tanh()).sum(), inputs)
    for f, s in zip(fast_grads, slow_grads):
        torch.testing.assert_close(f, s)


def test_concat_critic_layout_is_factorcls_mlp():
    critic = ConcatCritic(3, 5, hidden=16)
    shapes = [tuple(p.shape) for p in critic.parameters()]
    assert shapes == [(16, 8), (16,), (16, 16), (16,), (1, 16), (1,)]
    with pytest.raises(ValueError):
        ConcatCritic(3, 5, hidden=16, layers=0)


def test_pair_scores_follow_swapped_in_parameters():
    # FactorCL evaluates its CLUB critics with detached parameters via functional_call: the
    # scores must use the swapped-in tensors, so no gradient reaches the critic.
    torch.manual_seed(0)
    for critic in (ConcatCritic(3, 5, 8), SeparableCritic(3, 5, 8)):
        x, y = torch.randn(4, 3, requires_grad=True), torch.randn(4, 5)
        params = {n: p.detach() for n, p in critic.named_parameters()}
        doubled = {f"c.{n}": 2 * p for n, p in params.items()}
        assert not torch.allclose(torch.func.functional_call(_Pairs(critic), doubled, (x, y)),
                                  critic.pair_scores(x, y))  # parameters really swapped
        pairs = torch.func.functional_call(_Pairs(critic), {f"c.{n}": p for n, p in
                                                           params.items()}, (x, y))
        pairs.sum().backward()
        assert x.grad is not None
        assert all(p.grad is None for p in critic.parameters())


class _Pairs(torch.nn.Module):
    def __init__(self, critic):
        super().__init__()
        self.c = critic

    def forward(self, x, y):
        return self.c.pair_scores(x, y)


# ------------------------------------------------------------------ bounds on known MI


DIM, RHO, BATCH = 2, 0.8, 128
TRUE_MI = -DIM / 2 * math.log(1 - RHO ** 2)  # 1.02 nats, well below log(128) = 4.85


def gaussian_pairs(n, generator):
    """x, y in R^DIM, coordinate k of y correlated with coordinate k of x by RHO."""
    x = torch.randn(n, DIM, generator=generator)
    noise = torch.randn(n, DIM, generator=generator)
    return x, RHO * x + math.sqrt(1 - RHO ** 2) * noise


@pytest.fixture(scope="module", params=["concat", "separable"])
def trained_critic(request):
    """A critic fitted by maximising I_NCE (how FactorCL trains its CLUB critics)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    critic = (ConcatCritic(DIM, DIM, hidden=64) if request.param == "concat"
              else SeparableCritic(DIM, DIM, hidden=64, embed_dim=32))
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(300):
        x, y = gaussian_pairs(BATCH, g)
        loss = -nce_lower_bound(critic.pair_scores(x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return critic


@torch.no_grad()
def estimate(critic, bound, batches=100):
    g = torch.Generator().manual_seed(2)  # fresh held-out batches
    return sum(bound(critic.pair_scores(*gaussian_pairs(BATCH, g))).item()
               for _ in range(batches)) / batches


def test_nce_is_a_lower_bound_that_learns_most_of_the_information(trained_critic):
    nce = estimate(trained_critic, nce_lower_bound)
    assert nce < TRUE_MI + 0.1, (nce, TRUE_MI)  # sampling noise of the estimate
    assert nce > 0.75 * TRUE_MI, (nce, TRUE_MI)  # the critic did learn


def test_club_with_an_nce_trained_critic_is_an_upper_bound(trained_critic):
    club = estimate(trained_critic, club_upper_bound)
    # At the optimum f = pmi + c(y), CLUB = I + lautum information = DIM * rho^2 / (1 - rho^2).
    assert club > TRUE_MI - 0.1, (club, TRUE_MI)
    assert club < 1.5 * DIM * RHO ** 2 / (1 - RHO ** 2), club


# ------------------------------------------------------------------ sampled negatives


@pytest.mark.parametrize("name", sorted(CRITICS))
def test_sampled_scores_are_the_named_pair_scores(name):
    torch.manual_seed(0)
    critic = CRITICS[name]().double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    rows = sample_rows(7, 2, 4, 3, torch.Generator().manual_seed(0))
    assert rows.shape == (4, 4)
    assert rows[:, 0].tolist() == [2, 3, 4, 5]  # positives first
    assert all(len(set(r.tolist())) == 4 for r in rows)  # distinct, never the positive
    full = critic.pair_scores(x, y)
    torch.testing.assert_close(critic.sampled_scores(x, y, rows),
                               full[rows, torch.arange(4)[:, None]])


def test_chunked_pair_scores_equal_unchunked_in_values_and_gradients():
    torch.manual_seed(0)
    critic = ConcatCritic(3, 5, hidden=8).double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x, y, *critic.parameters())
    whole = critic.pair_scores(x, y)
    critic.chunk = 4  # 4 + 2 columns
    chunked = critic.pair_scores(x, y)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(torch.autograd.grad(nce_lower_bound(chunked), inputs),
                    torch.autograd.grad(nce_lower_bound(whole), inputs)):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def sampled_estimate(critic, k, batches=100):
    g = torch.Generator().manual_seed(2)
    nce = club = 0.0
    for _ in range(batches):
        x, y = gaussian_pairs(BATCH, g)
        s = critic.sampled_scores(x, y, sample_rows(BATCH, 0, BATCH, k, g))
        nce += nce_lower_bound_sampled(s).item()
        club += club_upper_bound_sampled(s).item()
    return nce / batches, club / batches


def test_sampled_negatives_bias_against_the_full_bounds(trained_critic):
    """K sampled negatives instead of all 127: I_NCE can reach only log(1 + K), so it is
    biased low, by less as K grows (measured: -0.10 nats at K = 16, -0.05 at 32, -0.02 at
    64 for 1.02 nats of true MI); CLUB's product-of-marginals mean is unbiased."""
    full_nce, full_club = estimate(trained_critic, nce_lower_bound), estimate(
        trained_critic, club_upper_bound)
    biases = []
    for k in (16, 32, 64):
        nce, club = sampled_estimate(trained_critic, k)
        biases.append(full_nce - nce)
        assert abs(club - full_club) < 0.05 * full_club, (k, club, full_club)
    assert 0 < biases[2] < biases[1] < biases[0] < 0.15, biases
    assert biases[1] < 0.08, biases  # K = 32 (the default): within 8% of the true MI


def test_a_critic_trained_on_sampled_negatives_learns_as_much():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    critic = ConcatCritic(DIM, DIM, hidden=64)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(300):
        x, y = gaussian_pairs(BATCH, g)
        scores = critic.sampled_scores(x, y, sample_rows(BATCH, 0, BATCH, 16, g))
        loss = -nce_lower_bound_sampled(scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
    nce = estimate(critic, nce_lower_bound)  # judged by the full bound
    assert 0.75 * TRUE_MI < nce < TRUE_MI + 0.1, (nce, TRUE_MI)
