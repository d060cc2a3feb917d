"""SigLIP (Zhai et al. 2023): the pairwise sigmoid loss against a slow per-pair reference
(values and gradients, t' and b included), the objective's learnt temperature and bias at the
paper's initialisation, its average over modality pairs, and data.missing=mask.
The two-rank form is checked in tests/test_distributed_losses.py; training through
fit_in_memory in tests/test_objectives.py (parametrised over every objective)."""

import math
from dataclasses import replace
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from mmcl import config
from mmcl.config import ConfigError
from mmcl.data.schema import present_column
from mmcl.data.synth import make_arrays
from mmcl.objectives import build_objective
from mmcl.objectives.functional import sigmoid_pairwise

SMALL = ["model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
         "model.proj_dim=16", "model.fusion_heads=2"]


def reference(a, b, log_t, bias, valid=None):
    """-(1/N) sum_i sum_j log sigmoid(label_ij (t a_i·b_j + b)), one pair at a time, over the
    rows in `valid` (N of them)."""
    rows = range(len(a)) if valid is None else [i for i in range(len(a)) if valid[i]]
    total = 0.0
    for i in rows:
        for j in rows:
            z = log_t.exp() * torch.dot(a[i], b[j]) + bias
            label = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(label * z))
    return total / len(rows)


def _inputs(n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    # t = 5, b = -2: positives and negatives both carry gradient (at t = 10, b = -10 the
    # negatives' sigmoids are nearly saturated).
    log_t = torch.tensor(math.log(5.0), dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    return [x.requires_grad_() for x in (a, b, log_t, bias)]


def _value_and_grads(fn, leaves):
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigmoid_loss_equals_the_per_pair_reference(seed):
    leaves = _inputs(seed=seed)
    got = _value_and_grads(lambda a, b, t, c: sigmoid_pairwise(a, b, t, c), leaves)
    want = _value_and_grads(reference, leaves)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1], want[1]):  # a, b, t' and b
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in got[1])


def test_masked_sigmoid_loss_is_the_loss_on_the_present_rows_alone():
    leaves = _inputs(n=8)
    valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    got = _value_and_grads(lambda a, b, t, c: sigmoid_pairwise(a, b, t, c, valid=valid), leaves)
    want = _value_and_grads(lambda a, b, t, c: reference(a, b, t, c, valid), leaves)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.all(got[1][0][~valid] == 0) and torch.all(got[1][1][~valid] == 0)
    # no valid row: a zero that keeps the graph
    none = sigmoid_pairwise(*leaves, valid=torch.zeros(8, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def _objective(*extra, manifest=None):
    if manifest is None:
        manifest, _ = make_arrays("rus", 64, seed=0)
    cfg = config.load(None, ["objective.name=siglip", *SMALL, *extra])
    return build_objective(cfg, manifest), manifest


def test_config_defaults_are_the_papers_and_are_validated():
    cfg = config.load(None, ["objective.name=siglip"]).objective
    assert (cfg.temperature_init, cfg.bias_init) == (10.0, -10.0)
    with pytest.raises(ConfigError):
        config.load(None, ["objective.name=siglip", "objective.temperature_init=0"])


def test_objective_learns_t_and_b_from_the_papers_initialisation():
    obj, _ = _objective()
    assert obj.num_views == 1
    assert obj.log_temperature.item() == pytest.approx(math.log(10.0))
    assert obj.bias.item() == pytest.approx(-10.0)
    assert {id(obj.log_temperature), id(obj.bias)} <= {id(p) for p in obj.parameters()}
    obj2, _ = _objective("objective.temperature_init=2.5", "objective.bias_init=-3")
    assert obj2.log_temperature.exp().item() == pytest.approx(2.5)
    assert obj2.bias.item() == pytest.approx(-3.0)


def test_objective_averages_the_sigmoid_loss_over_modality_pairs():
    torch.manual_seed(0)
    obj, manifest = _objective("objective.temperature_init=4", "objective.bias_init=-1")
    _, arrays = make_arrays("rus", 16, seed=1)
    batch = {k: torch.as_tensor(v) for k, v in arrays.items()}
    out = obj([batch], batch)
    z = obj.shared_embeddings(batch)
    assert sorted(z) == sorted(manifest.modality_names)
    pairs = list(combinations(manifest.modality_names, 2))
    assert len(pairs) >= 1
    want = sum(reference(z[a], z[b], obj.log_temperature, obj.bias) for a, b in pairs) / len(pairs)
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert "siglip" in out.metrics and "temperature" in out.metrics and "bias" in out.metrics
    out.loss.backward()
    assert obj.log_temperature.grad is not None and obj.bias.grad is not None
    emb = obj.embed(batch)
    assert emb.shape == (16, len(manifest.modality_names) * 16)


def test_mask_drops_the_pairs_with_an_absent_side():
    manifest, arrays = make_arrays("rus", 16, seed=1)
    absent = manifest.modality_names[1]
    manifest = replace(manifest, modalities=[replace(m, nullable=m.name == absent)
                                             for m in manifest.modalities])
    torch.manual_seed(0)
    obj, _ = _objective("data.missing=mask", "objective.bias_init=-2", manifest=manifest)
    assert obj.supports_missing
    batch = {k: torch.as_tensor(v) for k, v in arrays.items()}
    present = torch.ones(16, dtype=torch.bool)
    present[[0, 3, 4, 9]] = False
    batch[present_column(absent)] = present
    loss = obj([batch], batch).loss
    z = obj.shared_embeddings(batch)
    terms = [reference(z[a], z[b], obj.log_temperature, obj.bias,
                       present if absent in (a, b) else None)
             for a, b in combinations(manifest.modality_names, 2)]
    torch.testing.assert_close(loss.detach(), (sum(terms) / len(terms)).detach(),
                               rtol=1e-5, atol=1e-6)
