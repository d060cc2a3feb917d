"""Encoder kind hf: tiny transformers models built from configs, saved with save_pretrained
to a temporary folder and read back by path through the real `pretrained: true` code (nothing
is downloaded)."""

import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmcl  # noqa: E402
from mmcl import config  # noqa: E402
from mmcl.config import ConfigError, EncoderConfig  # noqa: E402
from mmcl.data.schema import Manifest, ModalitySpec  # noqa: E402
from mmcl.models import build_encoder  # noqa: E402
from mmcl.train.checkpoint import export_model  # noqa: E402
from mmcl.train.engine import Engine  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]
IMAGE = ModalitySpec("img", (3, 32, 32), "image")
VECTOR = ModalitySpec("vec", (8,), "vector")
# The schema's text/audio kinds come with data format v2; encoders only read these fields.
TEXT = SimpleNamespace(name="caption", shape=(12,), kind="text", dtype="int64")
AUDIO = SimpleNamespace(name="sound", shape=(1600,), kind="audio", dtype="float32")


def tiny(model_type: str, **extra) -> dict:
    return dict(model_type=model_type, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, **extra)


VIT = tiny("vit", image_size=32, patch_size=8, num_channels=3)
BERT = tiny("bert", vocab_size=len(VOCAB), max_position_embeddings=32, pad_token_id=0)
WAV2VEC2 = tiny("wav2vec2", conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                feat_extract_norm="layer", mask_time_prob=0.0, vocab_size=8)


def save_tiny(folder, raw: dict) -> str:
    raw = dict(raw)
    hf_cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(hf_cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = {name: save_tiny(root / name, raw)
             for name, raw in (("vit", VIT), ("bert", BERT), ("wav2vec2", WAV2VEC2))}
    # A WordLevel tokenizer built here: the text model's vocabulary, saved beside it.
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(VOCAB)},
                                               unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "bert" / "tokenizer.json"))
    return paths


def hf(path: str, **fields) -> EncoderConfig:
    return EncoderConfig(kind="hf", model=path, **fields)


def token_batch(models, lengths=(12, 7, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(f"{models['bert']}/tokenizer.json")
    ids = torch.zeros(len(lengths), 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        words = " ".join(f"w{(row * 5 + i) % 27}" for i in range(n - 2))
        encoded = [2] + tok.encode(words).ids + [3]
        ids[row, :n] = torch.tensor(encoded)
    mask = torch.arange(12) < torch.tensor(lengths).unsqueeze(1)
    return ids, mask


# --------------------------------------------------------------------- building and inputs


def test_pretrained_true_reads_the_saved_weights(models):
    encoder = build_encoder(IMAGE, hf(models["vit"]), 16)
    saved = transformers.AutoModel.from_pretrained(models["vit"])
    name, param = next(iter(saved.named_parameters()))
    assert torch.equal(dict(encoder.backbone.named_parameters())[name], param)
    fresh = build_encoder(IMAGE, hf(models["vit"], pretrained=False), 16)
    assert not torch.equal(dict(fresh.backbone.named_parameters())[name], param)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def test_inline_config_builds_a_fresh_model_without_a_folder():
    encoder = build_encoder(IMAGE, EncoderConfig(kind="hf", hf_config=VIT), 16)
    assert encoder.backbone.config.hidden_size == 32
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def test_images_are_normalised_with_the_processor_constants(models, tmp_path):
    default = build_encoder(IMAGE, hf(models["vit"]), 8)
    assert torch.allclose(default.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    folder = save_tiny(tmp_path / "vit", VIT)
    with open(f"{folder}/preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, f)
    encoder = build_encoder(IMAGE, hf(folder), 8)
    assert torch.allclose(encoder.std.flatten(), torch.tensor([0.25] * 3))
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    encoder.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    encoder(x)
    assert torch.allclose(seen["pixel_values"], (x - 0.5) / 0.25)


def test_grayscale_images_feed_a_three_channel_model(models):
    gray = ModalitySpec("img", (1, 32, 32), "image")
    assert build_encoder(gray, hf(models["vit"]), 8)(torch.rand(2, 1, 32, 32)).shape == (2, 8)


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_padded_tokens_never_reach_the_embedding(models, pooling):
    encoder = build_encoder(TEXT, hf(models["bert"], pooling=pooling), 16).eval()
    ids, mask = token_batch(models)
    before = encoder(ids, mask=mask)
    changed = ids.masked_fill(~mask, 17)  # other values at every padded position
    assert torch.allclose(encoder(changed, mask=mask), before, atol=1e-5)
    # ...while a real token does change its row
    real = ids.clone()
    real[1, 2] = 9
    assert not torch.allclose(encoder(real, mask=mask)[1], before[1], atol=1e-5)


def test_audio_model_takes_waveforms_and_their_padding_mask(models):
    encoder = build_encoder(AUDIO, hf(models["wav2vec2"]), 16).eval()
    wave = torch.randn(2, 1600)
    mask = torch.ones(2, 1600, dtype=torch.bool)
    mask[1, 800:] = False
    out = encoder(wave, mask=mask)
    assert out.shape == (2, 16)
    # The mask reaches the model: the short row's embedding ignores its padded samples.
    noisy = wave.clone()
    noisy[1, 800:] = torch.randn(800)
    assert torch.allclose(encoder(noisy, mask=mask)[1], out[1], atol=1e-4)


# ------------------------------------------------------------------- freezing and the lr


def trainable(encoder) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in encoder.backbone.named_parameters()}


def test_freeze_all_none_and_last_n_blocks(models):
    assert all(trainable(build_encoder(IMAGE, hf(models["vit"]), 8)).values())
    assert not any(trainable(build_encoder(IMAGE, hf(models["vit"], freeze="all"), 8)).values())
    last = build_encoder(IMAGE, hf(models["vit"], freeze=1), 8)
    flags = trainable(last)
    assert not any(v for n, v in flags.items() if n.startswith("embeddings"))
    assert not any(v for n, v in flags.items() if ".0." in n)       # block 0 of 2: frozen
    assert all(v for n, v in flags.items() if ".1." in n)           # block 1: trains
    assert all(v for n, v in flags.items() if n.startswith("layernorm"))
    assert all(p.requires_grad for p in last.proj.parameters())


def test_freeze_more_blocks_than_the_model_has_is_a_config_error(models):
    with pytest.raises(ConfigError, match="freeze: 3 but the model has 2 blocks"):
        build_encoder(IMAGE, hf(models["vit"], freeze=3), 8)


def test_missing_model_folder_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load its weights"):
        build_encoder(IMAGE, hf(str(tmp_path / "nowhere")), 8)
    with pytest.raises(config.ConfigError, match="kind hf needs `model`"):
        config.from_dict({"model": {"encoder": {"kind": "hf"}}})


def test_gradient_checkpointing_is_switched_on(models):
    encoder = build_encoder(TEXT, hf(models["bert"], gradient_checkpointing=True), 8)
    from mmcl.models.hf import checkpointing
    assert checkpointing(encoder.backbone)
    assert not checkpointing(build_encoder(TEXT, hf(models["bert"]), 8).backbone)
    ids, mask = token_batch(models)
    encoder.train()
    encoder(ids, mask=mask).sum().backward()
    assert encoder.backbone.embeddings.word_embeddings.weight.grad is not None


MANIFEST = Manifest([IMAGE, VECTOR])


def run_cfg(models, *overrides):
    return config.load(None, [
        "model.embed_dim=16", "model.proj_hidden=16", "model.proj_dim=8",
        "model.encoder.hidden=16", "model.encoder.layers=1",
        "model.encoders.img.kind=hf", f"model.encoders.img.model={models['vit']}",
        "train.batch_size=4", "train.epochs=1", "train.warmup_epochs=0",
        "augment.default.noise=0.05", "augment.default.dropout=0",
        *overrides])


def batch(n=4):
    gen = torch.Generator().manual_seed(1)
    return {"img": torch.rand(n, 3, 32, 32, generator=gen),
            "vec": torch.randn(n, 8, generator=gen), "id": torch.arange(n)}


def test_lr_scale_and_layer_decay_become_optimiser_groups(models):
    engine = Engine(run_cfg(models, "train.lr=0.01", "model.encoders.img.lr_scale=0.1",
                            "model.encoders.img.layer_decay=0.5"), MANIFEST, steps_per_epoch=2)
    groups = engine.optimizers["main"].param_groups
    # The unscaled group first (the run's lr), then depth L+1=3 (final norm), blocks 2, 1,
    # and the embeddings (depth 0), each at 0.01 * 0.1 * 0.5 ** (3 - depth).
    assert groups[0]["lr"] == pytest.approx(0.01)
    assert sorted(round(g["lr_scale"], 6) for g in groups) == [0.0125, 0.025, 0.05, 0.1, 1.0]
    backbone = engine.objective.encoder.encoders["img"].backbone
    by_id = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert by_id[id(backbone.embeddings.patch_embeddings.projection.weight)] == \
        pytest.approx(0.0125)
    assert by_id[id(backbone.layernorm.weight)] == pytest.approx(0.1)
    head = engine.objective.encoder.encoders["img"].proj.weight
    assert by_id[id(head)] == 1.0


def test_frozen_parameters_do_not_move_in_training(models):
    engine = Engine(run_cfg(models, "model.encoders.img.freeze=1", "train.lr=0.05"),
                    MANIFEST, steps_per_epoch=2)
    backbone = engine.objective.encoder.encoders["img"].backbone
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    for _ in range(2):
        engine.train_step(batch())
    after = dict(backbone.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    moved = [n for n, p in after.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert frozen and moved
    assert all(torch.equal(after[n], before[n]) for n in frozen)


# ---------------------------------------------------------------------------- export/load


def test_export_loads_without_the_model_folder_and_embeds_the_same(models, tmp_path):
    import shutil

    folder = save_tiny(tmp_path / "vit", VIT)
    with open(f"{folder}/preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}, f)
    cfg = run_cfg({"vit": folder}, "train.lr=0.05")
    engine = Engine(cfg, MANIFEST, steps_per_epoch=2)
    engine.train_step(batch())
    engine.objective.eval()
    expected = engine.objective.embed(batch())
    out = export_model(engine.state_dict(), cfg, MANIFEST, str(tmp_path / "model"))
    shutil.rmtree(folder)  # neither the model folder nor the hub is there at load time

    model = mmcl.load(out)
    assert torch.allclose(model.embed({k: v.numpy() for k, v in batch().items()}), expected,
                          atol=1e-6)
    encoder = model.objective.encoder.encoders["img"]
    assert torch.allclose(encoder.mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    # The backbone folder is an ordinary transformers folder.
    backbone_dir = tmp_path / "model" / "backbones" / "img"
    assert sorted(p.name for p in backbone_dir.iterdir()) == ["config.json", "model.safetensors"]
    plain = transformers.AutoModel.from_pretrained(str(backbone_dir))
    assert torch.equal(plain.layernorm.weight, encoder.backbone.layernorm.weight)
    assert not any(k.startswith("encoder.encoders.img.backbone.")
                   for k in torch.load(tmp_path / "model" / "weights.pt", weights_only=True))


TEXT_SPEC = ModalitySpec("caption", (12,), "text", "int64", vocab_size=len(VOCAB), pad_id=0,
                         mask_id=4, tokenizer="local WordLevel")
TEXT_MANIFEST = Manifest([TEXT_SPEC, VECTOR])


def text_cfg(models, *overrides):
    return config.load(None, [
        "model.embed_dim=16", "model.proj_hidden=16", "model.proj_dim=8",
        "model.encoder.hidden=16", "model.encoder.layers=1",
        "model.encoders.caption.kind=hf", f"model.encoders.caption.model={models['bert']}",
        "model.encoders.caption.pooling=cls", "train.batch_size=3", "train.warmup_epochs=0",
        "augment.per_modality.caption.token_mask=0.3",
        "augment.per_modality.caption.token_delete=0.2",
        "augment.per_modality.caption.crop=0.3", *overrides])


def stored_text_batch(models):
    ids, mask = token_batch(models)
    return {"caption": ids.numpy(), "caption__len": mask.sum(1).numpy(),
            "vec": torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).numpy()}


def test_text_model_trains_exports_and_loads_with_padding_that_never_leaks(models, tmp_path):
    cfg = text_cfg(models)
    engine = Engine(cfg, TEXT_MANIFEST, steps_per_epoch=2)
    stored = stored_text_batch(models)
    as_tensors = {k: torch.as_tensor(v) for k, v in stored.items()}
    assert engine.train_step(as_tensors) is not None  # augmented ids + masks train
    engine.objective.eval()
    expected = engine.objective.embed(engine.prepare(as_tensors))

    model = mmcl.load(export_model(engine.state_dict(), cfg, TEXT_MANIFEST,
                                   str(tmp_path / "model")))
    assert torch.allclose(model.embed(stored), expected, atol=1e-6)
    lengths = torch.as_tensor(stored["caption__len"])
    padded = torch.arange(12) >= lengths.unsqueeze(1)
    changed = dict(stored, caption=torch.as_tensor(stored["caption"]).masked_fill(
        padded, 9).numpy())
    assert torch.allclose(model.embed(changed), expected, atol=1e-5)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(models):
    big = ModalitySpec("caption", (12,), "text", "int64", vocab_size=1000)
    with pytest.raises(ConfigError, match="1000 token ids, the hf model only 32"):
        build_encoder(big, hf(models["bert"]), 8)


def test_the_shipped_hf_config_builds_with_local_models(models):
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "hf_image_text.yaml"
    cfg = config.load(path, [f"model.encoders.image.model={models['vit']}", "model.encoders."
                             "image.freeze=1", f"model.encoders.caption.model={models['bert']}",
                             "model.encoders.caption.freeze=1"])
    manifest = Manifest([ModalitySpec("image", (3, 32, 32), "image", "uint8"),
                         ModalitySpec("caption", (12,), "text", "int64",
                                      vocab_size=len(VOCAB), mask_id=4)])
    engine = Engine(cfg, manifest, steps_per_epoch=1)
    ids, mask = token_batch(models)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert engine.train_step({"image": images, "caption": ids,
                              "caption__len": mask.sum(1)}) is not None
