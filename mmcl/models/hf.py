"""Encoder kind "hf": a Hugging Face transformers backbone for any modality.

    model:
      encoders:
        image: {kind: hf, model: google/vit-base-patch16-224, pooling: cls, freeze: 4}
        caption: {kind: hf, model: ./my-bert, lr_scale: 0.1, layer_decay: 0.8}

The backbone is `AutoModel.from_pretrained(model)` (`pretrained: true`), or fresh from
`AutoConfig.from_pretrained(model)` (`pretrained: false`), or fresh from an inline `hf_config`.
What it is fed follows the backbone's own `main_input_name`:
- input_ids (BERT-like text): int64 token ids and the batch's padding mask as attention_mask;
- pixel_values (ViT, ConvNeXt, ResNet, CLIP vision): [0, 1] images, normalised here with the
  model's image-processor constants (`image_mean`/`image_std`, else the folder's
  preprocessor_config.json, else ImageNet's); 1-channel images are repeated to 3 channels
  when the model wants 3;
- input_values / input_features (Wav2Vec2, HuBERT, AST...): waveforms (B, S) or feature
  sequences (B, T, D), with the padding mask as attention_mask where the model takes one.
The hidden states are pooled (`cls`, `mean` over real positions, or the model's `pooler`)
and projected linearly to embed_dim.

The parameters' "depth" (0: embeddings and everything before the first block; i: block i of
L; L + 1: what follows the blocks) drives both `freeze: N` (depths <= L - N frozen) and the
layer-wise learning rate, lr_scale * layer_decay ** (L + 1 - depth), reported through
`lr_scales()`; the projection always trains at the run's lr.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from mmcl.config import ConfigError, EncoderConfig

# transformers' IMAGENET_DEFAULT_MEAN/STD, the documented fallback.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_FILE = "preprocessor_config.json"


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - a runtime dependency; guards broken installs
        raise ConfigError("encoder kind hf needs the `transformers` package: "
                          "pip install transformers") from None
    transformers.logging.set_verbosity_error()  # "weights not initialised" notes for heads
    transformers.logging.disable_progress_bar()  # one "Loading weights" bar per backbone
    return transformers


def backbone_config(cfg: EncoderConfig):
    """The transformers config the encoder builds (inline hf_config, else the model's)."""
    tf = _transformers()
    if cfg.hf_config is not None:
        raw = dict(cfg.hf_config)
        model_type = raw.pop("model_type", None)
        if not model_type:
            raise ConfigError("hf_config needs a model_type (e.g. bert, vit, wav2vec2)")
        try:
            return tf.AutoConfig.for_model(model_type, **raw)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"hf_config: {err}") from None
    try:
        return tf.AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as err:
        raise ConfigError(f"hf model {cfg.model!r}: cannot read its config ({_first(err)}); "
                          f"give a local folder holding config.json or a hub name this "
                          f"machine can download") from None


def _first(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_backbone(cfg: EncoderConfig) -> nn.Module:
    tf = _transformers()
    if cfg.pretrained and cfg.hf_config is None:
        try:
            return tf.AutoModel.from_pretrained(cfg.model)
        except (OSError, ValueError) as err:
            raise ConfigError(f"hf model {cfg.model!r}: cannot load its weights "
                              f"({_first(err)}); give a local folder written by "
                              f"save_pretrained or a hub name this machine can download, or "
                              f"set pretrained: false") from None
    return tf.AutoModel.from_config(backbone_config(cfg))


def image_constants(cfg: EncoderConfig) -> tuple[list[float], list[float]]:
    """(mean, std) per channel: the config's own, else the model folder's preprocessor
    config, else ImageNet's."""
    if cfg.image_mean is not None:
        return list(cfg.image_mean), list(cfg.image_std)
    if cfg.model and os.path.isfile(os.path.join(cfg.model, PREPROCESSOR_FILE)):
        with open(os.path.join(cfg.model, PREPROCESSOR_FILE)) as f:
            raw = json.load(f)
        if "image_mean" in raw and "image_std" in raw:
            return list(raw["image_mean"]), list(raw["image_std"])
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _width(config) -> int:
    for name in ("hidden_size", "d_model", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    sizes = getattr(config, "hidden_sizes", None)  # ResNet, ConvNeXt: one width per stage
    if sizes:
        return int(sizes[-1])
    raise ConfigError(f"hf model type {config.model_type!r}: cannot tell its output width "
                      "(no hidden_size, d_model or hidden_sizes in its config)")


def _blocks(backbone: nn.Module) -> nn.ModuleList | None:
    """The repeated blocks: the ModuleList as long as config.num_hidden_layers, else the
    longest ModuleList."""
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return None
    layers = getattr(backbone.config, "num_hidden_layers", None)
    exact = [m for m in lists if len(m) == layers]
    return exact[0] if exact else max(lists, key=len)


def parameter_depths(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """name -> depth (0 before the blocks, i in block i of L, L + 1 after them), and L.
    "Before" and "after" follow the modules' registration order, which transformers models
    keep in forward order (embeddings, blocks, final norm, pooler)."""
    blocks = _blocks(backbone)
    owner = {}
    if blocks is not None:
        for i, block in enumerate(blocks):
            for p in block.parameters():
                owner[id(p)] = i + 1
    total = len(blocks) if blocks is not None else 0
    depths, seen_block = {}, False
    for name, p in backbone.named_parameters():
        if id(p) in owner:
            depths[name], seen_block = owner[id(p)], True
        else:
            depths[name] = total + 1 if seen_block else 0
    return depths, total


def _enable_checkpointing(backbone: nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
    kwargs = {"use_reentrant": False}  # the non-reentrant form works with frozen inputs
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing(backbone: nn.Module) -> bool:
    """Whether the backbone recomputes its blocks' activations in backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules())


class HFEncoder(nn.Module):
    """A transformers backbone, pooled and projected to embed_dim (see the module doc)."""

    def __init__(self, spec, cfg: EncoderConfig, embed_dim: int):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.backbone = load_backbone(cfg)
        self.input_name = getattr(self.backbone, "main_input_name", "input_ids")
        self._check_vocabulary(spec)
        if cfg.pooling != "pooler" and getattr(self.backbone, "pooler", None) is not None:
            # An unused pooler gets no gradient, which DDP refuses; drop it.
            self.backbone.pooler = None
        spec_augment = getattr(self.backbone, "masked_spec_embed", None)
        if isinstance(spec_augment, nn.Parameter):
            # Wav2Vec2-style SpecAugment embedding: it gets a gradient only in steps where a
            # time mask is drawn, and DDP refuses parameters that are unused in some steps.
            spec_augment.requires_grad_(False)
        if cfg.pooling == "pooler" and getattr(self.backbone, "pooler", "none") is None:
            raise ConfigError(f"modality {spec.name!r}: this hf model has no pooler; use "
                              f"pooling: cls or mean")
        if cfg.gradient_checkpointing:
            if not getattr(self.backbone, "supports_gradient_checkpointing", False):
                raise ConfigError(f"modality {spec.name!r}: hf model type "
                                  f"{self.backbone.config.model_type!r} does not support "
                                  f"gradient checkpointing; set gradient_checkpointing: false")
            _enable_checkpointing(self.backbone)
        self.depths, self.num_blocks = parameter_depths(self.backbone)
        self._freeze(cfg.freeze)
        self.proj = nn.Linear(_width(self.backbone.config), embed_dim)
        if self.input_name == "pixel_values":
            mean, std = image_constants(cfg)
            self.channels = int(getattr(self.backbone.config, "num_channels", spec.shape[0]))
            # Buffers (not persistent: they come from the config, which travels with weights).
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _check_vocabulary(self, spec) -> None:
        data_vocab = getattr(spec, "vocab_size", None)
        model_vocab = getattr(self.backbone.config, "vocab_size", None)
        if self.input_name == "input_ids" and data_vocab and model_vocab \
                and data_vocab > model_vocab:
            raise ConfigError(
                f"modality {spec.name!r}: the data's tokenizer has {data_vocab} token ids, "
                f"the hf model only {model_vocab}; tokenize with the model's own tokenizer")

    def _freeze(self, freeze: str | int) -> None:
        if freeze == "none":
            return
        trainable_from = self.num_blocks + 2 if freeze == "all" else self.num_blocks + 1 - freeze
        if freeze != "all" and freeze > self.num_blocks:
            raise ConfigError(f"modality {self.spec.name!r}: freeze: {freeze} but the model has "
                              f"{self.num_blocks} blocks; use at most {self.num_blocks}, all "
                              f"or none")
        for name, p in self.backbone.named_parameters():
            if self.depths[name] < trainable_from:
                p.requires_grad_(False)

    def lr_scales(self) -> dict[nn.Parameter, float]:
        """Backbone parameter -> lr multiplier (the projection is absent: it takes 1)."""
        top = self.num_blocks + 1
        return {p: self.cfg.lr_scale * self.cfg.layer_decay ** (top - self.depths[name])
                for name, p in self.backbone.named_parameters()}

    # -- forward
    def _inputs(self, x: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        if self.input_name == "input_ids":
            inputs = {"input_ids": x.long()}
            inputs["attention_mask"] = (mask if mask is not None
                                        else torch.ones_like(x, dtype=torch.bool)).long()
            return inputs
        if self.input_name == "pixel_values":
            x = x.float()
            if x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            return {"pixel_values": (x - self.mean) / self.std}
        inputs = {self.input_name: x.float()}
        if mask is not None:
            inputs["attention_mask"] = mask.long()
        return inputs

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        out = self.backbone(**self._inputs(x, mask))
        return self.proj(self._pool(out, mask))

    def _pool(self, out: Any, mask: Tensor | None) -> Tensor:
        if self.cfg.pooling == "pooler":
            return out.pooler_output.flatten(1)
        h = out.last_hidden_state
        if h.dim() == 4:  # convolutional backbones: (B, C, h, w)
            if self.cfg.pooling == "cls":
                raise ConfigError(f"modality {self.spec.name!r}: a convolutional hf model "
                                  f"has no cls token; use pooling: mean or pooler")
            return h.mean(dim=(-2, -1))
        if self.cfg.pooling == "cls":
            return h[:, 0]
        frames = self._frame_mask(mask, h.shape[1])
        if frames is None:
            return h.mean(dim=1)
        weights = frames.to(h.dtype).unsqueeze(-1)
        return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _frame_mask(self, mask: Tensor | None, steps: int) -> Tensor | None:
        """The padding mask on the output positions: the input mask for text; for audio the
        model's own frame mask (its convolutions shorten the input)."""
        if mask is None:
            return None
        if mask.shape[1] == steps:
            return mask
        to_frames = getattr(self.backbone, "_get_feature_vector_attention_mask", None)
        return to_frames(steps, mask.long()).bool() if to_frames else None


def pinned_config(cfg: EncoderConfig) -> EncoderConfig:
    """The EncoderConfig an exported model is rebuilt from without the hub or the original
    folder: the backbone's full config inline, pretrained off (the weights come from the
    export), the image constants written out."""
    config = backbone_config(cfg).to_dict()
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    update: dict[str, Any] = {"pretrained": False, "hf_config": json.loads(json.dumps(config))}
    mean, std = image_constants(cfg)
    if cfg.image_mean is None and config.get("num_channels") is not None:
        update.update(image_mean=mean, image_std=std)
    return cfg.model_copy(update=update)
