"""`mmcl bench perf` sections hf_encoders and encoders.

hf_encoders: the training step of an image+text model with Hugging Face backbones (a ViT and a
BERT built from their configs, nothing downloaded), trainable against frozen (`freeze: all`),
the share of the step its encoders take, and TupleInfoNCE's step against a plain
tuple-contrast step with the same backbones (issue 20's "with real backbones" goal).

encoders: each built-in encoder's forward + backward per batch on one thread and its FLOPs per
sample, the default audio encoder beside the one it replaced and a tiny wav2vec2 (issue 35).

The encoders' share is measured directly: the two views' `encode` (forward) plus a backward
of their embeddings, against the whole `Engine.train_step` (augment, encode, fusion, loss,
backward, clip, optimiser step) on the same batch, in interleaved rounds. The rest of the step
is fusion, loss, augmentation and the optimiser. On a GPU the step is also timed with bf16
autocast (`train.mixed_precision`).
"""

from __future__ import annotations

from mmcl.bench.timing import interleaved, paired_ratio, quartiles, torch_threads
from mmcl.markdown import table_lines

# (image side, patch, text length, width, layers, batch): quick is a smoke test on a laptop
# CPU, full a ViT-S/BERT-mini scale model.
SIZES = {"quick": (32, 8, 16, 64, 2, 16), "full": (96, 16, 32, 256, 4, 32)}
VOCAB = 1000


def _overrides(side, patch, width, layers, freeze: bool, bf16: bool,
               objective: str = "tuple_infonce") -> list[str]:
    common = f"hidden_size: {width}, num_hidden_layers: {layers}, num_attention_heads: 4, " \
             f"intermediate_size: {4 * width}"
    vit = f"{{model_type: vit, image_size: {side}, patch_size: {patch}, {common}}}"
    bert = f"{{model_type: bert, vocab_size: {VOCAB}, max_position_embeddings: 64, {common}}}"
    out = ["model.embed_dim=128", "model.proj_hidden=256", "model.proj_dim=128",
           "model.encoders.image.kind=hf", f"model.encoders.image.hf_config={vit}",
           "model.encoders.image.pooling=cls",
           "model.encoders.caption.kind=hf", f"model.encoders.caption.hf_config={bert}",
           "augment.per_modality.image.crop=0.9", "augment.per_modality.image.flip=0.5",
           "augment.per_modality.image.color_jitter=0.8", "augment.per_modality.image.noise=0",
           "augment.per_modality.image.dropout=0", "augment.per_modality.caption.token_mask=0.15",
           "augment.per_modality.caption.mask_token_id=3", f"objective.name={objective}",
           "train.seed=0", f"train.mixed_precision={str(bf16).lower()}"]
    if freeze:
        out += ["model.encoders.image.freeze=all", "model.encoders.caption.freeze=all"]
    return out


def hf_encoders(quick: bool) -> dict:
    import torch

    from mmcl import config
    from mmcl.data.schema import Manifest, ModalitySpec
    from mmcl.train.engine import Engine

    side, patch, length, width, layers, batch_size = SIZES["quick" if quick else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = Manifest([ModalitySpec("image", (3, side, side), "image", "uint8"),
                         ModalitySpec("caption", (length,), "text", "int64",
                                      vocab_size=VOCAB, mask_id=3)])
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8,
                                    generator=gen),
             "caption": torch.randint(4, VOCAB, (batch_size, length), generator=gen),
             "caption__len": torch.randint(length // 2, length + 1, (batch_size,),
                                           generator=gen)}
    # name: (freeze, bf16, objective)
    variants = {"trainable": (False, False, "tuple_infonce"),
                "frozen": (True, False, "tuple_infonce"),
                "plain_tuple": (False, False, "tuple")}
    if device == "cuda":
        variants.update({"trainable_bf16": (False, True, "tuple_infonce"),
                         "frozen_bf16": (True, True, "tuple_infonce")})
    engines = {name: Engine(config.load(None, [f"train.batch_size={batch_size}",
                                                *_overrides(side, patch, width, layers,
                                                            freeze, bf16, objective)]),
                            manifest, 10**6, device=device)
               for name, (freeze, bf16, objective) in variants.items()}
    trainable = engines["trainable"]

    def encoders_only():
        prepared = trainable.prepare({k: v.to(device) for k, v in batch.items()})
        views = [trainable.augmenter(prepared, trainable.generator) for _ in range(2)]
        with trainable.autocast():
            total = sum(e.float().sum() for v in views
                        for e in trainable.objective.encoder.encode(v).values())
        total.backward()
        trainable.objective.zero_grad(set_to_none=True)

    def sync(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    fns = {name: sync(lambda e=e: e.train_step(batch)) for name, e in engines.items()}
    fns["encoders_only"] = sync(encoders_only)
    rounds, warmup = (3, 1) if quick else (8, 2)
    with torch_threads(1 if device == "cpu" else torch.get_num_threads()):
        times = interleaved(fns, rounds=rounds, warmup=warmup)
    out = {
        "settings": {"device": device, "batch_size": batch_size, "image": f"3x{side}x{side}",
                     "text_length": length, "backbones": f"ViT and BERT, width {width}, "
                     f"{layers} blocks, built from config", "objective": "tuple_infonce",
                     "rounds": rounds},
        "step_ms": {k: {q: (v * 1e3 if q != "n" else v) for q, v in quartiles(t).items()}
                    for k, t in times.items()},
        "frozen_over_trainable": paired_ratio(times["frozen"], times["trainable"]),
        "encoder_share_of_step": paired_ratio(times["encoders_only"], times["trainable"]),
        "tuple_infonce_over_tuple": paired_ratio(times["trainable"], times["plain_tuple"]),
    }
    if device == "cuda":
        out["bf16_over_fp32"] = paired_ratio(times["trainable_bf16"], times["trainable"])
    return out


def md_hf_encoders(s: dict) -> list[str]:
    def ms(q):
        return f"{q['median']:.1f} ({q['p25']:.1f}-{q['p75']:.1f})"

    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += [""] + table_lines(["step", "ms"], [[k, ms(v)] for k, v in s["step_ms"].items()])
    share = s["encoder_share_of_step"]["median"]
    lines += ["", f"- frozen / trainable step: {s['frozen_over_trainable']['median']:.2f}",
              f"- encoders (two views, forward + backward) / trainable step: {share:.2f}; "
              f"fusion, loss, augmentation and optimiser: {1 - share:.2f}"]
    if "tuple_infonce_over_tuple" in s:
        lines.append("- TupleInfoNCE / plain tuple-contrast step, same backbones: "
                     f"{s['tuple_infonce_over_tuple']['median']:.2f}")
    if "bf16_over_fp32" in s:
        lines.append(f"- bf16 / fp32 trainable step: {s['bf16_over_fp32']['median']:.2f}")
    return lines


# ------------------------------------------------------------------- encoders: cost per step


def _former_audio_encoder(hidden: int, embed_dim: int):
    """mmcl's default audio encoder before issue 35: two stride-4 1-D conv blocks (kernels 9,
    5) of `hidden` channels over the raw waveform, GroupNorm, GELU, global mean, Linear. Kept
    here only as the reference the new default (a log-mel 2-D CNN) is measured against."""
    from torch import nn

    from mmcl.models.encoders import conv_blocks

    class WaveformConvEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = conv_blocks([nn.Conv1d(1, hidden, 9, stride=4, padding=4),
                                      nn.Conv1d(hidden, hidden, 5, stride=4, padding=2)],
                                     hidden)
            self.out = nn.Linear(hidden, embed_dim)

        def forward(self, x, mask=None):
            return self.out(self.convs(x.unsqueeze(1)).mean(dim=-1))

    return WaveformConvEncoder()


# The tiny wav2vec2 of tests/test_hf.py, built from its config (nothing downloaded); no
# layerdrop, so every step (and FLOP count) runs both blocks.
TINY_WAV2VEC2 = dict(model_type="wav2vec2", hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, conv_dim=[16, 16],
                     conv_stride=[5, 4], conv_kernel=[10, 4], num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                     mask_time_prob=0.0, layerdrop=0.0, vocab_size=8)


def encoders(quick: bool) -> dict:
    """Forward + backward of each built-in encoder (default config: hidden 128, 2 layers,
    embed_dim 128) on one batch, one thread, in interleaved rounds; FLOPs per sample counted
    by torch.utils.flop_counter (FFTs are not counted: the log-mel STFT adds ~1.5 MFLOP per
    second of 16 kHz audio)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmcl.config import EncoderConfig
    from mmcl.data.schema import ModalitySpec
    from mmcl.models.encoders import build_encoder

    batch, rounds, warmup = (8, 2, 1) if quick else (64, 7, 1)
    embed, vocab, samples = 128, 1000, 16000
    gen = torch.Generator().manual_seed(0)
    text_len = 32
    # name: (spec, encoder config, input, mask)
    cases = {
        "mlp (vector 64)": (ModalitySpec("v", (64,), "vector"), EncoderConfig(kind="mlp"),
                            torch.randn(batch, 64, generator=gen), None),
        "gru (sequence 32x16)": (ModalitySpec("s", (32, 16), "sequence"),
                                 EncoderConfig(kind="gru"),
                                 torch.randn(batch, 32, 16, generator=gen), None),
        "cnn (image 3x32x32)": (ModalitySpec("i", (3, 32, 32), "image"),
                                EncoderConfig(kind="cnn"),
                                torch.rand(batch, 3, 32, 32, generator=gen), None),
        "text (32 tokens)": (ModalitySpec("t", (text_len,), "text", "int64", vocab_size=vocab),
                             EncoderConfig(kind="text"),
                             torch.randint(4, vocab, (batch, text_len), generator=gen),
                             torch.arange(text_len)[None] < torch.randint(
                                 8, text_len + 1, (batch, 1), generator=gen)),
        "audio, log-mel CNN (default)": (
            ModalitySpec("a", (samples,), "audio", sample_rate=16000),
            EncoderConfig(kind="audio"), torch.randn(batch, samples, generator=gen), None),
        "audio, former waveform 1-D CNN": (
            None, None, torch.randn(batch, samples, generator=gen), None),
        "hf wav2vec2, tiny (width 32, 2 blocks)": (
            ModalitySpec("a", (samples,), "audio", sample_rate=16000),
            EncoderConfig(kind="hf", hf_config=dict(TINY_WAV2VEC2), pretrained=False),
            torch.randn(batch, samples, generator=gen), None),
    }
    torch.manual_seed(0)
    models, rows = {}, {}
    for name, (spec, cfg, x, mask) in cases.items():
        model = (_former_audio_encoder(128, embed) if spec is None
                 else build_encoder(spec, cfg, embed))
        kw = {} if mask is None else {"mask": mask}

        def step(model=model, x=x, kw=kw):
            model(x, **kw).sum().backward()
            model.zero_grad(set_to_none=True)

        models[name] = step
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            model(x, **kw)
        with FlopCounterMode(display=False) as both:
            step()
        rows[name] = {"params": sum(p.numel() for p in model.parameters()),
                      "fwd_mflop_per_sample": fwd.get_total_flops() / batch / 1e6,
                      "fwd_bwd_mflop_per_sample": both.get_total_flops() / batch / 1e6}
    with torch_threads(1):
        times = interleaved(models, rounds=rounds, warmup=warmup)
    for name, t in times.items():
        rows[name]["step_ms"] = {q: (v * 1e3 if q != "n" else v)
                                 for q, v in quartiles(t).items()}
    return {"settings": {"batch_size": batch, "threads": 1, "rounds": rounds,
                         "audio": f"{samples} samples (1 s at 16 kHz)",
                         "config": "hidden 128, layers 2, embed_dim 128 (the defaults)"},
            "rows": [{"encoder": k, **v} for k, v in rows.items()],
            "former_audio_over_new": paired_ratio(times["audio, former waveform 1-D CNN"],
                                                  times["audio, log-mel CNN (default)"])}


def md_encoders(s: dict) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += [""] + table_lines(
        ["encoder", "params", "MFLOP/sample fwd", "MFLOP/sample fwd+bwd",
         "fwd+bwd ms per batch (IQR)"],
        [[r["encoder"], f"{r['params']:,}", f"{r['fwd_mflop_per_sample']:.1f}",
          f"{r['fwd_bwd_mflop_per_sample']:.1f}",
          f"{r['step_ms']['median']:.0f} ({r['step_ms']['p25']:.0f}-{r['step_ms']['p75']:.0f})"]
         for r in s["rows"]])
    ratio = s["former_audio_over_new"]
    lines += ["", f"- former / new audio encoder step time (same-round ratio): "
              f"{ratio['median']:.1f} ({ratio['p25']:.1f}-{ratio['p75']:.1f})"]
    return lines
