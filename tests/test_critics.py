"""Critics: the cheap all-pairs scores equal scoring each pair on its own, and FactorCL's bounds
bracket the known mutual information of correlated Gaussians."""

import math

import pytest
import torch

from mmcl.objectives.critics import ConcatCritic, SeparableCritic, tiled_pair_scores
from mmcl.objectives.functional import club_upper_bound, nce_lower_bound

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
