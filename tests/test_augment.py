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


def test_color_jitter_is_a_per_sample_affine_map():
    batch = batch_of(n=8)
    x = batch["img"]
    out = augmenter(color_jitter=0.5)(batch, gen())["img"]
    for i in range(len(x)):
        xi, oi = x[i].flatten(), out[i].flatten()
        scale = ((oi - oi.mean()) @ (xi - xi.mean())) / (xi - xi.mean()).square().sum()
        assert 0.5 - 1e-4 <= scale <= 1.5 + 1e-4
        torch.testing.assert_close(oi, scale * (xi - xi.mean()) + oi.mean(),
                                   rtol=1e-4, atol=1e-4)
        assert abs(oi.mean() - xi.mean()) <= 0.5 + 1e-4  # brightness shift within strength


def test_mixup_keeps_each_sample_dominant():
    n, strength = VEC.shape[0], 0.8
    batch = {**batch_of(n), "vec": torch.eye(n)}  # one-hot rows reveal the mixing weights
    out = augmenter(mixup=strength)(batch, gen())["vec"]
    diag = out.diagonal()
    assert (diag >= 1 - strength / 2 - 1e-6).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(n))
    assert ((out > 0).sum(dim=1) <= 2).all()  # mixed with at most one other row
    assert (diag < 1).any()
