"""Per-modality encoders: each maps a batch (B, *spec.shape) to (B, embed_dim).

Every encoder is called as `encoder(x, mask=None)`; `mask` is the batch's `<m>__mask` (bool
(B, L), True = a real token or time step) for text and padded sequences. The others ignore
it (padded steps reach them as zeros).

`build_encoder` picks the network from the modality's kind (vector, sequence, image) and the
config's `EncoderConfig.kind`. "auto" chooses an MLP for vectors, a GRU for sequences, a
small CNN for images, token embeddings + masked mean for text and a log-mel front end with a
small 2-D CNN for audio; an MLP fits every kind but text (it flattens its input). A kind that
does not fit the modality is a configuration error, raised before any training starts.

Every kind, mmcl's own and plug-ins alike, is looked up in mmcl.models.registry: the built-in
kinds below register there (which modality kinds each fits comes from ALLOWED_KINDS), "hf"
(Hugging Face backbones, mmcl.models.hf) registers lazily so that transformers loads only
when a config uses it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from mmcl.config import ConfigError, EncoderConfig
from mmcl.data.schema import ModalitySpec
from mmcl.models import registry

# Encoder kinds each modality kind accepts ("auto" resolves to the first concrete one).
ALLOWED_KINDS: dict[str, tuple[str, ...]] = {
    "vector": ("auto", "mlp"),
    "sequence": ("auto", "gru", "mlp", "transformer"),
    "image": ("auto", "cnn", "mlp"),
    "text": ("auto", "text"),
    "audio": ("auto", "audio", "mlp"),
}
AUTO_KIND = {"vector": "mlp", "sequence": "gru", "image": "cnn", "text": "text",
             "audio": "audio"}


class MLPEncoder(nn.Module):
    """`layers` hidden layers of `hidden` units (GELU, dropout) on the flattened input."""

    def __init__(self, in_features: int, cfg: EncoderConfig, embed_dim: int):
        super().__init__()
        blocks: list[nn.Module] = [nn.Flatten(start_dim=1)]
        width = in_features
        for _ in range(cfg.layers):
            blocks += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        blocks.append(nn.Linear(width, embed_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x)


class GRUEncoder(nn.Module):
    """A GRU over the time axis of (B, T, D); the last layer's final hidden state is projected."""

    def __init__(self, features: int, cfg: EncoderConfig, embed_dim: int):
        super().__init__()
        # PyTorch applies GRU dropout only between layers and warns when there is one layer.
        dropout = cfg.dropout if cfg.layers > 1 else 0.0
        self.rnn = nn.GRU(features, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                          dropout=dropout)
        self.out = nn.Linear(cfg.hidden, embed_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        _, h_n = self.rnn(x)  # h_n: (layers, B, hidden)
        return self.out(h_n[-1])


def _heads_for(width: int) -> int:
    """Attention heads for a `width`-wide transformer: the most of 4, 2, 1 dividing it, since
    EncoderConfig has no heads field and `hidden` can be any positive size."""
    return next(h for h in (4, 2, 1) if width % h == 0)


class TransformerEncoder(nn.Module):
    """A small pre-LN transformer over the T time steps of (B, T, D), mean-pooled over time."""

    def __init__(self, steps: int, features: int, cfg: EncoderConfig, embed_dim: int):
        super().__init__()
        self.inp = nn.Linear(features, cfg.hidden)
        self.pos = nn.Parameter(torch.randn(1, steps, cfg.hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, _heads_for(cfg.hidden), dim_feedforward=2 * cfg.hidden,
            dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        # Nested tensors only help with padding masks, which fixed-length inputs never have.
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        # Pre-LN leaves the residual stream un-normalised: normalise once before pooling.
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, embed_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.layers(self.inp(x) + self.pos)
        return self.out(self.norm(h).mean(dim=1))


def conv_blocks(convs: list[nn.Module], hidden: int) -> nn.Sequential:
    """conv -> GroupNorm(1) -> GELU for each conv, in one Sequential."""
    blocks: list[nn.Module] = []
    for conv in convs:
        blocks += [conv, nn.GroupNorm(1, hidden), nn.GELU()]
    return nn.Sequential(*blocks)


class CNNEncoder(nn.Module):
    """`layers` stride-2 3x3 conv blocks of `hidden` channels, global average pool, Linear.

    GroupNorm(1, C) (a LayerNorm over channels and pixels) rather than BatchNorm: BatchNorm's
    batch statistics differ per DDP worker and are noisy on small per-worker batches.

    Images arrive in [0, 1], unnormalised (augmentations work on them); with `mean`/`std`
    (per channel, the manifest's train-split constants, given when data.normalize is on) the
    encoder standardises them first. The constants are non-persistent buffers: they come
    from the data set's manifest, not from the checkpoint, so older checkpoints still load.
    """

    def __init__(self, channels: int, cfg: EncoderConfig, embed_dim: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.normalizes = mean is not None and std is not None
        if self.normalizes:
            shape = (1, channels, 1, 1)
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape),
                                 persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape)
                                 .clamp(min=1e-6), persistent=False)
        self.convs = conv_blocks(
            [nn.Conv2d(channels if i == 0 else cfg.hidden, cfg.hidden, 3, stride=2, padding=1)
             for i in range(cfg.layers)], cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden, embed_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.normalizes:
            x = (x - self.mean) / self.std
        pooled = self.convs(x).mean(dim=(-2, -1))
        return self.out(self.drop(pooled))


class TextEncoder(nn.Module):
    """Token embedding, mean over the real tokens (`mask`, all tokens without one), MLP.
    `forward(ids (B, L) int64, mask (B, L) bool | None) -> (B, embed_dim)`."""

    def __init__(self, vocab_size: int, cfg: EncoderConfig, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.hidden)
        self.mlp = MLPEncoder(cfg.hidden, cfg, embed_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        tokens = self.embed(x.long())
        if mask is None:
            return self.mlp(tokens.mean(dim=1))
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        # An all-padding row (empty text) pools to zeros rather than dividing by zero.
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.mlp(pooled)


class LogMel(nn.Module):
    """A log-mel spectrogram of a mono waveform (B, S) -> (B, n_mels, frames), in torch on the
    input's device: a Hann-windowed STFT (`torch.stft`, window = FFT size = the power of two
    nearest 32 ms, hop half of it), power spectrum, a fixed triangular mel filter bank (HTK mel
    scale, 0 Hz to Nyquist), log. It has no trainable parameters; the window and the filter
    bank are non-persistent buffers (derived from the sample rate, not stored in checkpoints).
    It always computes in float32 (FFTs of bf16 are not supported; autocast is off inside)."""

    def __init__(self, sample_rate: int, n_mels: int = 64):
        super().__init__()
        self.n_fft = 2 ** max(3, round(math.log2(0.032 * sample_rate)))
        self.hop = self.n_fft // 2
        # At most one mel band per 4 FFT bins: narrower bands at low rates would be empty.
        self.n_mels = max(1, min(n_mels, self.n_fft // 4))
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("filters", mel_filters(sample_rate, self.n_fft, self.n_mels),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(x.float(), self.n_fft, self.hop, window=self.window.float(),
                              center=True, pad_mode="constant", return_complex=True)
            power = torch.view_as_real(spec).square().sum(-1)  # (B, n_fft // 2 + 1, frames)
            return torch.log(torch.matmul(self.filters.float(), power) + 1e-6)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters equally spaced on the HTK mel scale from
    0 Hz to sample_rate / 2, each peaking at 1."""
    def to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges_mel = torch.linspace(0.0, float(to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2,
                               dtype=torch.float64)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins - lo) / (mid - lo)
    down = (hi - bins) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class AudioEncoder(nn.Module):
    """A log-mel front end (LogMel: 64 bands, 32 ms windows, 16 ms hop) over the mono waveform
    (B, S), then `layers` (at least 2) stride-2 3x3 conv blocks over the (mel, time) map whose
    widths double up to `hidden` (hidden/2, hidden for 2 layers), global average pool, Linear.

    The log-mel map is standardised per example (GroupNorm over the whole map, learnt scale
    and shift), so the network sees the same range whatever the recording's level; GroupNorm
    in the conv blocks for the reason CNNEncoder has. At 16 kHz, 1 s, the default hidden 128:
    ~40 MFLOP per sample forward (the former strided 1-D conv over the raw waveform: 173).

    Audio modalities are fixed-length (the schema refuses variable-length audio), so the
    padding `mask` of the encoder interface is accepted and ignored, as before; an absent
    (all-zero) waveform encodes to the same constant embedding as any other silence."""

    def __init__(self, cfg: EncoderConfig, embed_dim: int, sample_rate: int | None = None):
        super().__init__()
        self.melspec = LogMel(int(sample_rate or 16000))
        self.norm = nn.GroupNorm(1, 1)
        layers = max(2, cfg.layers)
        widths = [max(8, cfg.hidden // 2 ** (layers - 1 - i)) for i in range(layers)]
        widths[-1] = cfg.hidden
        blocks: list[nn.Module] = []
        for i, width in enumerate(widths):
            blocks += [nn.Conv2d(1 if i == 0 else widths[i - 1], width, 3, stride=2, padding=1),
                       nn.GroupNorm(1, width), nn.GELU()]
        self.convs = nn.Sequential(*blocks)
        bands = self.melspec.n_mels
        for _ in widths:
            bands = (bands - 1) // 2 + 1  # a stride-2, padding-1 3x3 conv's output size
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden * bands, embed_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mel = self.norm(self.melspec(x).unsqueeze(1).to(self.out.weight.dtype))
        pooled = self.convs(mel).mean(dim=-1).flatten(1)  # over time: (B, hidden * bands)
        return self.out(self.drop(pooled))


def resolve_kind(spec: ModalitySpec, cfg: EncoderConfig) -> str:
    """The concrete encoder kind for a modality, or a ConfigError saying which kinds fit."""
    allowed = ALLOWED_KINDS[spec.kind]
    if cfg.kind not in allowed:
        raise ConfigError(
            f"modality {spec.name!r} is a {spec.kind} of shape {list(spec.shape)}; encoder kind "
            f"{cfg.kind!r} does not fit it. Allowed encoder kinds for a {spec.kind}: "
            f"{list(allowed)} (set model.encoders.{spec.name}.kind or model.encoder.kind)")
    return AUTO_KIND[spec.kind] if cfg.kind == "auto" else cfg.kind


def build_encoder(spec: ModalitySpec, cfg: EncoderConfig, embed_dim: int) -> nn.Module:
    """An encoder mapping (B, *spec.shape) to (B, embed_dim) for one modality, of the kind
    the config names (a built-in, a registered or a "module:Class" plug-in kind)."""
    name = AUTO_KIND.get(spec.kind, cfg.kind) if cfg.kind == "auto" else cfg.kind
    entry = registry.lookup(name, f"model.encoders.{spec.name}.kind (or model.encoder.kind)")
    if entry.fits is not None and spec.kind not in entry.fits:
        if name in registry.BUILTIN:
            resolve_kind(spec, cfg)  # mmcl's own message, listing the kinds that fit
        raise ConfigError(f"modality {spec.name!r} is a {spec.kind}; encoder kind {name!r} "
                          f"fits only {list(entry.fits)} (set model.encoders.{spec.name}.kind)")
    encoder = entry.builder()(spec, cfg, embed_dim)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"encoder kind {name!r} built a {type(encoder).__name__} for "
                          f"modality {spec.name!r}, not a torch.nn.Module")
    return encoder


def _build_builtin(spec: ModalitySpec, cfg: EncoderConfig, embed_dim: int) -> nn.Module:
    kind = resolve_kind(spec, cfg)
    if kind == "mlp":
        return MLPEncoder(math.prod(spec.shape), cfg, embed_dim)
    if kind == "gru":
        return GRUEncoder(spec.shape[-1], cfg, embed_dim)
    if kind == "text":
        return TextEncoder(int(spec.vocab_size), cfg, embed_dim)
    if kind == "audio":
        return AudioEncoder(cfg, embed_dim, spec.sample_rate)
    if kind == "transformer":
        steps, features = spec.shape
        return TransformerEncoder(steps, features, cfg, embed_dim)
    return CNNEncoder(spec.shape[0], cfg, embed_dim, spec.mean, spec.std)


def _register_builtins() -> None:
    names = {k for allowed in ALLOWED_KINDS.values() for k in allowed} - {"auto"}
    for name in sorted(names):
        fits = tuple(m for m, allowed in ALLOWED_KINDS.items() if name in allowed)
        registry.register_builtin(name, _build_builtin, fits)
    # Any modality kind: the backbone's own input decides what it takes.
    registry.register_builtin("hf", "mmcl.models.hf:HFEncoder", None)


_register_builtins()
