"""The multimodal encoder: one encoder per modality, then a fusion module.

`encode` runs every modality encoder exactly once; objectives then fuse the resulting
embeddings as often as they need (full tuples, single-modality masks, disturbed tuples)
without paying for the encoders again.

The batch may carry, per modality m, `m__mask` (bool (B, L), True = a real token or time step;
handed to m's encoder as `mask=`) and `m__present` (bool (B,), True = m is present in that
tuple; collected into `Embeddings.present` for the fusion).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from torch import Tensor, nn

from mmcl.config import ModelConfig
from mmcl.data.schema import ModalitySpec, mask_column, present_column
from mmcl.models.encoders import build_encoder
from mmcl.models.fusion import (ConcatFusion, LinearFusion, Swap, TransformerFusion,
                                 check_keep)


class Embeddings(dict):
    """Modality name -> embedding (B, embed_dim), with `.present`: modality -> bool (B,) for
    the modalities the batch marks as missing in some tuples (None when it marks none)."""

    def __init__(self, *args, present: dict[str, Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.present = present


def _as_model_input(x: Tensor, kind: str) -> Tensor:
    """Token ids stay integers; everything else becomes float32, since shards may store
    float16/float64/uint8 and the encoders' weights are float32."""
    return x.long() if kind == "text" else x.float()


class MultimodalEncoder(nn.Module):
    """`encoders` (name -> encoder) and `fusion`; `forward(batch) = fuse(encode(batch))`."""

    def __init__(self, specs: list[ModalitySpec], cfg: ModelConfig):
        super().__init__()
        self.specs = list(specs)
        self.modalities = [s.name for s in self.specs]
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modality names must be unique, got {self.modalities}")
        self.encoders = nn.ModuleDict()
        for spec in self.specs:
            try:
                self.encoders[spec.name] = build_encoder(spec, cfg.encoder_for(spec.name),
                                                         cfg.embed_dim)
            except KeyError as err:  # ModuleDict refuses names with "." or that shadow methods
                raise ValueError(f"modality name {spec.name!r} cannot name an encoder: "
                                 f"{err.args[0]}; rename the modality") from None
        if cfg.fusion in ("concat", "linear"):
            kind = ConcatFusion if cfg.fusion == "concat" else LinearFusion
            self.fusion: nn.Module = kind(self.modalities, cfg.embed_dim, cfg.proj_hidden)
        else:
            self.fusion = TransformerFusion(self.modalities, cfg.embed_dim, cfg.fusion_layers,
                                            cfg.fusion_heads)

    def encode(self, batch: Mapping[str, Tensor]) -> Embeddings:
        """Each modality's embedding (B, embed_dim); other keys (labels, id) are ignored."""
        out = Embeddings()
        present = {}
        for spec in self.specs:
            if spec.name not in batch:
                raise ValueError(f"the batch lacks modality {spec.name!r}; it has "
                                 f"{sorted(batch)}")
            x = batch[spec.name]
            if tuple(x.shape[1:]) != spec.shape:
                raise ValueError(f"modality {spec.name!r}: expected shape (B, "
                                 f"{', '.join(map(str, spec.shape))}), got {tuple(x.shape)}")
            encoder = self.encoders[spec.name]
            x = _as_model_input(x, spec.kind)
            mask = batch.get(mask_column(spec.name))
            # Encoders of fixed-size inputs need not take a mask: pass one only when present.
            out[spec.name] = encoder(x) if mask is None else encoder(x, mask=mask.bool())
            if present_column(spec.name) in batch:
                present[spec.name] = batch[present_column(spec.name)].bool()
        out.present = present or None
        return out

    def lr_scales(self) -> dict[nn.Parameter, float]:
        """Parameters whose learning rate differs from the run's (hf backbones' lr_scale and
        layer decay): parameter -> multiplier. Encoders say so through `lr_scales()`."""
        scales: dict[nn.Parameter, float] = {}
        for encoder in self.encoders.values():
            if callable(getattr(encoder, "lr_scales", None)):
                scales.update(encoder.lr_scales())
        return scales

    def fuse(self, embeddings: Mapping[str, Tensor],
             keep: Iterable[str] | None = None) -> Tensor:
        """The tuple embedding (B, embed_dim) from modality embeddings restricted to `keep`
        (None: all). ValueError for an empty `keep` or a name that is not a modality."""
        kept = None if keep is None else check_keep(keep, self.modalities)
        return self.fusion(embeddings, kept, getattr(embeddings, "present", None))

    def fuse_swapped(self, embeddings: Mapping[str, Tensor], swaps: Sequence[Swap]) -> Tensor:
        """(len(swaps) * B, embed_dim): the full tuples with modality swaps[p][0] taken from
        rows swaps[p][1], set p in rows p*B..(p+1)*B-1; the same as fusing each set built by
        hand, at the cost of only what a swap changes (see the fusion's `fuse_swapped`)."""
        return self.fusion.fuse_swapped(embeddings, swaps, getattr(embeddings, "present", None))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.fuse(self.encode(batch))
