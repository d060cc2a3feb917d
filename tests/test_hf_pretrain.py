"""hf encoders end to end on local Ray: an image+text+audio data set built by `mmcl data
import` from real files (PNG/JPEG, captions in a CSV with a local tokenizer, WAV clips), a
tiny ViT, a tiny BERT and a tiny Wav2Vec2 freshly initialised from configs, saved to a
temporary folder and read by path (`pretrained: true`), 1 epoch on 2 Ray Train workers, a
rerun that resumes, and an export that mmcl.load embeds from without the model folders."""

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")

import mmcl  # noqa: E402
from mmcl import config  # noqa: E402
from mmcl.data.shards import read_split  # noqa: E402
from mmcl.train import launcher  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           image_size=16, patch_size=8, num_channels=3)
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=40, max_position_embeddings=32, pad_token_id=0)
WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                mask_time_prob=0.0, vocab_size=8)


def save_tiny(folder, model_type, raw) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(
        transformers.AutoConfig.for_model(model_type, **raw))
    model.save_pretrained(folder)
    return str(folder)


def imported_dataset(tmp_path) -> str:
    """`mmcl data import` of real files: PNG/JPEG images and captions in a CSV (a local
    WordLevel tokenizer), and a WAV clip per row (two sample rates, resampled at import)."""
    import csv

    from import_files import image_text_table, write_spec, write_wav

    from mmcl.cli import main

    src = tmp_path / "src"
    table, spec = image_text_table(src, n=64)
    with open(table) as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        write_wav(src / f"{i}.wav", 200.0 + 50 * (i % 4), rate=16000 if i % 2 else 8000,
                  seconds=0.1)
        row["wav"] = f"{i}.wav"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec["modalities"]["sound"] = {"column": "wav", "kind": "audio", "sample_rate": 4000,
                                   "length": 400}
    out = tmp_path / "data"
    assert main(["data", "import", table, "--out", str(out),
                 "--spec", write_spec(src / "spec.yaml", spec)]) == 0
    return str(out)


def run_config(tmp_path, vit, bert, wav, data, epochs):
    return config.load(None, [
        f"data.path={data}", "train.batch_size=8", "train.warmup_epochs=0",
        f"train.epochs={epochs}", "train.checkpoint_every=1", "scaling.num_workers=2",
        "model.embed_dim=16", "model.proj_hidden=16", "model.proj_dim=16",
        "model.fusion_heads=2",
        "model.encoders.image.kind=hf", f"model.encoders.image.model={vit}",
        "model.encoders.image.freeze=all",
        "model.encoders.caption.kind=hf", f"model.encoders.caption.model={bert}",
        "model.encoders.caption.pooling=cls", "model.encoders.caption.lr_scale=0.5",
        "model.encoders.sound.kind=hf", f"model.encoders.sound.model={wav}",
        "augment.per_modality.image.crop=0.3", "augment.per_modality.image.flip=0.5",
        "augment.per_modality.image.color_jitter=0.5", "augment.per_modality.image.noise=0",
        "augment.per_modality.image.dropout=0",
        "augment.per_modality.caption.token_mask=0.2", "augment.per_modality.caption.crop=0.3",
        "storage.path=runs", "storage.name=hf"])


def test_hf_encoders_pretrain_on_two_workers_resume_export_and_load(tmp_path, monkeypatch):
    vit = save_tiny(tmp_path / "vit", "vit", VIT)
    bert = save_tiny(tmp_path / "bert", "bert", BERT)
    wav = save_tiny(tmp_path / "wav2vec2", "wav2vec2", WAV2VEC2)
    data = imported_dataset(tmp_path)
    # The config names the data, the run storage and the model folders relative to a working
    # directory that is not the Ray workers' (README: `model: ./my-bert`, `storage.path:
    # ./runs`): the driver resolves them before anything is shipped.
    monkeypatch.chdir(tmp_path)
    relative = dict(vit="./vit", bert="./bert", wav="./wav2vec2", data="data")

    first = launcher.pretrain(run_config(tmp_path, **relative, epochs=1))
    # The online probe read the val slice on rank 0 (a relative data.path there did not).
    assert "probe_colour" in first.history[-1]
    assert first.run_url == str(tmp_path / "runs" / "hf")
    # As if the driver had been killed after epoch 1's checkpoint, before the export (a
    # finished run is never resumed): the rerun with more epochs resumes from the checkpoint.
    shutil.rmtree(first.model_url)
    resumed = launcher.pretrain(run_config(tmp_path, **relative, epochs=2))
    with open(os.path.join(resumed.run_url, "metrics.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert first.run_url == resumed.run_url and epochs == [1, 2]

    trained_bert = os.path.join(resumed.model_url, "backbones", "caption")
    frozen_vit = os.path.join(resumed.model_url, "backbones", "image")
    moved = transformers.AutoModel.from_pretrained(trained_bert).embeddings.word_embeddings
    original = transformers.AutoModel.from_pretrained(bert).embeddings.word_embeddings
    assert not torch.equal(moved.weight, original.weight)  # the text backbone trained...
    from safetensors.torch import load_file

    kept = load_file(os.path.join(frozen_vit, "model.safetensors"))
    original_vit = transformers.AutoModel.from_pretrained(vit).state_dict()
    assert kept and not any(k.startswith("pooler.") for k in kept)  # pooling cls: no pooler
    for name, value in kept.items():  # ...and the frozen image backbone did not move
        assert torch.equal(value, original_vit[name]), name

    shutil.rmtree(vit)
    shutil.rmtree(bert)
    shutil.rmtree(wav)  # mmcl.load needs none of the model folders, nor the hub
    model = mmcl.load(resumed.run_url)
    batch = {k: v for k, v in read_split(data, "test").items()}
    embedded = model.embed(batch)
    assert embedded.shape == (len(batch["id"]), 16) and torch.isfinite(embedded).all()
    assert set(model.modality_embeddings(batch)) == {"image", "caption", "sound"}
