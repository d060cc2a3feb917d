"""The data layer's last step, on the device where batches meet the model (no Ray).

`Preparer(manifest, normalize, missing)(batch)` turns stored columns into what the model
receives (the data interface, see README "Data"):

    image (uint8)             float32 in [0, 1]; NOT standardised: augmentations work on
                              [0, 1] images and the image encoder normalises
    vector, sequence, audio   float32, standardised with the manifest's train-split mean/std
                              when `normalize` (and the manifest has them)
    text                      int64 token ids
    <m>__len                  -> <m>__mask, bool (B, L), True = a real token / time step;
                              padded sequence steps are zeroed after standardising
    <m>__present              kept as bool (B,) only with missing="mask" for a modality that
                              has absent tuples (absent values are zeroed); dropped otherwise

It runs before augmentation, in the training engine and wherever a trained model embeds.
Version-1 data sets (float32, no constants, no extra columns) pass through unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from mmcl.data.schema import Manifest, ModalitySpec, length_column, mask_column, present_column


class Preparer:
    def __init__(self, manifest: Manifest, normalize: bool = True, missing: str = "mask"):
        self.specs = list(manifest.modalities)
        self.normalize = bool(normalize)
        self.keep_present = {m.name for m in self.specs if m.nullable and missing == "mask"
                             and manifest.missing_total(m.name) > 0}
        self._constants: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    @classmethod
    def for_run(cls, manifest: Manifest, data_cfg) -> "Preparer":
        """The Preparer a run's `data` config asks for."""
        return cls(manifest, getattr(data_cfg, "normalize", True),
                   getattr(data_cfg, "missing", "mask"))

    def _mean_std(self, spec: ModalitySpec, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (spec.name, str(like.device))
        if key not in self._constants:
            mean = torch.tensor(spec.mean, dtype=torch.float32, device=like.device)
            std = torch.tensor(spec.std, dtype=torch.float32, device=like.device)
            self._constants[key] = (mean, std)
        return self._constants[key]

    def _values(self, spec: ModalitySpec, x: Tensor) -> Tensor:
        if spec.kind == "text":
            return x.long()
        if spec.kind == "image":
            return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = x.float()
        if self.normalize and spec.mean is not None:
            mean, std = self._mean_std(spec, x)
            x = (x - mean) / std  # (D,) broadcasts over a sequence's steps; audio: one value
        return x

    def __call__(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(batch)
        for spec in self.specs:
            x = batch.get(spec.name)
            if x is None:
                continue
            x = self._values(spec, x)
            lengths = out.pop(length_column(spec.name), None)
            if lengths is not None:
                steps = torch.arange(spec.shape[0], device=x.device)
                mask = steps[None, :] < lengths.to(x.device).long()[:, None]
                out[mask_column(spec.name)] = mask
                if spec.kind == "sequence":
                    x = x * mask.unsqueeze(-1).to(x.dtype)
            present = out.pop(present_column(spec.name), None)
            if present is not None and spec.name in self.keep_present:
                present = present.to(x.device).bool()
                out[present_column(spec.name)] = present
                x = x * present.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            out[spec.name] = x
        return out


def model_manifest(manifest: Manifest, normalize: bool) -> Manifest:
    """The manifest a model is built from. Image encoders standardise their [0, 1] input with
    the image modalities' mean/std (the data layer leaves images alone, see the module doc);
    with data.normalize off those constants are dropped, so no encoder normalises."""
    from dataclasses import replace

    if normalize or not any(m.kind == "image" and m.mean is not None
                            for m in manifest.modalities):
        return manifest
    mods = [replace(m, mean=None, std=None) if m.kind == "image" else m
            for m in manifest.modalities]
    return replace(manifest, modalities=mods)
