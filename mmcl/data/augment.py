"""Multimodal augmentations: one call draws one augmented view of a whole batch.

Per modality, `AugmentConfig.for_modality(name)` gives strengths in [0, 1]; 0 switches a
transform off, so all-zero strengths return the input values exactly. Only transforms that fit
a modality's kind apply (others are skipped):

    vector    mixup, dropout, noise
    audio     mixup, dropout, noise (on the standardised waveform)
    text      none (integer token ids)
    sequence  crop, mixup, time_mask, dropout, noise
    image     crop, flip, color_jitter, mixup, dropout, noise

and they run in that order: geometry first (crop/flip) and photometry (jitter) on the clean
signal; mixup next, so that masks applied afterwards stay masks (a zeroed step is not half
refilled by another row); noise last, so masked entries read as noisy readings rather than
tell-tale exact zeros.

Every op is batched on the tensors' device, every random draw uses the caller's generator
(same seed, same view; two calls, two independent views), and no input is modified in place.
Each modality draws its own randomness, including its own mixup partner.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.config import AugmentConfig, ModalityAugment
from mmcl.data.schema import ModalitySpec

Generator = torch.Generator | None
Transform = Callable[[Tensor, float, Generator], Tensor]


def _uniform(shape: tuple[int, ...], like: Tensor, gen: Generator) -> Tensor:
    """U(0, 1) draws of `shape` on `like`'s device and dtype, from `gen`."""
    return torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype)


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against x."""
    return values.view(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- transforms


def noise(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Additive Gaussian noise of std `strength` (data is roughly standardised)."""
    return x + strength * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def dropout(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Zero each feature independently with probability `strength`.

    No 1/(1-p) rescaling: on standardised data a zero reads as "missing, at the mean", and the
    features that survive keep the scale they have at evaluation time, when nothing is dropped.
    """
    return x.masked_fill(_uniform(x.shape, x, gen) < strength, 0.0)


def time_mask(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Zero round(strength * T) whole time steps of each (B, T, D) sample, chosen at random."""
    steps = x.shape[1]
    k = int(strength * steps + 0.5)
    if k == 0:
        return x
    # Ranking uniform scores picks k distinct steps per sample in one batched op.
    chosen = _uniform((x.shape[0], steps), x, gen).argsort(dim=1)[:, :k]
    mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, chosen, True)
    return x.masked_fill(mask.unsqueeze(-1), 0.0)


def crop_sequence(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """A random contiguous window of (B, T, D), resampled back to T steps by linear
    interpolation. The window covers a fraction f ~ U(1 - strength, 1) of the time span,
    so it holds at least (1 - strength) * T steps."""
    batch, steps = x.shape[:2]
    if steps < 2:
        return x
    span = steps - 1
    frac = 1.0 - strength * _uniform((batch, 1), x, gen)            # window length / span
    start = _uniform((batch, 1), x, gen) * (1.0 - frac) * span
    pos = start + frac * torch.arange(steps, device=x.device, dtype=x.dtype)  # (B, T) in [0, span]
    lo = pos.floor().clamp(0, span - 1)
    weight = (pos - lo).unsqueeze(-1)
    lo = lo.long().unsqueeze(-1).expand(-1, -1, x.shape[2])
    return torch.lerp(x.gather(1, lo), x.gather(1, lo + 1), weight)


def crop_image(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Random resized crop of (B, C, H, W) back to H x W (bilinear): area fraction
    ~ U(1 - strength, 1), aspect ratio log-uniform in (4/3)^(+-strength/2), random position
    inside the image."""
    batch = x.shape[0]
    area = 1.0 - strength * _uniform((batch,), x, gen)
    log_ratio = (2 * _uniform((batch,), x, gen) - 1) * (strength / 2) * math.log(4 / 3)
    scale_h = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    scale_w = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    # In align_corners=False coordinates the image spans [-1, 1]; a window of half-size s
    # stays inside when its centre is within 1 - s of the middle.
    shift_x = (2 * _uniform((batch,), x, gen) - 1) * (1 - scale_w)
    shift_y = (2 * _uniform((batch,), x, gen) - 1) * (1 - scale_h)
    theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = scale_w, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = scale_h, shift_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # "border" guards against sampling a hair outside the image through rounding.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Horizontal flip of each (C, H, W) sample with probability `strength`."""
    flipped = _per_sample(_uniform((x.shape[0],), x, gen) < strength, x)
    return torch.where(flipped, x.flip(-1), x)


def color_jitter(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Per-sample contrast scale ~ U(1 - s, 1 + s) about the sample's mean, then a brightness
    shift ~ U(-s, s) (in the data's standardised units)."""
    batch = x.shape[0]
    contrast = _per_sample(1 + strength * (2 * _uniform((batch,), x, gen) - 1), x)
    brightness = _per_sample(strength * (2 * _uniform((batch,), x, gen) - 1), x)
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * contrast + mean + brightness


def mixup(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """x <- (1 - lam) x + lam x[perm], lam ~ U(0, strength / 2) per sample: the sample itself
    always keeps at least half the weight, so it stays the positive of its own tuple."""
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    lam = _per_sample(_uniform((x.shape[0],), x, gen) * (strength / 2), x)
    return (1 - lam) * x + lam * x[perm]


# The transforms each kind admits, in the order they run (see the module docstring).
PIPELINES: dict[str, tuple[tuple[str, Transform], ...]] = {
    "vector": (("mixup", mixup), ("dropout", dropout), ("noise", noise)),
    "sequence": (("crop", crop_sequence), ("mixup", mixup), ("time_mask", time_mask),
                 ("dropout", dropout), ("noise", noise)),
    "image": (("crop", crop_image), ("flip", flip), ("color_jitter", color_jitter),
              ("mixup", mixup), ("dropout", dropout), ("noise", noise)),
    "audio": (("mixup", mixup), ("dropout", dropout), ("noise", noise)),
    "text": (),  # token ids: nothing here applies (the text encoder sees them as they are)
}


def plan_for(kind: str, aug: ModalityAugment) -> list[tuple[Transform, float]]:
    """The (transform, strength) steps that run for a modality: those fitting its kind with a
    strength above 0, in order."""
    return [(fn, getattr(aug, name)) for name, fn in PIPELINES[kind] if getattr(aug, name) > 0]


class Augmenter:
    """Draws augmented views of batches: `augmenter(batch, generator) -> new dict`."""

    def __init__(self, specs: list[ModalitySpec], cfg: AugmentConfig):
        self.plans = {spec.name: plan_for(spec.kind, cfg.for_modality(spec.name))
                      for spec in specs}

    def __call__(self, batch: Mapping[str, Tensor],
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A new dict: modality tensors augmented, every other key (labels, id, factors) the
        same tensor object. A modality with nothing to apply is passed through uncopied too
        (nothing downstream writes into views). Non-float tensors are never augmented."""
        out = dict(batch)
        for name, plan in self.plans.items():
            x = batch.get(name)
            if x is None or not plan or not x.is_floating_point():
                continue
            for fn, strength in plan:
                x = fn(x, strength, generator)
            out[name] = x
        return out
