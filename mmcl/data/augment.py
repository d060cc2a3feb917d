"""Multimodal augmentations: one call draws one augmented view of a whole batch.

Per modality, `AugmentConfig.for_modality(name)` gives strengths in [0, 1]; 0 switches a
transform off, so all-zero strengths return the input values exactly. Only transforms that fit
a modality's kind apply (others are skipped):

    vector    mixup, dropout, noise
    audio     mixup, dropout, noise (on the standardised waveform)
    sequence  crop, mixup, time_mask, dropout, noise
    image     crop, flip, color_jitter, grayscale, blur, mixup, dropout, noise
    text      crop (span), token_delete, token_mask

and they run in that order: geometry first (crop/flip) and photometry (jitter, grayscale,
blur: the SimCLR set, on [0, 1] images) on the clean signal; mixup next, so that masks applied
afterwards stay masks (a zeroed step is not half refilled by another row); noise last, so
masked entries read as noisy readings rather than tell-tale exact zeros.

Text is int64 token ids with its padding mask `m__mask` (True = real token, real tokens
first); its transforms edit ids and mask together and never touch padding: a crop or a
deletion moves the remaining tokens up and marks the freed positions as padding (their value,
0, never reaches an embedding). With `keep_ends` the first and last real token stay.

Every op is batched on the tensors' device, every random draw uses the caller's generator
(same seed, same view; two calls, two independent views), and no input is modified in place.
Each modality draws its own randomness, including its own mixup partner. kornia's transforms
(colour jitter, grayscale, blur) draw from torch's global generator: they run under a forked
RNG seeded from the caller's generator, so they are reproducible the same way.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.config import AugmentConfig, ConfigError, ModalityAugment
from mmcl.data.schema import ModalitySpec, mask_column

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


def mixup(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """x <- (1 - lam) x + lam x[perm], lam ~ U(0, strength / 2) per sample: the sample itself
    always keeps at least half the weight, so it stays the positive of its own tuple."""
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    lam = _per_sample(_uniform((x.shape[0],), x, gen) * (strength / 2), x)
    return (1 - lam) * x + lam * x[perm]


# ------------------------------------------------------- SimCLR photometry (kornia, [0, 1])


def _seeded_kornia(x: Tensor, make, gen: Generator) -> Tensor:
    """Run the kornia transform `make()` on x with torch's RNG forked and seeded from `gen`:
    kornia draws its per-sample parameters from the global generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=x.device).item())
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return make()(x)


def color_jitter_rgb(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """SimCLR's colour distortion of strength s on [0, 1] images: brightness, contrast and
    saturation factors within 1 +- 0.8 s, hue shift within +-0.2 s, in random order, each
    sample with probability 0.8. Images without 3 channels get brightness and contrast only."""
    import kornia.augmentation as K

    rgb = x.shape[1] == 3
    s = strength
    return _seeded_kornia(x, lambda: K.ColorJitter(
        0.8 * s, 0.8 * s, 0.8 * s if rgb else 0.0, 0.2 * s if rgb else 0.0, p=0.8), gen)


def grayscale(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """Each RGB sample becomes grayscale (kept 3 channels) with probability `strength`."""
    import kornia.augmentation as K

    if x.shape[1] != 3:
        return x
    return _seeded_kornia(x, lambda: K.RandomGrayscale(p=strength), gen)


def blur(x: Tensor, strength: float, gen: Generator) -> Tensor:
    """A Gaussian blur with sigma ~ U(0.1, 2) and an odd kernel of ~10% of the image side
    (SimCLR), each sample with probability `strength`."""
    import kornia.augmentation as K

    side = min(x.shape[-2:])
    kernel = max(3, int(0.1 * side) // 2 * 2 + 1)
    return _seeded_kornia(x, lambda: K.RandomGaussianBlur(
        (kernel, kernel), (0.1, 2.0), p=strength), gen)


# ------------------------------------------------------------------- text (ids and mask)

TextTransform = Callable[[Tensor, Tensor, float, Generator, "ModalityAugment"],
                         tuple[Tensor, Tensor]]


def _editable(mask: Tensor, keep_ends: bool) -> Tensor:
    """The real tokens a transform may change: all of them, or all but the first and last."""
    if not keep_ends:
        return mask
    lengths = mask.sum(dim=1, keepdim=True)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask & (pos > 0) & (pos < lengths - 1)


def _compact(ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept tokens moved up in their order, padding (0, mask False) after them."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    count = keep.sum(dim=1, keepdim=True)
    mask = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < count
    return ids.gather(1, order).masked_fill(~mask, 0), mask


def token_mask(ids: Tensor, mask: Tensor, strength: float, gen: Generator,
               aug: ModalityAugment) -> tuple[Tensor, Tensor]:
    """Each editable token becomes `mask_token_id` with probability `strength`."""
    chosen = (_uniform(ids.shape, mask.float(), gen) < strength) & _editable(mask, aug.keep_ends)
    return ids.masked_fill(chosen, aug.mask_token_id), mask


def token_delete(ids: Tensor, mask: Tensor, strength: float, gen: Generator,
                 aug: ModalityAugment) -> tuple[Tensor, Tensor]:
    """Each editable token is deleted with probability `strength`; a sequence keeps at
    least one token (its first, when deletion would empty it)."""
    deleted = (_uniform(ids.shape, mask.float(), gen) < strength) & _editable(mask, aug.keep_ends)
    keep = mask & ~deleted
    emptied = ~keep.any(dim=1) & mask.any(dim=1)
    keep[:, 0] |= emptied
    return _compact(ids, keep)


def span_crop(ids: Tensor, mask: Tensor, strength: float, gen: Generator,
              aug: ModalityAugment) -> tuple[Tensor, Tensor]:
    """Keep a random contiguous window of the editable tokens, of a fraction ~ U(1 - s, 1)
    of them (at least one), plus the ends when `keep_ends`."""
    editable = _editable(mask, aug.keep_ends)
    n = editable.sum(dim=1, keepdim=True)                              # (B, 1)
    frac = 1.0 - strength * _uniform(n.shape, mask.float(), gen)
    span = (frac * n).round().long().clamp(min=1).minimum(n)
    start = (_uniform(n.shape, mask.float(), gen) * (n - span + 1)).long().minimum(n - span)
    # Rank of each editable token among the editable ones: 0..n-1.
    rank = editable.long().cumsum(dim=1) - 1
    inside = editable & (rank >= start) & (rank < start + span)
    keep = inside | (mask & ~editable)  # the ends (if kept) are the non-editable real tokens
    return _compact(ids, keep)


# The transforms each kind admits, in the order they run (see the module docstring).
PIPELINES: dict[str, tuple[tuple[str, Transform], ...]] = {
    "vector": (("mixup", mixup), ("dropout", dropout), ("noise", noise)),
    "sequence": (("crop", crop_sequence), ("mixup", mixup), ("time_mask", time_mask),
                 ("dropout", dropout), ("noise", noise)),
    "image": (("crop", crop_image), ("flip", flip), ("color_jitter", color_jitter_rgb),
              ("grayscale", grayscale), ("blur", blur), ("mixup", mixup),
              ("dropout", dropout), ("noise", noise)),
    "audio": (("mixup", mixup), ("dropout", dropout), ("noise", noise)),
}
TEXT_PIPELINE: tuple[tuple[str, TextTransform], ...] = (
    ("crop", span_crop), ("token_delete", token_delete), ("token_mask", token_mask))


def plan_for(kind: str, aug: ModalityAugment) -> list[tuple[Transform, float]]:
    """The (transform, strength) steps that run for a modality: those fitting its kind with a
    strength above 0, in order. Kinds without transforms (audio, for now) get none."""
    pipeline = TEXT_PIPELINE if kind == "text" else PIPELINES.get(kind, ())
    return [(fn, getattr(aug, name)) for name, fn in pipeline if getattr(aug, name) > 0]


def _with_mask_id(spec: ModalitySpec, aug: ModalityAugment) -> ModalityAugment:
    """The text settings with the mask id filled in from the data set's tokenizer (the
    manifest's mask_id) when the config names none; ConfigError when token masking needs
    one and neither has it."""
    if aug.mask_token_id is None and getattr(spec, "mask_id", None) is not None:
        aug = aug.model_copy(update={"mask_token_id": int(spec.mask_id)})
    if aug.token_mask > 0 and aug.mask_token_id is None:
        raise ConfigError(
            f"augment: token_mask for text modality {spec.name!r} needs the tokenizer's mask "
            f"id and the data set records none: set augment.per_modality.{spec.name}."
            f"mask_token_id, or token_mask: 0")
    return aug


class Augmenter:
    """Draws augmented views of batches: `augmenter(batch, generator) -> new dict`."""

    def __init__(self, specs: list[ModalitySpec], cfg: AugmentConfig):
        self.plans = {spec.name: plan_for(spec.kind, cfg.for_modality(spec.name))
                      for spec in specs}
        self.text = {spec.name: _with_mask_id(spec, cfg.for_modality(spec.name))
                     for spec in specs if spec.kind == "text"}

    def __call__(self, batch: Mapping[str, Tensor],
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A new dict: modality tensors augmented, every other key (labels, id) the same
        tensor object. A modality with nothing to apply is passed through uncopied too
        (nothing downstream writes into views). Other non-float tensors are never augmented;
        text is edited together with its padding mask."""
        out = dict(batch)
        for name, plan in self.plans.items():
            x = batch.get(name)
            if x is None or not plan:
                continue
            if name in self.text:
                out[name], out[mask_column(name)] = self._text(x, batch.get(mask_column(name)),
                                                             plan, self.text[name], generator)
                continue
            if not x.is_floating_point():
                continue
            for fn, strength in plan:
                x = fn(x, strength, generator)
            out[name] = x
        return out

    @staticmethod
    def _text(ids: Tensor, mask: Tensor | None, plan, aug: ModalityAugment,
              generator) -> tuple[Tensor, Tensor]:
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        for fn, strength in plan:
            ids, mask = fn(ids, mask, strength, generator, aug)
        return ids, mask
