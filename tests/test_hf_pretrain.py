"""hf encoders end to end on local Ray: a format-v2 image+text data set, a tiny ViT and a
tiny BERT saved to a temporary folder and read by path (`pretrained: true`), 1 epoch on 2 Ray
Train workers, a rerun that resumes, and an export that mmcl.load embeds from without the
model folders."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")

import mmcl  # noqa: E402
from mmcl import config  # noqa: E402
from mmcl.data.schema import LabelSpec, Manifest, ModalitySpec  # noqa: E402
from mmcl.data.shards import read_split, write_dataset  # noqa: E402
from mmcl.train import launcher  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           image_size=32, patch_size=8, num_channels=3)
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=40, max_position_embeddings=32, pad_token_id=0)


def save_tiny(folder, model_type, raw) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(
        transformers.AutoConfig.for_model(model_type, **raw))
    model.save_pretrained(folder)
    return str(folder)


def image_text_dataset(root) -> str:
    rng = np.random.default_rng(0)
    manifest = Manifest([ModalitySpec("img", (3, 32, 32), "image", "uint8"),
                         ModalitySpec("txt", (10,), "text", "int64", vocab_size=40, pad_id=0,
                                      mask_id=4, tokenizer="local WordLevel")],
                        [LabelSpec("cls", "classification", 2)])

    def split(n, start):
        label = rng.integers(0, 2, n)
        img = rng.integers(0, 128, (n, 3, 32, 32)) + 120 * label[:, None, None, None]
        txt = rng.integers(5, 40, (n, 10))
        txt[:, 0] = 2
        return {"id": np.arange(start, start + n), "img": img.astype(np.uint8), "txt": txt,
                "txt__len": rng.integers(3, 11, n), "cls": label}

    write_dataset(str(root), manifest, {"train": split(48, 0), "val": split(8, 48),
                                        "test": split(8, 56)}, stats_split="train")
    return str(root)


def run_config(tmp_path, vit, bert, data, epochs):
    return config.load(None, [
        f"data.path={data}", "train.batch_size=8", "train.warmup_epochs=0",
        f"train.epochs={epochs}", "train.checkpoint_every=1", "scaling.num_workers=2",
        "model.embed_dim=16", "model.proj_hidden=16", "model.proj_dim=16",
        "model.fusion_heads=2",
        "model.encoders.img.kind=hf", f"model.encoders.img.model={vit}",
        "model.encoders.img.freeze=all",
        "model.encoders.txt.kind=hf", f"model.encoders.txt.model={bert}",
        "model.encoders.txt.pooling=cls", "model.encoders.txt.lr_scale=0.5",
        "augment.per_modality.img.crop=0.3", "augment.per_modality.img.flip=0.5",
        "augment.per_modality.img.color_jitter=0.5", "augment.per_modality.img.noise=0",
        "augment.per_modality.img.dropout=0",
        "augment.per_modality.txt.token_mask=0.2", "augment.per_modality.txt.crop=0.3",
        f"storage.path={tmp_path / 'runs'}", "storage.name=hf"])


def test_hf_encoders_pretrain_on_two_workers_resume_export_and_load(tmp_path):
    vit = save_tiny(tmp_path / "vit", "vit", VIT)
    bert = save_tiny(tmp_path / "bert", "bert", BERT)
    data = image_text_dataset(tmp_path / "data")

    first = launcher.pretrain(run_config(tmp_path, vit, bert, data, epochs=1))
    # As if the driver had been killed after epoch 1's checkpoint, before the export (a
    # finished run is never resumed): the rerun with more epochs resumes from the checkpoint.
    shutil.rmtree(first.model_url)
    resumed = launcher.pretrain(run_config(tmp_path, vit, bert, data, epochs=2))
    with open(os.path.join(resumed.run_url, "metrics.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert first.run_url == resumed.run_url and epochs == [1, 2]

    trained_bert = os.path.join(resumed.model_url, "backbones", "txt")
    frozen_vit = os.path.join(resumed.model_url, "backbones", "img")
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
    shutil.rmtree(bert)  # mmcl.load needs neither the model folders nor the hub
    model = mmcl.load(resumed.run_url)
    batch = {k: v for k, v in read_split(data, "test").items()}
    embedded = model.embed(batch)
    assert embedded.shape == (8, 16) and torch.isfinite(embedded).all()
    assert set(model.modality_embeddings(batch)) == {"img", "txt"}
