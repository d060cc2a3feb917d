"""The bimodal Trifeature generator (mmcl.data.trifeature): what CoMM's benchmark needs of the
pairs (a shared shape, own textures, the synergy rule, biased pretraining vs unbiased probing)
and of the renders (each attribute visible, every render different). No Ray: the import path
runs in test_fidelity's smoke test."""

import csv

import numpy as np
import pytest

from mmcl.data import trifeature as tf


def test_pairs_share_the_shape_and_draw_the_rest_independently():
    pairs = tf.draw_pairs(4000, seed=3)
    unbiased = pairs.biased == 0
    # both images of a pair have one shape column: the shape is the shared attribute; the
    # textures are each image's own and agree only by chance (1 in 10) on unbiased pairs
    agree = np.mean(pairs.texture1[unbiased] == pairs.texture2[unbiased])
    assert 0.05 < agree < 0.15
    for col in (pairs.shape, pairs.texture1, pairs.texture2, pairs.color1, pairs.color2):
        assert set(np.unique(col)) == set(range(10))


def test_synergy_is_one_exactly_for_the_correlated_texture_colour_pairs():
    seed = 5
    pairs = tf.draw_pairs(3000, seed)
    pairing = tf.correlated_pairs(seed)
    assert sorted(pairing) == list(range(10))       # 10 pairs, each texture and colour once
    expected = (pairs.color2 == pairing[pairs.texture1]).astype(int)
    assert np.array_equal(pairs.synergy, expected)
    # the rule reads texture 1 and colour 2, not colour 1 / texture 2
    assert not np.array_equal(pairs.synergy, (pairs.color1 == pairing[pairs.texture2]))
    assert not np.array_equal(tf.correlated_pairs(seed + 1), pairing)


def test_biased_pairs_are_train_only_and_always_correlated():
    n = 2000
    pairs = tf.draw_pairs(n, seed=1)
    sizes = tf.split_sizes(n)
    assert sum(sizes.values()) == n
    biased = pairs.biased == 1
    assert biased.sum() == sizes["train_biased"]
    assert set(pairs.split[biased]) == {"train"}
    assert (pairs.synergy[biased] == 1).all()        # colour 2 = pairing[texture 1]
    assert (pairs.split == "train").sum() == sizes["train_biased"] + sizes["train_unbiased"]
    assert (pairs.split == "val").sum() == sizes["val"]
    assert (pairs.split == "test").sum() == sizes["test"]
    # unbiased pairs (probe-train, val, test): synergy balanced, and texture 1 still says
    # nothing about it on its own (every texture is correlated in about half its pairs)
    rate = pairs.synergy[~biased].mean()
    assert 0.45 < rate < 0.55
    per_texture = [pairs.synergy[~biased & (pairs.texture1 == t)].mean() for t in range(10)]
    assert max(per_texture) < 0.7 and min(per_texture) > 0.3


def test_renders_show_each_attribute_and_differ_every_time():
    size = 32
    rng = np.random.default_rng(0)
    a = tf.render(2, 4, 0, size, rng)
    b = tf.render(2, 4, 0, size, rng)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)                  # position, rotation, texture phase
    # colour: the shape's brightest pixels have the colour's hue (red: R >> G, B)
    red = tf.render(0, 0, list(tf.COLORS).index("red"), size, rng).astype(int)
    inside = red[..., 0] > 200
    assert inside.sum() > 50 and (red[inside][:, 1] < 60).all()
    # texture: solid is one flat colour inside the shape, stripes are two levels
    solid = tf.texture(tf.TEXTURES.index("solid"), size, rng)
    stripes = tf.texture(tf.TEXTURES.index("hstripes"), size, rng)
    assert np.unique(solid).tolist() == [1.0]
    assert np.unique(stripes).tolist() == [0.0, 1.0] and (stripes == stripes[:, :1]).all()
    # shape: every shape covers a different share of the image
    areas = [tf.shape_mask(s, 64, np.random.default_rng(1)).sum() for s in range(10)]
    assert all(a > 100 for a in areas) and len({round(a) for a in areas}) == 10


def test_write_trifeature_writes_pngs_a_table_and_an_import_spec(tmp_path):
    from PIL import Image

    from mmcl.data.ingest import load_spec

    table = tf.write_trifeature(str(tmp_path), n=40, seed=0, size=16)
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    first = rows[0]
    assert Image.open(tmp_path / first["image1"]).size == (16, 16)
    assert set(tf.LABELS) | {"id", "image1", "image2", "split"} == set(first)
    spec = load_spec(str(tmp_path / tf.IMPORT_SPEC))
    assert set(spec.modalities) == {"image1", "image2"}
    assert spec.split_column == "split" and spec.labels["shape"].num_classes == 10


def test_too_small_inputs_are_data_errors(tmp_path):
    from mmcl.data.schema import DataError
    from mmcl.data.synth import generate

    with pytest.raises(DataError, match="at least 64 pairs"):
        generate("trifeature", str(tmp_path / "d"), n=10)
    with pytest.raises(DataError, match="image-size"):
        generate("trifeature", str(tmp_path / "d"), n=100, image_size=8)
    assert not (tmp_path / "d").exists()
