"""The functional losses against slow references written row by row from the formulas in
docs/methods.md (float64), values and gradients, plus gradcheck on small inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.objectives.functional import (club_upper_bound, comm_loss, info_nce,
                                        nce_lower_bound, nt_xent, sup_con, tuple_info_nce)

TOL = dict(rtol=1e-5, atol=1e-5)
TAU = 0.3



def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return x.requires_grad_()


def lse(values):
    """log sum exp of a Python list of scalar tensors."""
    return torch.logsumexp(torch.stack(values), dim=0)


# ------------------------------------------------------------------ references, loop by loop


def ref_one_way(q, k, tau):
    n = len(q)
    losses = []
    for i in range(n):
        row = [q[i] @ k[j] / tau for j in range(n)]
        losses.append(-(row[i] - lse(row)))
    return sum(losses) / n


def ref_info_nce(a, b, tau):
    return 0.5 * (ref_one_way(a, b, tau) + ref_one_way(b, a, tau))


def ref_nt_xent(a, b, tau):
    z = list(a) + list(b)
    n = len(a)
    losses = []
    for k in range(2 * n):
        partner = (k + n) % (2 * n)
        others = [z[k] @ z[j] / tau for j in range(2 * n) if j != k]
        losses.append(-(z[k] @ z[partner] / tau - lse(others)))
    return sum(losses) / (2 * n)


def ref_comm(views1, views2, tau, reduction):
    terms = [0.5 * (ref_nt_xent(views1[i], views2[-1], tau)
                    + ref_nt_xent(views2[i], views1[-1], tau)) for i in range(len(views1))]
    return sum(terms) / (len(terms) if reduction == "mean" else 1)


def ref_tuple(anchor, positive, disturbed, log_weights, tau):
    """Mixture form: denominator sum_j e^{a_i·p_j/tau} + sum_k alpha_k sum_j e^{a_i·d_kj/tau}."""
    n = len(anchor)
    losses = []
    for i in range(n):
        denominator = sum(torch.exp(anchor[i] @ positive[j] / tau) for j in range(n))
        for d, lw in zip(disturbed, log_weights):
            alpha = math.exp(lw)  # exp(-inf) = 0: the block contributes nothing
            if alpha > 0:
                denominator = denominator + alpha * sum(torch.exp(anchor[i] @ d[j] / tau)
                                                        for j in range(n))
        losses.append(-(anchor[i] @ positive[i] / tau - torch.log(denominator)))
    return sum(losses) / n


def ref_nce(s, offset):
    rows, cols = s.shape
    pos = sum(s[offset + j, j] for j in range(cols)) / cols
    neg = sum(lse([s[i, j] for i in range(rows)]) for j in range(cols)) / cols
    return pos - neg + math.log(rows)


def ref_club(s, offset):
    rows, cols = s.shape
    pos = sum(s[offset + j, j] for j in range(cols)) / cols
    everything = sum(s[i, j] for i in range(rows) for j in range(cols)) / (rows * cols)
    return pos - everything


def ref_sup_con(embeddings, labels, tau):
    n, v, _ = embeddings.shape
    z = [embeddings[i, k] for i in range(n) for k in range(v)]
    lab = [int(labels[i]) for i in range(n) for _ in range(v)]
    losses = []
    for a in range(len(z)):
        others = [b for b in range(len(z)) if b != a]
        positives = [p for p in others if lab[p] == lab[a]]
        if not positives:
            continue
        log_denominator = lse([z[a] @ z[b] / tau for b in others])
        losses.append(-sum(z[a] @ z[p] / tau - log_denominator for p in positives)
                      / len(positives))
    return sum(losses) / len(losses)


def assert_same(fn, ref, inputs):
    """Equal values and equal gradients w.r.t. every input."""
    value, expected = fn(*inputs), ref(*inputs)
    torch.testing.assert_close(value, expected, **TOL)
    # Unused inputs (switched-off disturbed sets) get zero gradients on both sides.
    grads = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
    expected_grads = torch.autograd.grad(expected, inputs, allow_unused=True,
                                         materialize_grads=True)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL)


# ------------------------------------------------------------------ values and gradients


def test_info_nce_matches_reference():
    a, b = unit(7, 5, seed=0), unit(7, 5, seed=1)
    assert_same(lambda a, b: info_nce(a, b, TAU), lambda a, b: ref_info_nce(a, b, TAU), (a, b))


def test_nt_xent_matches_reference_and_is_symmetric():
    a, b = unit(6, 5, seed=2), unit(6, 5, seed=3)
    assert_same(lambda a, b: nt_xent(a, b, TAU), lambda a, b: ref_nt_xent(a, b, TAU), (a, b))
    torch.testing.assert_close(nt_xent(a, b, TAU), nt_xent(b, a, TAU))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_comm_loss_matches_reference(reduction):
    m = 2  # two masked views and the full tuple
    views = [unit(5, 4, seed=10 + k) for k in range(2 * (m + 1))]

    def split(*vs):
        return list(vs[:m + 1]), list(vs[m + 1:])

    assert_same(lambda *vs: comm_loss(*split(*vs), TAU, reduction=reduction),
                lambda *vs: ref_comm(*split(*vs), TAU, reduction), tuple(views))


def test_comm_loss_sum_is_m_plus_one_means_and_rejects_other_reductions():
    v1 = [unit(5, 4, seed=k) for k in range(3)]
    v2 = [unit(5, 4, seed=20 + k) for k in range(3)]
    torch.testing.assert_close(comm_loss(v1, v2, TAU, reduction="sum"),
                               3 * comm_loss(v1, v2, TAU, reduction="mean"))
    with pytest.raises(ValueError, match="reduction"):
        comm_loss(v1, v2, TAU, reduction="max")
    with pytest.raises(ValueError, match="same length"):
        comm_loss(v1, v2[:2], TAU)


def test_comm_full_term_is_nt_xent_of_the_full_views():
    # With one modality (M = 1) and the masked view equal to the full one, both terms are
    # NT-Xent(Z', Z'').
    z1, z2 = unit(6, 4, seed=30), unit(6, 4, seed=31)
    torch.testing.assert_close(comm_loss([z1, z1], [z2, z2], TAU), nt_xent(z1, z2, TAU))


@pytest.mark.parametrize("log_weights", [
    [],                                   # plain one-direction InfoNCE
    [0.0, math.log(3.0)],                 # alpha = 1 and 3
    [-math.inf, -math.inf],               # all off
    [math.log(0.5), -math.inf, 1.2],      # mixed
])
def test_tuple_info_nce_matches_reference(log_weights):
    n, d = 6, 4
    anchor, positive = unit(n, d, seed=40), unit(n, d, seed=41)
    disturbed = [unit(n, d, seed=50 + k) for k in range(len(log_weights))]

    def fn(anchor, positive, *disturbed):
        return tuple_info_nce(anchor, positive, list(disturbed), log_weights, TAU)

    def ref(anchor, positive, *disturbed):
        return ref_tuple(anchor, positive, disturbed, log_weights, TAU)

    assert_same(fn, ref, (anchor, positive, *disturbed))


def test_tuple_info_nce_special_cases():
    n, d = 6, 4
    anchor, positive = unit(n, d, seed=60), unit(n, d, seed=61)
    plain = tuple_info_nce(anchor, positive, [], [], TAU)
    torch.testing.assert_close(plain, ref_one_way(anchor, positive, TAU), **TOL)
    # A switched-off block never reaches the loss, whatever it holds: no NaN.
    poisoned = torch.full((n, d), math.nan, dtype=torch.float64, requires_grad=True)
    off = tuple_info_nce(anchor, positive, [poisoned], [-math.inf], TAU)
    torch.testing.assert_close(off, plain)
    (g,) = torch.autograd.grad(off, anchor)
    assert torch.isfinite(g).all()
    # alpha = 1 is the same as appending the disturbed set to the candidates.
    d1 = unit(n, d, seed=62)
    logits = anchor @ torch.cat([positive, d1]).T / TAU
    torch.testing.assert_close(tuple_info_nce(anchor, positive, [d1], [0.0], TAU),
                               F.cross_entropy(logits, torch.arange(n)))
    with pytest.raises(ValueError, match="log-weights"):
        tuple_info_nce(anchor, positive, [d1], [], TAU)
    with pytest.raises(ValueError, match="finite or -inf"):
        tuple_info_nce(anchor, positive, [d1], [math.nan], TAU)


@pytest.mark.parametrize("rows,cols,offset", [(5, 5, 0), (9, 3, 0), (9, 3, 4), (9, 3, 6)])
def test_nce_and_club_match_reference(rows, cols, offset):
    g = torch.Generator().manual_seed(rows * 100 + offset)
    s = torch.randn(rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
    assert_same(lambda s: nce_lower_bound(s, offset), lambda s: ref_nce(s, offset), (s,))
    assert_same(lambda s: club_upper_bound(s, offset), lambda s: ref_club(s, offset), (s,))


def test_nce_and_club_square_formulas_and_checks():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 8, generator=g, dtype=torch.float64)
    # The formulas, vectorised the other way round.
    nce = s.diag().mean() - (s.T.logsumexp(dim=1).mean() - math.log(8))
    torch.testing.assert_close(nce_lower_bound(s), nce)
    torch.testing.assert_close(club_upper_bound(s), s.diag().mean() - s.mean())
    # A perfect critic saturates I_NCE at log N; a constant one gives 0.
    assert nce_lower_bound(100 * torch.eye(8)).item() == pytest.approx(math.log(8))
    constant = torch.ones(8, 8, dtype=torch.float64)
    assert nce_lower_bound(constant).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        nce_lower_bound(torch.randn(6, 3), offset=4)
    with pytest.raises(ValueError, match="do not fit"):
        club_upper_bound(torch.randn(3, 6))


@pytest.mark.parametrize("views,labels", [
    (2, [0, 1, 0, 2, 1, 0]),
    (3, [0, 0, 0, 0, 1, 1]),
    (1, [0, 1, 0, 2, 1, 3]),   # anchors with label 2 or 3 have no positive: left out
])
def test_sup_con_matches_reference(views, labels):
    emb = F.normalize(unit(len(labels), views, 4, seed=70).detach(), dim=-1).requires_grad_()
    lab = torch.tensor(labels)
    assert_same(lambda e: sup_con(e, lab, TAU), lambda e: ref_sup_con(e, lab, TAU), (emb,))


def test_sup_con_with_distinct_labels_and_one_view_is_zero_not_nan():
    emb = unit(4, 1, 3, seed=80)
    loss = sup_con(emb, torch.arange(4), TAU)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_distributed_flag_is_a_no_op_in_one_process():
    a, b = unit(5, 4, seed=90), unit(5, 4, seed=91)
    for fn in (info_nce, nt_xent):
        torch.testing.assert_close(fn(a, b, TAU, distributed=True),
                                   fn(a, b, TAU, distributed=False))


# ------------------------------------------------------------------ gradcheck


def small(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


def test_gradcheck_all_losses():
    a, b, c, d = (small(3, 4, seed=k) for k in range(4))
    checks = [
        (lambda a, b: info_nce(a, b, TAU), (a, b)),
        (lambda a, b: nt_xent(a, b, TAU), (a, b)),
        (lambda a, b, c, d: comm_loss([a, b], [c, d], TAU), (a, b, c, d)),
        (lambda a, b, c, d: tuple_info_nce(a, b, [c, d], [0.3, -math.inf], TAU), (a, b, c, d)),
        (lambda a, b, c, d: tuple_info_nce(a, b, [c, d], [-0.5, 0.7], TAU), (a, b, c, d)),
        (lambda e: sup_con(e, torch.tensor([0, 1, 0]), TAU), (small(3, 2, 4, seed=5),)),
        (lambda s: nce_lower_bound(s, 2), (small(5, 3, seed=6),)),
        (lambda s: club_upper_bound(s, 1), (small(5, 3, seed=7),)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)
