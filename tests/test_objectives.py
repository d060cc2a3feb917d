"""Objectives as plain PyTorch: each trains on controlled data, and each keeps its promises
(TupleInfoNCE's single encoder pass and reduction to Tuple, FactorCL's critic isolation)."""

import math

import pytest
import torch

from mmcl import config
from mmcl.data.synth import make_arrays
from mmcl.objectives import OBJECTIVES, ObjectiveError, build_objective
from mmcl.objectives.tuple_infonce import derangement
from mmcl.train.local import fit_in_memory

SMALL = ["model.embed_dim=16", "model.encoder.hidden=32", "model.proj_hidden=32",
         "model.proj_dim=16", "model.fusion_heads=2", "objective.critic_hidden=32"]


def small_config(name, *extra):
    overrides = [f"objective.name={name}", "train.batch_size=64", "train.epochs=4",
                 "train.lr=3e-3", "train.warmup_epochs=0", *extra]
    critic = [o for o in SMALL if not o.startswith("objective.")]
    if name.startswith("factorcl"):
        critic = SMALL
    return config.load(None, overrides + critic)


@pytest.fixture(scope="module")
def rus():
    manifest, arrays = make_arrays("rus", 768, seed=0)
    return manifest, {k: v for k, v in arrays.items()}


@pytest.fixture(scope="module")
def factorcl_data():
    manifest, arrays = make_arrays("factorcl", 768, seed=0)
    return manifest, arrays


def batch_of(arrays, n=32):
    return {k: torch.as_tensor(v[:n]) for k, v in arrays.items()}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_short_training_lowers_the_loss(name, rus, factorcl_data):
    manifest, arrays = factorcl_data if name.startswith("factorcl") else rus
    cfg = small_config(name)
    engine = fit_in_memory(cfg, manifest, arrays)
    losses = [h["loss"] for h in engine.history]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"


def test_tuple_infonce_with_all_weights_off_equals_tuple(rus):
    manifest, arrays = rus
    batch = batch_of(arrays)
    for symmetric in (True, False):
        torch.manual_seed(0)
        tuple_obj = build_objective(small_config("tuple", f"objective.symmetric={symmetric}",
                                                 "objective.temperature=0.1"), manifest)
        off = small_config("tuple_infonce", "objective.default_negative_weight=0",
                           f"objective.symmetric={symmetric}", "objective.temperature=0.1")
        torch.manual_seed(0)
        tin = build_objective(off, manifest)
        tin.load_state_dict(tuple_obj.state_dict())
        noise = torch.Generator().manual_seed(1)
        view1 = batch
        view2 = {k: v + 0.3 * torch.randn(v.shape, generator=noise)
                 if k in manifest.modality_names else v for k, v in batch.items()}
        a = tuple_obj([view1, view2], batch).loss
        b = tin([view1, view2], batch).loss
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_tuple_infonce_runs_each_encoder_once_per_view(rus):
    manifest, arrays = rus
    obj = build_objective(small_config("tuple_infonce"), manifest)
    calls = {m: 0 for m in obj.modalities}
    for m, enc in obj.encoder.encoders.items():
        enc.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    fused, swapped = [], []
    obj.encoder.fusion.register_forward_hook(lambda *_: fused.append(1))
    fuse_swapped = obj.encoder.fuse_swapped
    obj.encoder.fuse_swapped = lambda e, swaps: swapped.append(len(swaps)) or fuse_swapped(e, swaps)
    batch = batch_of(arrays)
    obj([batch, batch], batch, generator=torch.Generator().manual_seed(0))
    assert calls == {m: 2 for m in obj.modalities}, calls  # two views, once each
    # fusion: one call per view, the tuples themselves and their disturbed sets together
    assert len(fused) == 0
    assert swapped == [1 + len(obj.modalities)] * 2


def reencoding_step(extra, layers):
    """Loss and gradients of mmcl's TupleInfoNCE step and of the plain re-encoding step
    (every disturbed tuple through the whole network), same weights and derangements."""
    from mmcl.bench.reencode import ReencodingTupleInfoNCE
    from mmcl.data.schema import Manifest, ModalitySpec

    manifest = Manifest([ModalitySpec(f"m{k}", (6,)) for k in range(3)], [])
    torch.manual_seed(0)
    cfg = small_config("tuple_infonce", f"model.fusion_layers={layers}", *extra)
    objective = build_objective(cfg, manifest)
    gen = torch.Generator().manual_seed(0)
    views = [{f"m{k}": torch.randn(10, 6, generator=gen) for k in range(3)}
             for _ in range(2)]
    out = []
    for model in (objective, ReencodingTupleInfoNCE(objective)):
        objective.zero_grad()
        loss = model(views, views[0], generator=torch.Generator().manual_seed(5)).loss
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in objective.parameters()
                                    if p.grad is not None]))
    return out


@pytest.mark.parametrize("layers,extra", [
    (1, []), (2, []), (1, ["objective.symmetric=false"]),
    (1, ["objective.negative_weights={m1: 0.0}"]), (1, ["model.fusion=concat"])])
def test_tuple_infonce_fast_path_equals_plain_reencoding(layers, extra):
    """Batched disturbed sets, CLS-only last layer and first-layer reuse change nothing: loss
    and every gradient equal the plain re-encoding step's to 1e-5 (absolute, or relative for
    the few large entries)."""
    (fast, fast_grads), (plain, plain_grads) = reencoding_step(extra, layers)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert len(fast_grads) == len(plain_grads) > 0
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tuple_infonce_key_grad_false_stops_exactly_the_key_gradients(rus):
    """One direction (view1 -> view2): the keys are view 2's tuple and its disturbed sets.
    Without key gradients view 2 gets none, view 1 (the anchor) gets exactly what it got."""
    manifest, arrays = rus
    grads = {}
    for key_grad in (True, False):
        torch.manual_seed(0)
        obj = build_objective(small_config("tuple_infonce", "objective.symmetric=false",
                                           f"objective.key_grad={key_grad}"), manifest)
        views = [{m: torch.as_tensor(arrays[m][:16]).clone().requires_grad_()
                  for m in obj.modalities} for _ in range(2)]
        loss = obj(views, views[0], generator=torch.Generator().manual_seed(3)).loss
        loss.backward()
        grads[key_grad] = [{m: v.grad for m, v in view.items()} for view in views]
    for m in manifest.modality_names:
        torch.testing.assert_close(grads[False][0][m], grads[True][0][m], rtol=0, atol=0)
        assert grads[True][1][m].abs().sum() > 0
        assert grads[False][1][m] is None or not grads[False][1][m].any()


def test_tuple_infonce_weights_change_the_loss(rus):
    manifest, arrays = rus
    batch = batch_of(arrays)
    losses = []
    for w in (0.0, 1.0, 4.0):
        torch.manual_seed(0)
        obj = build_objective(small_config("tuple_infonce",
                                           f"objective.default_negative_weight={w}"), manifest)
        losses.append(obj([batch, batch], batch, generator=torch.Generator().manual_seed(1))
                      .loss.item())
    assert losses[0] < losses[1] < losses[2], losses  # more negatives, harder task


def test_tuple_infonce_rejects_unknown_weighted_modality(rus):
    manifest, _ = rus
    with pytest.raises(ObjectiveError, match="negative_weights names"):
        build_objective(small_config("tuple_infonce", "objective.negative_weights={zz: 1}"),
                        manifest)


def two_views(arrays, n, modalities, noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = batch_of(arrays, n)
    views = []
    for _ in range(2):
        views.append({**batch, **{m: batch[m] + noise * torch.randn(batch[m].shape, generator=gen)
                                  for m in modalities}})
    return views


def reference_reward(obj, view1, view2):
    """A^k by the definition, one fused tuple at a time."""
    obj.eval()
    with torch.no_grad():
        e1, e2 = obj.encoder.encode(view1), obj.encoder.encode(view2)
        n = len(next(iter(e1.values())))
        out = {}
        for k in obj.modalities:
            hits = 0
            for i in range(n):
                query = obj.project({m: e1[m][i:i + 1] for m in obj.modalities})[0]
                sims = []
                for j in range(n):
                    tup = {m: e2[m][i:i + 1] for m in obj.modalities}
                    tup[k] = e2[k][j:j + 1]
                    sims.append(float(query @ obj.project(tup)[0]))
                hits += all(sims[i] > s for j, s in enumerate(sims) if j != i)
            out[f"A_{k}"] = hits / n
    return out


@pytest.mark.parametrize("name", ["tuple_infonce", "tuple"])  # any fused objective: Tune
def test_disturbed_retrieval_reward_matches_the_slow_definition(name, rus):
    from mmcl.objectives.tuple_infonce import disturbed_retrieval_reward

    manifest, arrays = rus
    obj = build_objective(small_config(name), manifest)
    view1, view2 = two_views(arrays, 24, obj.modalities)
    expected = reference_reward(obj, view1, view2)
    for max_rows in (16384, 48):  # one fused batch, or two candidates per batch
        reward = disturbed_retrieval_reward(obj, view1, view2, max_rows=max_rows)
        for k, v in expected.items():
            assert reward[k] == pytest.approx(v, abs=1e-6), (k, max_rows)
        assert reward["R"] == pytest.approx(sum(expected.values()))
    assert 0 < reward["R"] <= len(obj.modalities)


def test_tuple_infonce_reward_scores_zero_for_a_modality_that_tells_no_tuple_apart(rus):
    manifest, arrays = rus
    obj = build_objective(small_config("tuple_infonce"), manifest)
    view1, view2 = two_views(arrays, 32, obj.modalities)
    blind = obj.modalities[0]
    for view in (view1, view2):  # every tuple holds the same value of `blind`
        view[blind] = view1[blind][:1].expand_as(view1[blind]).clone()
    reward = obj.reward(view1, view2)
    assert reward[f"A_{blind}"] == 0.0  # every candidate ties with the true one: misses
    assert all(reward[f"A_{m}"] > 0 for m in obj.modalities[1:])


def test_derangement_has_no_fixed_point():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 64):
        for _ in range(20):
            perm = derangement(n, gen)
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == torch.arange(n)).any()


def test_comm_masked_from_original_uses_the_batch(rus):
    manifest, arrays = rus
    batch = batch_of(arrays)
    torch.manual_seed(0)
    aug = build_objective(small_config("comm"), manifest)
    orig = build_objective(small_config("comm", "objective.masked_from=original"), manifest)
    orig.load_state_dict(aug.state_dict())
    noisy = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in batch.items()}
    assert not torch.isclose(aug([noisy, noisy], batch).loss, orig([noisy, noisy], batch).loss)
    # with un-augmented views the two variants coincide
    torch.testing.assert_close(aug([batch, batch], batch).loss, orig([batch, batch], batch).loss)


def test_comm_sum_is_m_plus_one_times_mean(rus):
    manifest, arrays = rus
    batch = batch_of(arrays)
    torch.manual_seed(0)
    mean = build_objective(small_config("comm"), manifest)
    total = build_objective(small_config("comm", "objective.reduction=sum"), manifest)
    total.load_state_dict(mean.state_dict())
    noisy = {k: v.flip(0) if v.is_floating_point() else v for k, v in batch.items()}
    m = len(mean.modalities)
    torch.testing.assert_close(total([batch, noisy], batch).loss,
                               (m + 1) * mean([batch, noisy], batch).loss)


def test_factorcl_refuses_three_modalities(rus):
    manifest, _ = rus  # rus has three modalities
    with pytest.raises(ObjectiveError, match="exactly 2 modalities"):
        build_objective(small_config("factorcl_ssl"), manifest)


def test_factorcl_club_critics_move_only_by_their_own_loss(factorcl_data):
    manifest, arrays = factorcl_data
    obj = build_objective(small_config("factorcl_ssl", "objective.negatives=0"), manifest)
    batch = batch_of(arrays)
    out = obj([batch, {k: v * 1.1 if v.is_floating_point() else v for k, v in batch.items()}],
              batch)
    out.loss.backward()
    club_grads = [p.grad.clone() for p in obj.club_critics.parameters()]
    # Reference: the critics' own learning loss alone, on the same (detached) head outputs.
    obj.zero_grad()
    m1, m2 = obj.modalities
    e = obj.encoder.encode(batch)
    k1, k2 = obj.apply_heads("club", [e[m1], e[m2]])
    obj.club_learning_loss(obj.club_critics["club"], k1, k2).backward()
    for p, g in zip(obj.club_critics["club"].parameters(), club_grads):
        torch.testing.assert_close(p.grad, g)
    groups = obj.optimizer_groups()
    club_ids = {id(p) for p in obj.club_critics.parameters()}
    assert {id(p) for p in groups["club_critics"].params} == club_ids
    assert not club_ids & {id(p) for p in groups["main"].params}


def test_factorcl_sampled_negatives(factorcl_data):
    """K >= N - 1 is every other row: the all-pairs loss exactly; smaller K samples (another
    loss, drawn from the step's generator) and the main loss still leaves the CLUB critics
    alone."""
    manifest, arrays = factorcl_data
    batch = batch_of(arrays, n=32)
    view2 = {k: v * 1.1 if v.is_floating_point() else v for k, v in batch.items()}
    losses = {}
    for k in (0, 31, 8):
        torch.manual_seed(0)
        obj = build_objective(small_config("factorcl_ssl", f"objective.negatives={k}"), manifest)
        gen = torch.Generator().manual_seed(4)
        losses[k] = obj([batch, view2], batch, generator=gen).loss
    torch.testing.assert_close(losses[31], losses[0], rtol=0, atol=0)
    assert math.isfinite(losses[8].item()) and losses[8].item() != losses[0].item()
    obj.club_learning_loss = lambda *a: torch.zeros(())  # only the main loss is left
    obj.zero_grad()
    obj([batch, view2], batch, generator=gen).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in obj.club_critics.parameters())
    assert any(p.grad is not None and p.grad.any() for p in obj.critics.parameters())


def test_factorcl_embedding_concatenates_every_head(factorcl_data):
    manifest, arrays = factorcl_data
    cfg = small_config("factorcl_ssl")
    obj = build_objective(cfg, manifest)
    z = obj.embed(batch_of(arrays, 8))
    assert z.shape == (8, 2 * 5 * cfg.model.embed_dim)


def test_factorcl_sub_embeddings_split_the_representation_into_shared_and_unique(
        factorcl_data, rus):
    """Z_S holds the shared heads of both modalities, Z_U1 / Z_U2 the unique heads of one
    modality each: together exactly the columns of `embed`, and Z_U1 depends on x1 only."""
    manifest, arrays = factorcl_data
    cfg = small_config("factorcl_ssl")
    obj = build_objective(cfg, manifest).eval()
    batch = batch_of(arrays, 8)
    parts = obj.sub_embeddings(batch)
    d = cfg.model.embed_dim
    assert {k: v.shape for k, v in parts.items()} == {
        "Z_S": (8, 2 * 2 * d), "Z_U1": (8, 3 * d), "Z_U2": (8, 3 * d)}
    whole = obj.embed(batch)
    together = torch.cat(list(parts.values()), dim=1)
    assert torch.allclose(together.sort(dim=1).values, whole.sort(dim=1).values)
    other = dict(batch, x2=torch.randn_like(batch["x2"]))
    assert torch.equal(obj.sub_embeddings(other)["Z_U1"], parts["Z_U1"])
    assert not torch.equal(obj.sub_embeddings(other)["Z_U2"], parts["Z_U2"])
    # an objective that does not factorize its representation has no parts
    rus_manifest, rus_arrays = rus
    assert build_objective(small_config("tuple"), rus_manifest).sub_embeddings(
        batch_of(rus_arrays, 4)) == {}


def test_factorcl_sup_conditions_on_labels(factorcl_data):
    """The label is the context C: permuting it changes exactly the terms conditioned on C
    (and I_NCE(Xi;Ci)), never I_NCE(X1;X2) or I_CLUB(X1;X2)."""
    manifest, arrays = factorcl_data
    obj = build_objective(small_config("factorcl_sup", "objective.negatives=0"), manifest)
    assert obj.label_column in arrays
    batch = batch_of(arrays)
    shuffled = {**batch, obj.label_column: batch[obj.label_column].roll(1)}
    assert not torch.equal(shuffled[obj.label_column], batch[obj.label_column])
    with torch.no_grad():
        true, wrong = (obj([batch, batch], labels).metrics for labels in (batch, shuffled))
    for term in ("nce_x1x2", "club_x1x2"):
        assert true[term] == wrong[term], term
    for term in ("club_x1x2_cond", "nce_x1c1", "nce_x2c2", "nce_x1x2_cond"):
        assert true[term] != wrong[term], term


def test_supcon_needs_a_classification_label(rus):
    manifest, _ = rus
    no_labels = manifest.select(None, [])
    with pytest.raises(ObjectiveError, match="classification label"):
        build_objective(small_config("supcon"), no_labels)


def test_one_view_cross_is_clip_between_the_modalities_of_one_view(rus):
    """cross on one view: for every modality pair (a, b), the symmetric InfoNCE of a's and
    b's projections of the same tuples; checked against explicit loops."""
    manifest, arrays = rus
    obj = build_objective(small_config("cross"), manifest)
    assert obj.num_views == 1
    batch = batch_of(arrays, 12)
    loss = obj([batch], batch).loss
    with torch.no_grad():
        z = obj.project(batch)
    tau = obj.cfg.temperature
    pairs = [(a, b) for i, a in enumerate(obj.modalities) for b in obj.modalities[i + 1:]]
    expected = 0.0
    for a, b in pairs:
        for x, y in ((z[a], z[b]), (z[b], z[a])):
            for i in range(len(x)):
                logits = [float(x[i] @ y[j]) / tau for j in range(len(y))]
                expected += -(logits[i] - math.log(sum(math.exp(v) for v in logits))) \
                    / (2 * len(x) * len(pairs))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(obj.encoder.encoders[m].parameters().__next__().grad is not None
               for m in obj.modalities)
