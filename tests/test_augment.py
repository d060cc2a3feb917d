"""Augmentations: exact identity at strength 0, reproducibility, independence of successive
views, no in-place writes, and each transform changing only what it should."""

import pytest
import torch

from mmcl.config import AugmentConfig, ModalityAugment
from mmcl.data.augment import Augmenter
from mmcl.data.schema import ModalitySpec

VEC = ModalitySpec("vec", (10,), "vector")
SEQ = ModalitySpec("seq", (20, 3), "sequence")
IMG = ModalitySpec("img", (3, 12, 12), "image")
SPECS = [VEC, SEQ, IMG]
OFF = dict(noise=0, dropout=0, time_mask=0, crop=0, mixup=0, flip=0, color_jitter=0)
ALL_ON = dict(noise=0.2, dropout=0.2, time_mask=0.3, crop=0.5, mixup=0.5, flip=0.5,
              color_jitter=0.5)


def augmenter(**strengths) -> Augmenter:
    return Augmenter(SPECS, AugmentConfig(default=ModalityAugment(**{**OFF, **strengths})))


def batch_of(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {s.name: torch.randn(n, *s.shape, generator=g) for s in SPECS}
    batch.update(label=torch.randint(0, 3, (n,), generator=g), id=torch.arange(n),
                 factor=torch.randn(n, generator=g))
    return batch


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_dtypes_and_pass_through():
    batch = batch_of()
    out = augmenter(**ALL_ON)(batch, gen())
    assert out is not batch and set(out) == set(batch)
    for s in SPECS:
        assert out[s.name].shape == batch[s.name].shape
        assert out[s.name].dtype == batch[s.name].dtype
        assert not torch.equal(out[s.name], batch[s.name])
    for key in ("label", "id", "factor"):
        assert out[key] is batch[key]


def test_zero_strengths_are_exactly_the_identity():
    batch = batch_of()
    out = augmenter()(batch, gen())
    for s in SPECS:
        assert torch.equal(out[s.name], batch[s.name])


@pytest.mark.parametrize("strengths", [ALL_ON] + [{k: v} for k, v in ALL_ON.items()],
                         ids=["all"] + list(ALL_ON))
def test_inputs_are_never_modified(strengths):
    batch = batch_of()
    before = {k: v.clone() for k, v in batch.items()}
    augmenter(**strengths)(batch, gen())
    for k, v in batch.items():
        assert torch.equal(v, before[k]), k


def test_same_seed_same_view_and_successive_views_differ():
    aug, batch = augmenter(**ALL_ON), batch_of()
    a, b = aug(batch, gen(7)), aug(batch, gen(7))
    g = gen(7)
    first, second = aug(batch, g), aug(batch, g)
    for s in SPECS:
        assert torch.equal(a[s.name], b[s.name])
        assert torch.equal(first[s.name], a[s.name])
        assert not torch.equal(first[s.name], second[s.name])


def test_per_modality_override():
    cfg = AugmentConfig(default=ModalityAugment(**ALL_ON),
                        per_modality={"seq": ModalityAugment(**OFF)})
    batch = batch_of()
    out = Augmenter(SPECS, cfg)(batch, gen())
    assert torch.equal(out["seq"], batch["seq"])
    assert not torch.equal(out["vec"], batch["vec"])


@pytest.mark.parametrize("name,only", [("time_mask", {"seq"}), ("crop", {"seq", "img"}),
                                       ("flip", {"img"}), ("color_jitter", {"img"}),
                                       ("noise", {"vec", "seq", "img"}),
                                       ("dropout", {"vec", "seq", "img"}),
                                       ("mixup", {"vec", "seq", "img"})])
def test_each_transform_touches_only_the_kinds_it_fits(name, only):
    batch = batch_of()
    out = augmenter(**{name: 1.0})(batch, gen())
    for s in SPECS:
        changed = not torch.equal(out[s.name], batch[s.name])
        assert changed == (s.name in only), (name, s.name)


def test_noise_has_the_configured_std():
    batch = batch_of(n=256)
    out = augmenter(noise=0.3)(batch, gen())
    std = (out["vec"] - batch["vec"]).std().item()
    assert 0.27 < std < 0.33


def test_dropout_zeroes_features_without_rescaling():
    batch = batch_of(n=256)
    out = augmenter(dropout=0.25)(batch, gen())["vec"]
    zeroed = out == 0
    assert torch.equal(out[~zeroed], batch["vec"][~zeroed])  # kept features untouched
    assert 0.2 < zeroed.float().mean().item() < 0.3


def test_time_mask_zeroes_whole_time_steps():
    batch = batch_of()
    out = augmenter(time_mask=0.25)(batch, gen())["seq"]
    x = batch["seq"]
    masked = (out == 0).all(dim=-1)  # (B, T): whole steps zeroed
    assert (masked.sum(dim=1) == 5).all()  # round(0.25 * 20) steps per sample
    assert torch.equal(out[~masked], x[~masked])
    # no partial masking: an entry is zero only where its whole step is
    assert ((out == 0) == masked.unsqueeze(-1).expand_as(out)).all()


def test_sequence_crop_is_a_linear_resampling_of_a_window():
    steps, strength = SEQ.shape[0], 0.5
    ramp = torch.arange(steps, dtype=torch.float32).view(1, steps, 1).expand(32, steps, 3)
    batch = {**batch_of(32), "seq": ramp.contiguous()}
    out = augmenter(crop=strength)(batch, gen())["seq"]
    # Linear interpolation of a ramp: out[j] = start + f * j with f in [1 - s, 1].
    slope = out.diff(dim=1)
    torch.testing.assert_close(slope, slope[:, :1].expand_as(slope))
    assert (slope >= 1 - strength - 1e-5).all() and (slope <= 1 + 1e-5).all()
    assert (out >= -1e-5).all() and (out <= steps - 1 + 1e-5).all()
    assert (slope[:, 0, 0] < 0.99).any()  # some windows really are shorter


def test_image_crop_is_a_zoom_inside_the_image():
    # On a ramp along the width, a crop of width fraction f resampled to w pixels is a ramp of
    # slope f; with strength 0.5, f >= sqrt(0.5 / (4/3)^0.25) > 0.68. Only the outermost
    # pixel of a row may sample the half-pixel margin (clamped to the edge value): a window
    # reaching outside the image would clamp many.
    n, (c, h, w) = 32, IMG.shape
    ramp = torch.arange(w, dtype=torch.float32).expand(n, c, h, w).contiguous()
    batch = {**batch_of(n), "img": ramp}
    out = augmenter(crop=0.5)(batch, gen())["img"]
    inner = out.diff(dim=-1)[..., 1:-1]
    assert (inner >= 0.68).all() and (inner <= 1 + 1e-5).all()
    assert (inner < 0.95).any()  # some crops really zoom in
    assert ((out <= 1e-6).sum(dim=-1) <= 1).all()
    assert ((out >= w - 1 - 1e-6).sum(dim=-1) <= 1).all()
    assert (out >= -1e-5).all() and (out <= w - 1 + 1e-5).all()
    # Bilinear resampling of a constant image inside the image keeps it constant.
    const = {**batch_of(n), "img": torch.full((n, c, h, w), 2.5)}
    torch.testing.assert_close(augmenter(crop=1.0)(const, gen())["img"], const["img"])


def test_flip_flips_whole_samples_with_the_given_probability():
    batch = batch_of(n=64)
    x = batch["img"]
    out = augmenter(flip=0.5)(batch, gen())["img"]
    same = (out == x).flatten(1).all(dim=1)
    flipped = (out == x.flip(-1)).flatten(1).all(dim=1)
    assert (same ^ flipped).all()
    assert 10 < flipped.sum().item() < 54
    assert torch.equal(augmenter(flip=1.0)(batch, gen())["img"], x.flip(-1))


def test_mixup_keeps_each_sample_dominant():
    n, strength = VEC.shape[0], 0.8
    batch = {**batch_of(n), "vec": torch.eye(n)}  # one-hot rows reveal the mixing weights
    out = augmenter(mixup=strength)(batch, gen())["vec"]
    diag = out.diagonal()
    assert (diag >= 1 - strength / 2 - 1e-6).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(n))
    assert ((out > 0).sum(dim=1) <= 2).all()  # mixed with at most one other row
    assert (diag < 1).any()


# ------------------------------------------------------ SimCLR image set on [0, 1] images


def unit_images(n=16, seed=0):
    return torch.rand(n, *IMG.shape, generator=gen(seed))


def test_color_jitter_stays_in_range_and_changes_samples_differently():
    x = unit_images()
    out = augmenter(color_jitter=1.0)({"img": x}, gen())["img"]
    assert out.min() >= 0 and out.max() <= 1
    changed = ~torch.isclose(out, x).flatten(1).all(dim=1)
    assert 6 <= changed.sum() < len(x)  # applied with probability 0.8, per sample
    ratios = (out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3)))[changed]
    assert ratios.std() > 0.01  # each sample its own factors


def test_grayscale_makes_the_chosen_samples_gray_and_keeps_3_channels():
    x = unit_images()
    out = augmenter(grayscale=1.0)({"img": x}, gen())["img"]
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    half = augmenter(grayscale=0.5)(batch_of(n=64) | {"img": unit_images(64)}, gen())["img"]
    gray = torch.isclose(half[:, 0], half[:, 1]).flatten(1).all(dim=1)
    assert 10 < gray.sum() < 54


def test_blur_smooths_the_image():
    x = unit_images()
    out = augmenter(blur=1.0)({"img": x}, gen())["img"]
    roughness = out.diff(dim=-1).abs().mean(dim=(1, 2, 3))
    before = x.diff(dim=-1).abs().mean(dim=(1, 2, 3))
    assert (roughness <= before + 1e-6).all()
    assert (roughness < 0.8 * before).sum() >= 10  # sigma ~ U(0.1, 2): small sigmas barely blur
    torch.testing.assert_close(out.mean(), x.mean(), atol=0.02, rtol=0)


def test_kornia_transforms_are_seeded_by_the_callers_generator():
    x = {"img": unit_images()}
    aug = augmenter(color_jitter=0.8, grayscale=0.5, blur=0.5)
    torch.manual_seed(123)
    first = aug(x, gen(4))["img"]
    torch.manual_seed(999)  # the global RNG does not decide the view...
    assert torch.equal(aug(x, gen(4))["img"], first)
    g = gen(4)
    assert not torch.equal(aug(x, g)["img"], aug(x, g)["img"])  # ...the generator does
    state = torch.get_rng_state()
    aug(x, gen(5))
    assert torch.equal(torch.get_rng_state(), state)  # and it is left as it was


# ---------------------------------------------------------------- text: ids with a mask

MASK_ID = 4


class TextSpec:
    """The schema's text kind arrives with data format v2; the augmenter reads these."""
    name, shape, kind, dtype = "caption", (10,), "text", "int64"


def text_batch(lengths=(10, 6, 3, 2)):
    ids = torch.zeros(len(lengths), 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(n) + 10 * (row + 1)  # distinct, increasing tokens
    mask = torch.arange(10) < torch.tensor(lengths).unsqueeze(1)
    return {"caption": ids, "caption__mask": mask}


def text_augmenter(**strengths) -> Augmenter:
    aug = ModalityAugment(**{**OFF, "mask_token_id": MASK_ID, **strengths})
    return Augmenter([TextSpec()], AugmentConfig(default=aug))


def real_tokens(out, row):
    return out["caption"][row][out["caption__mask"][row]].tolist()


@pytest.mark.parametrize("strengths", [dict(token_mask=0.5), dict(token_delete=0.5),
                                       dict(crop=0.7),
                                       dict(token_mask=0.3, token_delete=0.3, crop=0.5)])
def test_text_transforms_never_read_the_padding(strengths):
    batch = text_batch()
    noisy = dict(batch, caption=batch["caption"].masked_fill(~batch["caption__mask"], 77))
    aug = text_augmenter(**strengths)
    a, b = aug(batch, gen()), aug(noisy, gen())
    assert torch.equal(a["caption__mask"], b["caption__mask"])
    assert torch.equal(a["caption"][a["caption__mask"]], b["caption"][b["caption__mask"]])
    assert (a["caption"][~a["caption__mask"]] == 0).all()
    # Real tokens stay first; the original is left alone.
    lengths = a["caption__mask"].sum(1, keepdim=True)
    assert torch.equal(a["caption__mask"], torch.arange(10) < lengths)
    assert torch.equal(batch["caption"], text_batch()["caption"])


def test_token_mask_replaces_about_the_fraction_and_keeps_the_ends():
    batch = {"caption": torch.arange(200).repeat(64, 1)[:, :10] + 10,
             "caption__mask": torch.ones(64, 10, dtype=torch.bool)}
    out = text_augmenter(token_mask=0.5)(batch, gen())
    masked = out["caption"] == MASK_ID
    assert not masked[:, [0, -1]].any()  # keep_ends
    assert 0.4 < masked[:, 1:-1].float().mean() < 0.6
    assert torch.equal(out["caption"][~masked], batch["caption"][~masked])
    free = Augmenter([TextSpec()], AugmentConfig(default=ModalityAugment(
        **{**OFF, "token_mask": 0.5, "mask_token_id": MASK_ID, "keep_ends": False})))
    assert (free(batch, gen())["caption"][:, 0] == MASK_ID).any()


def test_token_delete_keeps_the_order_and_at_least_one_token():
    out = text_augmenter(token_delete=0.5)(text_batch(), gen())
    for row in range(4):
        kept = real_tokens(out, row)
        original = text_batch()["caption"][row][text_batch()["caption__mask"][row]].tolist()
        assert kept == sorted(kept) and set(kept) <= set(original)
        assert kept[0] == original[0] and kept[-1] == original[-1]
    assert out["caption__mask"].sum() < text_batch()["caption__mask"].sum()
    everything = text_augmenter(token_delete=1.0)(text_batch(), gen())
    assert [real_tokens(everything, r) for r in range(4)] == [[10, 19], [20, 25], [30, 32],
                                                              [40, 41]]


def test_span_crop_keeps_a_contiguous_window_of_the_given_size():
    out = text_augmenter(crop=0.5)(text_batch(), gen())
    first = real_tokens(out, 0)
    middle = first[1:-1]
    assert first[0] == 10 and first[-1] == 19
    assert middle == list(range(middle[0], middle[0] + len(middle)))
    assert 4 <= len(middle) <= 8  # a fraction in [0.5, 1] of the 8 editable tokens
    assert real_tokens(out, 3) == [40, 41]  # nothing editable: unchanged


def test_text_without_a_mask_counts_every_position_as_real():
    batch = {"caption": text_batch()["caption"]}
    out = text_augmenter(token_delete=0.5)(batch, gen())
    assert out["caption__mask"].shape == (4, 10)


def test_token_mask_needs_the_mask_id():
    from mmcl.config import ConfigError

    with pytest.raises(ConfigError, match="mask_token_id"):
        Augmenter([TextSpec()], AugmentConfig(default=ModalityAugment(token_mask=0.2)))
    # token_mask on a config without text modalities is not an error
    Augmenter(SPECS, AugmentConfig(default=ModalityAugment(token_mask=0.2)))


def test_the_mask_id_comes_from_the_data_sets_tokenizer():
    spec = ModalitySpec("caption", (10,), "text", dtype="int64", vocab_size=50, mask_id=7)
    aug = Augmenter([spec], AugmentConfig(default=ModalityAugment(**{**OFF, "token_mask": 1.0})))
    out = aug(text_batch(), gen())
    assert real_tokens(out, 0) == [10] + [7] * 8 + [19]  # all but the ends
    assert real_tokens(out, 2) == [30, 7, 32]
