"""Cross-modal retrieval: exact ranks in chunks, chance on shuffled pairs, the Parquet path,
and which objectives have a space shared by their modalities."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmcl import config
from mmcl.data.synth import make_arrays
from mmcl.evaluate.embed import _tensor_column, shared_column, split_folder
from mmcl.evaluate.retrieval import (array_source, retrieval_from_parquet, retrieval_metrics,
                                     retrieval_ranks)
from mmcl.objectives import build_objective

SMALL = ["model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
         "model.proj_dim=16", "model.fusion_heads=2"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identical_embeddings_retrieve_their_pair_first():
    x = _unit(np.random.default_rng(0).normal(size=(300, 16)))
    r = retrieval_metrics(x, x, chunk_rows=64, names=("a", "b"))
    for way in ("a_to_b", "b_to_a"):
        assert r[way]["recall@1"] == 1.0 and r[way]["median_rank"] == 1.0
        assert r[way]["chance@1"] == pytest.approx(1 / 300)
        assert r[way]["chance@10"] == pytest.approx(10 / 300)
    assert r["n"] == 300


def test_shuffled_pairs_score_chance_within_noise():
    rng = np.random.default_rng(1)
    n = 2000
    a = _unit(rng.normal(size=(n, 8)))
    b = _unit(a + 0.1 * rng.normal(size=(n, 8)))[rng.permutation(n)]   # pairs broken
    r = retrieval_metrics(a, b, chunk_rows=512)
    for way in ("a_to_b", "b_to_a"):
        for k in (1, 5, 10):
            p = k / n   # binomial noise of a recall over n queries: sqrt(p(1-p)/n)
            assert abs(r[way][f"recall@{k}"] - p) < 4 * np.sqrt(p * (1 - p) / n) + 1 / n
        assert abs(r[way]["median_rank"] - (n + 1) / 2) < 0.1 * n


def test_chunked_ranks_equal_unchunked_exactly():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(257, 6))
    b = a + rng.normal(size=(257, 6))
    whole = retrieval_ranks(array_source(a, b, chunk_rows=10_000))
    for chunk in (5, 64, 256):
        parts = retrieval_ranks(array_source(a, b, chunk_rows=chunk))
        for x, y in zip(whole, parts):
            np.testing.assert_array_equal(x, y)
    # the same ranks as a plain N x N argsort (no ties in continuous data)
    scores = a @ b.T
    rank_ab = (scores > np.diag(scores)[:, None]).sum(axis=1) + 1
    rank_ba = (scores.T > np.diag(scores)[:, None]).sum(axis=1) + 1
    np.testing.assert_array_equal(whole[1], rank_ab)
    np.testing.assert_array_equal(whole[2], rank_ba)


def test_retrieval_over_parquet_in_chunks_matches_memory(tmp_path):
    """Rows out of id order across several files (as Ray writes them): the same figures."""
    rng = np.random.default_rng(3)
    n = 200
    a = _unit(rng.normal(size=(n, 4)))
    b = _unit(a + 0.5 * rng.normal(size=(n, 4)))
    folder = tmp_path / split_folder("test")
    folder.mkdir()
    order = rng.permutation(n)
    for i, rows in enumerate(np.array_split(order, 3)):
        pq.write_table(pa.table({"id": pa.array(rows + 1000, pa.int64()),
                                 shared_column("a"): _tensor_column(a[rows]),
                                 shared_column("b"): _tensor_column(b[rows])}),
                       folder / f"part-{i}.parquet")
    from_files = retrieval_from_parquet(str(tmp_path), "test", "a", "b", chunk_rows=37)
    # float32 on disk: compare with the float32 vectors in memory
    in_memory = retrieval_metrics(a.astype(np.float32), b.astype(np.float32), chunk_rows=n)
    assert from_files == in_memory
    assert 0 < from_files["a_to_b"]["recall@1"] < 1


def test_rows_with_an_absent_side_are_neither_queries_nor_gallery_items():
    """6 tuples, identical unit vectors per pair; tuple 2 lacks b, tuple 4 lacks a, and their
    stored stand-ins score above every true match. Only tuples 0, 1, 3, 5 are queries, each
    finds its own pair first; the a -> b gallery has the 5 rows with b, b -> a the 5 with a."""
    x = _unit(np.random.default_rng(5).normal(size=(6, 8)))
    a, b = x.copy(), x.copy()
    b[2] = 10 * x.sum(axis=0)          # absent b: a vector that beats every match
    a[4] = 10 * x.sum(axis=0)          # absent a: likewise
    has_a = np.array([1, 1, 1, 1, 0, 1], bool)
    has_b = np.array([1, 1, 0, 1, 1, 1], bool)
    r = retrieval_metrics(a, b, chunk_rows=4, present_a=has_a, present_b=has_b)
    assert r["n"] == 4 and r["absent"] == 2
    for way in ("a_to_b", "b_to_a"):
        assert r[way]["recall@1"] == 1.0 and r[way]["median_rank"] == 1.0
        assert r[way]["gallery"] == 5 and r[way]["chance@1"] == pytest.approx(1 / 5)
    _, ab, ba = retrieval_ranks(array_source(a, b, 4, present_a=has_a, present_b=has_b))
    assert len(ab) == 4 and (ab == 1).all() and (ba == 1).all()


def test_same_label_recall_and_map_in_a_hand_case():
    """Query q (label 0) against 4 gallery items scored 0.9 (label 1), 0.8 (0), 0.5 (1),
    0.1 (0): the first item of its label is 2nd, AP = (1/2 + 2/4) / 2 = 0.5."""
    from mmcl.evaluate.retrieval import label_figures

    q = np.array([[1.0, 0.0]])
    gallery = np.array([[0.9, 0], [0.8, 0], [0.5, 0], [0.1, 0]])
    f = label_figures(q, np.array([0]), gallery, np.array([1, 0, 1, 0]), ks=(1, 2))
    assert f["label_recall@1"] == 0.0 and f["label_recall@2"] == 1.0
    assert f["label_mAP"] == pytest.approx(0.5)
    assert f["label_chance@1"] == pytest.approx(0.5)


def test_same_label_figures_match_sklearn_with_absent_rows_and_ties():
    """Random pairs in 3 classes, some sides absent, integer vectors so scores tie: the
    label recall@k and mAP of each direction against a per-query scikit-learn oracle."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(7)
    n = 90
    labels = rng.integers(0, 3, n)
    centres = rng.normal(size=(3, 4))
    # small integers: dot products are exact, so ties are ties in every order of summation
    a = np.round(2 * (centres[labels] + 0.8 * rng.normal(size=(n, 4))))
    b = np.round(2 * (centres[labels] + 0.8 * rng.normal(size=(n, 4))))
    has_a, has_b = rng.random(n) > 0.15, rng.random(n) > 0.15
    r = retrieval_metrics(a, b, chunk_rows=16, present_a=has_a, present_b=has_b,
                          labels=labels, ks=(1, 5))
    q = has_a & has_b
    for way, (qx, gx, g) in {"a_to_b": (a, b, has_b), "b_to_a": (b, a, has_a)}.items():
        aps, hit1, hit5 = [], [], []
        for i in np.flatnonzero(q):
            scores = gx[g] @ qx[i]
            relevant = labels[g] == labels[i]
            aps.append(average_precision_score(relevant, scores))
            best = scores[relevant].max()
            rank = 1 + (scores > best).sum()
            hit1.append(rank <= 1)
            hit5.append(rank <= 5)
        assert r[way]["label_mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
        assert r[way]["label_recall@1"] == pytest.approx(np.mean(hit1))
        assert r[way]["label_recall@5"] == pytest.approx(np.mean(hit5))
        assert r[way]["label_recall@1"] >= r[way]["recall@1"]
    assert r["label"] == "label" and r["n"] == int(q.sum())


def test_parquet_retrieval_reads_presence_and_label_columns(tmp_path):
    """The embedding output's `<m>__present` and label columns: the figures of memory."""
    rng = np.random.default_rng(8)
    n = 60
    labels = rng.integers(0, 4, n)
    a, b = _unit(rng.normal(size=(n, 4))), _unit(rng.normal(size=(n, 4)))
    has_b = rng.random(n) > 0.2
    folder = tmp_path / split_folder("test")
    folder.mkdir()
    order = rng.permutation(n)
    for i, rows in enumerate(np.array_split(order, 2)):
        pq.write_table(pa.table({"id": pa.array(rows, pa.int64()),
                                 shared_column("a"): _tensor_column(a[rows]),
                                 shared_column("b"): _tensor_column(b[rows]),
                                 "b__present": pa.array(has_b[rows]),
                                 "digit": pa.array(labels[rows], pa.int64())}),
                       folder / f"part-{i}.parquet")
    from_files = retrieval_from_parquet(str(tmp_path), "test", "a", "b", chunk_rows=7,
                                        label="digit")
    in_memory = retrieval_metrics(a.astype(np.float32), b.astype(np.float32), chunk_rows=n,
                                  present_b=has_b, labels=labels, label="digit")
    for key, value in in_memory.items():   # rows in another order: sums to rounding
        assert from_files[key] == (pytest.approx(value) if key.endswith("_to_b") or
                                   key.endswith("_to_a") else value), key
    assert from_files["n"] == int(has_b.sum()) and from_files["b_to_a"]["gallery"] == n


def _objective(name: str, preset: str, *extra):
    manifest, arrays = make_arrays(preset, 64, seed=0)
    cfg = config.load(None, [f"objective.name={name}", *SMALL, *extra])
    torch.manual_seed(0)
    obj = build_objective(cfg, manifest).eval()
    batch = {m: torch.as_tensor(arrays[m][:32], dtype=torch.float32)
             for m in manifest.modality_names}
    return obj, batch


@pytest.mark.parametrize("name,preset,extra,modalities", [
    ("cross", "rus", (), ["a", "b", "c"]),
    ("cross_self", "rus", (), ["a", "b", "c"]),
    ("comm", "rus", (), ["a", "b", "c"]),
    ("factorcl_ssl", "factorcl", ("objective.critic=separable", "objective.critic_hidden=16"),
     ["x1", "x2"]),
    ("factorcl_ssl", "factorcl", ("objective.critic=concat", "objective.critic_hidden=16"), []),
    ("tuple_infonce", "rus", (), []),
    ("tuple", "rus", (), []),
])
def test_which_objectives_share_a_space_between_modalities(name, preset, extra, modalities):
    obj, batch = _objective(name, preset, *extra)
    shared = obj.shared_embeddings(batch)
    assert sorted(shared) == sorted(modalities)
    for m, z in shared.items():
        assert z.shape[0] == 32 and torch.isfinite(z).all()


def test_cross_shared_space_is_the_one_its_loss_compares():
    obj, batch = _objective("cross", "rus")
    shared = obj.shared_embeddings(batch)
    projected = obj.project(batch)
    for m in shared:
        torch.testing.assert_close(shared[m], projected[m])
        torch.testing.assert_close(shared[m].norm(dim=1), torch.ones(32))


def test_eval_reports_retrieval_for_a_cross_run_and_names_pairs_without_space(tmp_path):
    """One tiny CLIP-style run on the 3-modality data, evaluated in process: every pair is
    scored both ways with its chance, in report.json and report.md."""
    from mmcl.evaluate.diagnostics import ProbeSettings
    from mmcl.evaluate.report import evaluate_run
    from mmcl.train import launcher

    tiny = ["data.synth.n=300", "train.epochs=1", "train.batch_size=50",
            "train.warmup_epochs=0", *SMALL, f"storage.path={tmp_path}"]
    cross = launcher.pretrain(config.load(None, ["objective.name=cross", *tiny,
                                                 "storage.name=cross"]),
                              in_process=True).run_url
    settings = ProbeSettings(l2_grid=(1e-2,), few_label_k=(), knn_k=5)
    report = evaluate_run(cross, settings=settings, use_ray=False)
    retrieval = report["retrieval"]
    assert sorted(retrieval["pairs"]) == ["a:b", "a:c", "b:c"]
    n_test = report["rows_embedded"]["test"]
    ab = retrieval["pairs"]["a:b"]
    assert ab["n"] == n_test and ab["a_to_b"]["chance@5"] == pytest.approx(5 / n_test)
    assert 1 <= ab["b_to_a"]["median_rank"] <= n_test
    assert "knn" in report["labels"]["y"] and report["labels"]["y"]["knn"]["fused"]["k"] == 5
    md = open(os.path.join(cross, "eval", "report.md")).read()
    assert "Cross-modal retrieval" in md and "a → b" in md and "kNN" in md
    # The data's class label gives same-label figures beside the exact-row ones.
    assert retrieval["label"] == "y" and "same y R@1" in md
    assert ab["a_to_b"]["label_recall@1"] >= ab["a_to_b"]["recall@1"]
    assert 0 < ab["a_to_b"]["label_mAP"] <= 1

    # asking for one pair only; an objective on fused tuples has no shared space
    settings = ProbeSettings(l2_grid=(1e-2,), few_label_k=(), knn_k=0, retrieval=("c:a",))
    report = evaluate_run(cross, settings=settings, use_ray=False)
    assert list(report["retrieval"]["pairs"]) == ["c:a"]
    assert "c_to_a" in report["retrieval"]["pairs"]["c:a"]


def _recipe():
    """configs/recipes/captioned_shapes.py (the README's retrieval table), as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "recipes" / "captioned_shapes.py"
    spec = importlib.util.spec_from_file_location("captioned_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_captioned_shapes_test_captions_are_distinct_and_tokenize_without_unknowns(tmp_path):
    """The recipe's test split holds every triplet once, so no two test captions tie in
    retrieval; its tokenizer knows every caption word and captions fit max_len."""
    from transformers import AutoTokenizer

    recipe = _recipe()
    rows = recipe.triplets(n_train=30, n_val=10, seed=0)
    test = [t for split, t in rows if split == "test"]
    captions = {recipe.caption(*t) for t in test}
    assert len(test) == len(captions) == 1000
    assert [split for split, _ in rows].count("train") == 30
    tok = AutoTokenizer.from_pretrained(recipe.write_tokenizer(str(tmp_path / "tok")))
    ids = tok(sorted(captions))["input_ids"]
    assert max(map(len, ids)) <= recipe.MAX_LEN
    assert tok.unk_token_id not in {i for row in ids for i in row}
    assert tok.pad_token_id == 0


def test_shared_embeddings_of_a_loaded_model_see_prepared_inputs():
    """`mmcl embed` wrote shared_<m> from the stored columns as they were (uint8 images in
    0..255, no padding mask, unstandardised vectors): retrieval came out at chance on a
    trained image+text run. The loaded model prepares them as in training."""
    from mmcl.data.prepare import Preparer
    from mmcl.train.checkpoint import TrainedModel

    obj, batch = _objective("cross", "rus")
    manifest = make_arrays("rus", 64, seed=0)[0]
    cfg = config.load(None, ["objective.name=cross", *SMALL])
    model = TrainedModel(obj, cfg, manifest)
    raw = {m: (3.0 * v + 5.0).numpy() for m, v in batch.items()}
    shared = model.shared_embeddings(raw)
    prepared = Preparer.for_run(manifest, cfg.data)(
        {m: torch.as_tensor(v) for m, v in raw.items()})
    expected = obj.shared_embeddings(prepared)
    for m in expected:
        torch.testing.assert_close(shared[m], expected[m])
