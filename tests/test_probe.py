"""Linear probes: logistic/ridge fits, metrics, L2 selection and few-label subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcl.evaluate.probe import (balanced_accuracy, few_label_subset, fit_probe, score,
                                 select_l2)



def blobs(n: int, seed: int, scale: float = 1.0, offset: float = 0.0):
    """Three well separated classes in 5-D (features on an arbitrary scale)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4, 0, 0, 0, 0], [0, 4, 0, 0, 0], [0, 0, 4, 0, 0]], float)
    y = rng.integers(0, 3, size=n)
    x = centres[y] + rng.normal(size=(n, 5))
    return (x * scale + offset).astype(np.float32), y


def test_logistic_probe_separates_classes():
    x, y = blobs(600, 0)
    xt, yt = blobs(300, 1)
    probe = fit_probe(x, y, "classification")
    assert probe.num_classes == 3 and probe.weight.shape == (5, 3)
    result = score(probe, xt, yt)
    assert set(result) == {"accuracy", "balanced_accuracy"}
    assert result["accuracy"] > 0.97 and result["balanced_accuracy"] > 0.97


def test_features_are_standardised_with_train_statistics():
    x, y = blobs(600, 0, scale=1e4, offset=-3e5)
    xt, yt = blobs(300, 1, scale=1e4, offset=-3e5)
    probe = fit_probe(x, y, "classification", max_iter=50)
    assert torch.allclose(probe.mean, torch.as_tensor(x, dtype=torch.float64).mean(0))
    assert score(probe, xt, yt)["accuracy"] > 0.97


def test_balanced_accuracy_differs_from_accuracy_on_imbalanced_data():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=2000) < 0.1).astype(np.int64)  # 10% positives
    x = rng.normal(size=(2000, 3))                       # features carry nothing
    probe = fit_probe(x[:1500], y[:1500], "classification", num_classes=2)
    result = score(probe, x[1500:], y[1500:])
    assert result["accuracy"] > 0.85        # predicts the majority class
    assert result["balanced_accuracy"] == pytest.approx(0.5, abs=0.02)
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.5


def test_ridge_probe_r2():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 6))
    w = rng.normal(size=6)
    y = x @ w + 3.0 + 0.05 * rng.normal(size=800)
    probe = fit_probe(x[:600], y[:600], "regression")
    assert score(probe, x[600:], y[600:])["r2"] > 0.99
    assert probe.predict(x[600:]).shape == (200,)
    noise = rng.normal(size=800)
    probe = fit_probe(x[:600], noise[:600], "regression")
    assert score(probe, x[600:], noise[600:])["r2"] < 0.05


def test_l2_shrinks_weights_and_fits_are_deterministic():
    x, y = blobs(400, 3)
    weak = fit_probe(x, y, "classification", l2=1e-4)
    strong = fit_probe(x, y, "classification", l2=1.0)
    assert strong.weight.norm() < 0.5 * weak.weight.norm()
    again = fit_probe(torch.as_tensor(x), torch.as_tensor(y), "classification", l2=1e-4)
    assert torch.equal(weak.weight, again.weight) and torch.equal(weak.bias, again.bias)


def test_select_l2_picks_the_best_validation_score():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 40))
    y = (x[:, 0] + 2 * rng.normal(size=120) > 0).astype(np.int64)
    grid = (1e-5, 1e-2, 1.0)
    chosen = select_l2(x[:60], y[:60], x[60:], y[60:], "classification", grid=grid)
    scores = {l2: score(fit_probe(x[:60], y[:60], "classification", l2=l2), x[60:], y[60:])
              ["balanced_accuracy"] for l2 in grid}
    assert chosen.l2 in grid
    assert scores[chosen.l2] == max(scores.values())


def test_probe_input_errors():
    x, y = blobs(50, 0)
    with pytest.raises(ValueError, match="targets"):
        fit_probe(x, y[:-1], "classification")
    with pytest.raises(ValueError, match="task"):
        fit_probe(x, y, "ranking")
    with pytest.raises(ValueError, match="0..1"):
        fit_probe(x, y, "classification", num_classes=2)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(x, y, "classification")


def test_few_label_subset():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    idx = few_label_subset(labels, per_class=5, seed=0)
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert np.bincount(labels[idx]).tolist() == [5, 5, 3]
    np.testing.assert_array_equal(idx, few_label_subset(labels, per_class=5, seed=0))
    assert not np.array_equal(idx, few_label_subset(labels, per_class=5, seed=1))
    with pytest.raises(ValueError):
        few_label_subset(labels, per_class=0, seed=0)


# ------------------------------------------------- scikit-learn as the probe's oracle
# mmcl minimises  mean CE + l2 ||W||^2  (W: D x C, softmax over C outputs, bias free);
# sklearn minimises  C * sum CE + 0.5 ||w||^2.  Dividing sklearn's by C n:  1 / (2 C n) = l2
# for the multinomial case. For two classes sklearn fits one vector w = w_1 - w_0; at mmcl's
# optimum w_0 = -w_1, so mmcl's penalty is (l2 / 2) ||w||^2 and C = 1 / (n l2).
# Ridge: mmcl  0.5 mean ||zW + b - y||^2 + l2 ||W||^2;  sklearn  ||y - zW - b||^2 + alpha
# ||W||^2, so alpha = 2 n l2.

sklearn = pytest.importorskip("sklearn")


def _standardised(x_fit, x_other):
    from sklearn.preprocessing import StandardScaler   # population std, as mmcl's probe

    scaler = StandardScaler().fit(x_fit)
    return scaler.transform(x_fit), scaler.transform(x_other)


def _noisy_classes(n, classes, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 6)) * 1.2
    y = rng.integers(0, classes, size=n)
    x = (centres[y] + rng.normal(size=(n, 6))) * rng.uniform(0.5, 20, size=6) + 3.0
    return x, y


@pytest.mark.parametrize("classes,l2", [(3, 1e-3), (3, 1e-1), (2, 1e-2)])
def test_logistic_probe_matches_sklearn(classes, l2):
    from sklearn.linear_model import LogisticRegression

    x, y = _noisy_classes(1200, classes, seed=classes)
    xtr, ytr, xte, yte = x[:800], y[:800], x[800:], y[800:]
    probe = fit_probe(xtr, ytr, "classification", classes, l2=l2, max_iter=500)
    n = len(xtr)
    c = 1.0 / (2 * n * l2) if classes > 2 else 1.0 / (n * l2)
    ztr, zte = _standardised(xtr, xte)
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=5000).fit(ztr, ytr)
    ours = score(probe, xte, yte)["accuracy"]
    assert abs(ours - ref.score(zte, yte)) <= 0.01
    w = probe.weight.numpy().T                                    # (C, D)
    if classes == 2:
        w = (w[1] - w[0])[None]                                   # sklearn's one vector
    np.testing.assert_allclose(w, ref.coef_, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("l2", [1e-4, 1e-1])
def test_ridge_probe_matches_sklearn(l2):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 8)) * rng.uniform(0.1, 10, size=8) - 2.0
    y = x @ rng.normal(size=(8, 2)) + rng.normal(size=(500, 2))
    probe = fit_probe(x[:400], y[:400], "regression", l2=l2)
    ztr, zte = _standardised(x[:400], x[400:])
    ref = Ridge(alpha=2 * 400 * l2).fit(ztr, y[:400])
    np.testing.assert_allclose(probe.weight.numpy().T, ref.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(probe.decision(x[400:]).numpy(), ref.predict(zte),
                               rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------- kNN


def test_knn_probe_votes_by_temperature_weighted_cosine():
    from mmcl.evaluate.knn import knn_predict, knn_probe

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(60, 4))
    labels = rng.integers(0, 3, size=60)
    queries = rng.normal(size=(25, 4))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)   # noqa: E731
    sims = unit(queries) @ unit(bank).T
    expected = []
    for row in sims:            # the rule written out: k nearest, exp(s / T) per class
        top = np.argsort(-row)[:20]
        votes = np.bincount(labels[top], weights=np.exp(row[top] / 0.07), minlength=3)
        expected.append(int(np.argmax(votes)))
    np.testing.assert_array_equal(knn_predict(bank, labels, queries, 3, chunk_rows=7),
                                  expected)
    x, y = blobs(300, seed=4)
    result = knn_probe(x[:150], y[:150], x[150:200], y[150:200], x[200:], y[200:])
    assert result["accuracy"] > 0.9 and result["k"] == 20 and result["temperature"] == 0.07


# ----------------------------------------------------------------------- multi-label


def _multilabel_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    logits = x @ rng.normal(size=(6, 4)) + np.array([0.0, -1.0, 1.0, -2.0])
    return x, (logits + rng.logistic(size=logits.shape) > 0).astype(np.uint8)


def test_multilabel_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, f1_score

    from mmcl.evaluate.probe import multilabel_metrics

    rng = np.random.default_rng(0)
    y = (rng.random((200, 5)) < [0.5, 0.2, 0.05, 0.7, 0.3]).astype(np.uint8)
    scores = np.clip(0.6 * y + rng.random((200, 5)) * 0.7, 0, 1).round(2)   # with ties
    ours = multilabel_metrics(y, scores)
    pred = (scores >= 0.5).astype(int)
    assert ours["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert ours["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro",
                                                      zero_division=0))
    assert ours["map"] == pytest.approx(average_precision_score(y, scores, average="macro"))


def test_multilabel_probe_is_one_vs_rest_logistic_as_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from mmcl.evaluate.probe import fit_multilabel_probe, multilabel_probe, multilabel_scores

    x, y = _multilabel_data(900, seed=1)
    probes = fit_multilabel_probe(x[:600], y[:600], l2=1e-2, max_iter=300)
    z_tr, z_te = _standardised(x[:600], x[600:])
    for j, p in enumerate(probes):            # binary heads: C = 1 / (n l2), see above
        ref = LogisticRegression(C=1 / (600 * 1e-2), tol=1e-10, max_iter=5000).fit(
            z_tr, y[:600, j])
        w = p.weight.numpy()
        np.testing.assert_allclose(w[:, 1] - w[:, 0], ref.coef_[0], rtol=2e-3, atol=2e-4)
        ours = (multilabel_scores(probes, x[600:])[:, j] >= 0.5).astype(int)
        assert abs(f1_score(y[600:, j], ours) -
                   f1_score(y[600:, j], ref.predict(z_te))) <= 0.01
    res = multilabel_probe(x[:500], y[:500], x[500:700], y[500:700], x[700:], y[700:])
    assert set(res.metrics) == {"micro_f1", "macro_f1", "map"} and res.metrics["map"] > 0.6
    assert res.l2 in res.val_scores and res.train_rows == 700


def test_multilabel_columns_are_probed_one_vs_rest_in_probe_columns():
    """A label column of task "multilabel" ((N, K) multi-hot) gets micro/macro-F1 and mAP,
    and its chance is the train+val prevalence."""
    from types import SimpleNamespace

    from mmcl.evaluate.diagnostics import ProbeSettings, probe_columns

    x, y = _multilabel_data(600, seed=2)
    spec = SimpleNamespace(name="genres", role="label", task="multilabel", num_classes=4,
                           carried_by=(), description="")
    cut = {"train": slice(0, 400), "val": slice(400, 500), "test": slice(500, 600)}
    splits = {s: {"genres": y[c]} for s, c in cut.items()}
    kinds = {s: {"fused": x[c]} for s, c in cut.items()}
    out = probe_columns(splits, [spec], kinds, ProbeSettings(l2_grid=(1e-3, 1e-1)))
    entry = out["genres"]
    assert entry["primary_metric"] == "macro_f1"
    assert set(entry["probes"]["fused"]) >= {"micro_f1", "macro_f1", "map", "l2"}
    assert entry["probes"]["fused"]["map"] > entry["chance"]["map"]
    assert entry["knn"] == {} and entry["few_label"] == {}


# --------------------------------------------------- batched few-label draws, probe cache


def test_subset_heads_are_the_probes_fitted_alone():
    from mmcl.evaluate.probe import fit_subset_heads

    x, y = blobs(300, 3)
    rows = [np.arange(0, 40), np.arange(100, 190), np.arange(50, 80)]
    heads = fit_subset_heads(x, rows, [y[r] for r in rows], [3, 3, 3],
                             [[1e-2, 1e-1], [1e-2], [1e-1]], max_iter=200)
    assert [len(h) for h in heads] == [2, 1, 1]
    for r, fitted in zip(rows, heads):
        for probe in fitted:   # strongly convex: one minimiser, joint or alone
            alone = fit_probe(x[r], y[r], "classification", 3, probe.l2, max_iter=200)
            assert torch.allclose(probe.mean, alone.mean) and torch.allclose(probe.std, alone.std)
            assert torch.allclose(probe.weight, alone.weight, atol=1e-4)


def test_batched_few_label_probes_give_the_per_column_figures():
    """Same draws, same minimisers: equal up to the optimiser's tolerance. (With penalties
    too weak for L-BFGS to converge on a separable draw in max_iter, joint and separate runs
    stop at different separating weights: the default grid's few-label means moved by up to
    0.013 on the README demo, inside their spread over seeds; docs/performance.md.)"""
    from mmcl.evaluate.probe import few_label_probe, few_label_probes

    GRID = (1e-2, 1e-1)
    (xt, yt), (xv, yv), (xs, ys) = blobs(400, 4), blobs(120, 5), blobs(120, 6)
    other = (xt[:, 0] > 2).astype(int), (xv[:, 0] > 2).astype(int), (xs[:, 0] > 2).astype(int)
    both = few_label_probes(xt, {"y": yt, "o": other[0]}, xv, {"y": yv, "o": other[1]},
                            xs, {"y": ys, "o": other[2]}, [5, 10], [0, 1], {"y": 3, "o": 2},
                            grid=GRID)
    for name, (a, b, c), classes in (("y", (yt, yv, ys), 3), ("o", other, 2)):
        alone = few_label_probe(xt, a, xv, b, xs, c, [5, 10], [0, 1], classes, grid=GRID)
        assert set(both[name]) == {5, 10}
        for k in (5, 10):
            for metric, stats in alone[k].items():
                assert both[name][k][metric]["n"] == stats["n"] == 2
                assert abs(both[name][k][metric]["mean"] - stats["mean"]) < 0.01, (name, k)


def _raw_splits(seed_offset=0):
    from mmcl.data.schema import LabelSpec

    parts = {}
    for i, split in enumerate(("train", "val", "test")):
        x, y = blobs(120, 10 + i + seed_offset)
        parts[split] = {"id": np.arange(120) + 1000 * i, "a": x[:, :3], "b": x[:, 3:], "y": y}
    return parts, [LabelSpec("y", "classification", 3)]


def test_raw_feature_probes_are_cached_by_content_as_json(tmp_path):
    import json

    from mmcl.evaluate import diagnostics as diag
    from mmcl.evaluate.cache import ProbeCache

    parts, specs = _raw_splits()
    settings = diag.ProbeSettings(l2_grid=(1e-3, 1e-1), few_label_k=(5,),
                                  few_label_seeds=(0,), knn_k=5)
    kinds = {s: {**diag.feature_kinds({"embedding": p["a"] * 2, "embedding_a": p["a"],
                                       "raw_a": p["a"], "raw_b": p["b"]}, ["a"], ["a", "b"])}
             for s, p in parts.items()}
    cache = ProbeCache(str(tmp_path / "cache"))
    first = diag.probe_columns(parts, specs, kinds, settings, cache=cache)
    assert (cache.hits, cache.misses) == (0, 3)            # raw:a, raw:b, raw:all; not emb
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 3 and all(json.loads(f.read_text())["format"] == 1 for f in files)
    again = ProbeCache(str(tmp_path / "cache"))
    second = diag.probe_columns(parts, specs, kinds, settings, cache=again)
    assert (again.hits, again.misses) == (3, 0)
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)
    # other settings or other rows are other keys; a damaged file is refitted, not read
    other = ProbeCache(str(tmp_path / "cache"))
    diag.probe_columns(parts, specs, kinds, diag.ProbeSettings(l2_grid=(1e-2,), knn_k=0,
                                                               few_label_k=()), cache=other)
    assert other.hits == 0
    files[0].write_text("{not json")
    damaged = ProbeCache(str(tmp_path / "cache"))
    diag.probe_columns(parts, specs, kinds, settings, cache=damaged)
    assert (damaged.hits, damaged.misses) == (2, 1)
    changed, _ = _raw_splits(seed_offset=50)
    kinds2 = {s: diag.feature_kinds({"embedding": p["a"], "embedding_a": p["a"],
                                     "raw_a": p["a"], "raw_b": p["b"]}, ["a"], ["a", "b"])
              for s, p in changed.items()}
    fresh = ProbeCache(str(tmp_path / "cache"))
    diag.probe_columns(changed, specs, kinds2, settings, cache=fresh)
    assert fresh.hits == 0


def test_online_probe_scores_a_held_out_slice_and_shows_in_the_epoch_line():
    from mmcl.evaluate.online import OnlineProbe, probe_metric_name
    from mmcl.data.schema import LabelSpec
    from mmcl.train.console import epoch_line

    x, y = blobs(200, 7)
    probe = OnlineProbe(2, {"id": np.arange(200), "y": y, "a": x},
                        [LabelSpec("y", "classification", 3)], ["a"])
    assert probe.active and not probe.due(0) and probe.due(1)
    figures = probe.score(x)
    assert list(figures) == [probe_metric_name("y")] and figures["probe_y"] > 0.95
    noise = probe.score(np.random.default_rng(0).normal(size=x.shape))
    assert noise["probe_y"] < 0.6
    line = epoch_line({"epoch": 2, "step": 10, "loss": 1.0, **figures}, 5)
    assert f"probe y {figures['probe_y']:.3f}" in line
    assert OnlineProbe(0, {"id": np.arange(200)}).at_epoch_end(None, 0) == {}


# ------------------------------------------------------------- raw reference of every modality


def test_a_modality_above_the_raw_limit_is_projected_not_skipped():
    from mmcl.evaluate.embed import raw_reference, raw_reference_note

    rng = np.random.default_rng(0)
    small = rng.normal(size=(5, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(raw_reference(small, limit=6), small.reshape(5, 6))
    x = rng.normal(size=(64, 10_000)).astype(np.float32)
    z = raw_reference(x, limit=512)
    assert z.shape == (64, 512) and np.isfinite(z).all()
    np.testing.assert_array_equal(z, raw_reference(x, limit=512))   # fixed: same every call
    # A count sketch: every value lands in one feature with a sign, so it is a linear map
    # that keeps sums of squares in expectation (inner products within a few per cent).
    linear = raw_reference(x[:2].sum(0, keepdims=True), limit=512)
    np.testing.assert_allclose(linear[0], z[:2].sum(0), rtol=1e-4, atol=1e-3)
    ratio = (z ** 2).sum(1) / (x ** 2).sum(1)
    assert abs(ratio.mean() - 1) < 0.05
    assert raw_reference_note(10_000, 512).startswith("10000 values through a fixed seeded "
                                                      "random projection to 512")
    assert raw_reference_note(512, 512) is None


def test_eval_gives_every_modality_a_raw_reference_and_says_how(tmp_path, monkeypatch):
    """A run whose modalities (16 values each) are all above a raw limit of 8: each still gets
    raw:<m> (projected to 8 features) and raw:all, and report.json / report.md say how."""
    import os

    from mmcl import config
    from mmcl.evaluate import embed
    from mmcl.evaluate.diagnostics import ProbeSettings
    from mmcl.evaluate.report import evaluate_run
    from mmcl.train import launcher

    sets = ["data.synth.n=300", "train.epochs=1", "train.batch_size=50",
            "train.warmup_epochs=0", "model.embed_dim=16", "model.encoder.hidden=16",
            "model.proj_hidden=16", "model.proj_dim=16", "model.fusion_heads=2",
            f"storage.path={tmp_path}", "storage.name=r", "objective.name=tuple"]
    run = launcher.pretrain(config.load(None, sets), in_process=True).run_url
    monkeypatch.setattr(embed, "RAW_MAX_FEATURES", 8)
    report = evaluate_run(run, settings=ProbeSettings(l2_grid=(1e-2,), few_label_k=(),
                                                      knn_k=0), use_ray=False,
                          probe_cache=False)
    reps = report["representations"]
    for m in ("a", "b", "c"):
        assert "random projection to 8" in reps[f"raw:{m}"]
        assert f"raw:{m}" in report["labels"]["y"]["probes"]
        assert report["embedding"]["columns"][f"raw_{m}"] == 8
    assert "raw:all" in reps
    md = open(os.path.join(run, "eval", "report.md")).read()
    assert "16 values through a fixed seeded random projection to 8" in md


def test_probe_sized_fits_run_on_one_torch_thread(monkeypatch):
    """Issue 35, item 4: a probe is thousands of tiny ops; on several threads each is a
    fork-join that a busy machine stalls (the demo's probes: 72 s on 2 threads at load 10,
    4 s on one). probe_columns fits small problems on one thread and restores the count."""
    from mmcl.evaluate import diagnostics as diag
    from mmcl.evaluate import probe as probe_mod

    seen = []
    real = probe_mod._run_lbfgs

    def recording(params, objective, max_iter):
        seen.append(torch.get_num_threads())
        return real(params, objective, max_iter)

    monkeypatch.setattr(probe_mod, "_run_lbfgs", recording)
    parts, specs = _raw_splits()
    kinds = {s: diag.feature_kinds({"embedding": p["a"], "embedding_a": p["a"],
                                    "raw_a": p["a"], "raw_b": p["b"]}, ["a"], ["a", "b"])
             for s, p in parts.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        diag.probe_columns(parts, specs, kinds, diag.ProbeSettings(
            l2_grid=(1e-2,), few_label_k=(5,), few_label_seeds=(0,), knn_k=0))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2            # restored
        with probe_mod.probe_threads(10**6, 100) as threads:   # a large probe keeps them
            assert threads == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_joint_heads_two_class_as_one_logit_match_sklearn():
    """fit_logistic_heads fits a two-class head as one logit (penalty l2/2 on w = W1 - W0,
    mapped back to (-w/2, w/2)): the same probe as the softmax one; sklearn is the oracle.
    A three-class head in the same joint fit is unchanged."""
    from sklearn.linear_model import LogisticRegression

    from mmcl.evaluate.probe import fit_logistic_heads

    x, y2 = _noisy_classes(800, 2, seed=5)
    y3 = (x[:, 0] > np.median(x[:, 0])).astype(int) + (x[:, 1] > np.median(x[:, 1]))
    two, three = fit_logistic_heads(x, [y2, y3], [2, 3], [1e-2, 1e-3], max_iter=500)
    z, _ = _standardised(x, x)
    ref2 = LogisticRegression(C=1.0 / (len(x) * 1e-2), tol=1e-10, max_iter=5000).fit(z, y2)
    w = two.weight.numpy().T
    np.testing.assert_allclose(w[0], -w[1])
    np.testing.assert_allclose((w[1] - w[0])[None], ref2.coef_, rtol=2e-3, atol=2e-4)
    ref3 = LogisticRegression(C=1.0 / (2 * len(x) * 1e-3), tol=1e-10, max_iter=5000).fit(z, y3)
    np.testing.assert_allclose(three.weight.numpy().T, ref3.coef_, rtol=5e-3, atol=5e-4)
    assert (two.predict(x) == ref2.predict(z)).mean() > 0.99
