"""`mmcl bench perf` section hf_encoders: the training step of an image+text model with
Hugging Face backbones (a ViT and a BERT built from their configs, nothing downloaded),
trainable against frozen (`freeze: all`), the share of the step its encoders take, and
TupleInfoNCE's step against a plain tuple-contrast step with the same backbones (issue 20's
"with real backbones" goal).

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
