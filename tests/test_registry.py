"""The encoder registry: plug-in kinds by decorator or by "module:Class", mmcl's own kinds
through the same table, and one clear error for each way a plug-in can fail."""

import sys
import types

import pytest
import torch
from torch import nn

import mmcl.models
from mmcl import config
from mmcl.config import ConfigError, EncoderConfig
from mmcl.data.schema import Manifest, ModalitySpec
from mmcl.models import MultimodalEncoder, build_encoder, registry
from mmcl.objectives import build_objective

VECTOR = ModalitySpec("vec", (6,), "vector")
SEQ = ModalitySpec("seq", (5, 3), "sequence")


class MeanEncoder(nn.Module):
    """A plug-in: masked mean over time, then Linear; reads its width from `options`."""

    def __init__(self, spec, cfg, embed_dim):
        super().__init__()
        self.scale = cfg.options.get("scale", 1.0)
        self.out = nn.Linear(spec.shape[-1], embed_dim)
        self.masks = []

    def forward(self, x, mask=None):
        self.masks.append(mask)
        if x.dim() == 2:
            return self.out(x) * self.scale
        weights = torch.ones(x.shape[:2]) if mask is None else mask.float()
        pooled = (x * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.out(pooled) * self.scale


@pytest.fixture
def plugin_module(monkeypatch):
    module = types.ModuleType("mmcl_test_plugins")
    module.MeanEncoder = MeanEncoder
    module.not_a_builder = 3
    monkeypatch.setitem(sys.modules, "mmcl_test_plugins", module)
    return module


def test_builtin_kinds_live_in_the_registry():
    assert {"mlp", "gru", "transformer", "cnn", "hf"} <= set(registry.kinds())
    assert registry.lookup("gru").fits == ("sequence",)
    assert registry.lookup("hf").fits is None


def test_decorator_registers_a_kind_a_config_can_name():
    @mmcl.models.register_encoder("test_mean", fits=["vector", "sequence"])
    class Registered(MeanEncoder):
        pass

    cfg = EncoderConfig(kind="test_mean", options={"scale": 2.0})
    encoder = build_encoder(VECTOR, cfg, 4)
    assert isinstance(encoder, Registered) and encoder.scale == 2.0
    assert encoder(torch.randn(3, 6)).shape == (3, 4)
    with pytest.raises(ConfigError, match="fits only \\['vector', 'sequence'\\]"):
        build_encoder(ModalitySpec("img", (1, 4, 4), "image"), cfg, 4)


def test_import_form_builds_the_named_class(plugin_module):
    cfg = config.from_dict({"model": {"embed_dim": 8, "fusion_heads": 2, "encoders": {
        "seq": {"kind": "mmcl_test_plugins:MeanEncoder", "options": {"scale": 0.5}}}}})
    model = MultimodalEncoder([VECTOR, SEQ], cfg.model)
    assert isinstance(model.encoders["seq"], MeanEncoder)
    assert "mmcl_test_plugins:MeanEncoder" not in registry.kinds()  # listed names stay short


def test_the_padding_mask_reaches_the_encoder_and_padding_never_leaks(plugin_module):
    cfg = config.from_dict({"model": {"embed_dim": 8, "fusion_heads": 2, "encoders": {
        "seq": {"kind": "mmcl_test_plugins:MeanEncoder"}}}})
    model = MultimodalEncoder([VECTOR, SEQ], cfg.model).eval()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    batch = {"vec": torch.randn(2, 6), "seq": torch.randn(2, 5, 3), "seq__mask": mask}
    out = model.encode(batch)
    assert torch.equal(model.encoders["seq"].masks[-1], mask)
    assert out.present is None
    changed = dict(batch, seq=batch["seq"].masked_fill(~mask.unsqueeze(-1), 9.0))
    assert torch.allclose(model.encode(changed)["seq"], out["seq"])
    # No mask key: encoders of fixed-size inputs are called without one.
    model.encode({"vec": batch["vec"], "seq": batch["seq"]})
    assert model.encoders["seq"].masks[-1] is None


def test_presence_flags_come_back_on_the_embeddings():
    model = MultimodalEncoder([VECTOR, SEQ], config.from_dict(
        {"model": {"embed_dim": 8, "fusion_heads": 2}}).model)
    present = torch.tensor([True, False])
    out = model.encode({"vec": torch.randn(2, 6), "seq": torch.randn(2, 5, 3),
                        "seq__present": present})
    assert isinstance(out, dict) and set(out) == {"vec", "seq"}
    assert torch.equal(out.present["seq"], present) and set(out.present) == {"seq"}


@pytest.mark.parametrize("kind, message", [
    ("no_such_package_xyz.mod:Enc", "cannot import module 'no_such_package_xyz.mod'"),
    ("mmcl_test_plugins:Missing", "has no 'Missing'"),
    ("mmcl_test_plugins:not_a_builder", "is a int, not a class or function"),
    ("not_registered_kind", "unknown encoder kind 'not_registered_kind'"),
])
def test_a_plugin_that_cannot_be_used_is_one_config_error(plugin_module, kind, message):
    with pytest.raises(ConfigError, match=message):
        build_encoder(VECTOR, EncoderConfig(kind=kind), 4)


def test_a_plugin_that_fails_to_build_a_module_is_a_config_error(plugin_module):
    plugin_module.returns_tensor = lambda spec, cfg, dim: torch.zeros(1)
    with pytest.raises(ConfigError, match="built a Tensor .* not a torch.nn.Module"):
        build_encoder(VECTOR, EncoderConfig(kind="mmcl_test_plugins:returns_tensor"), 4)


def test_a_plugin_module_that_raises_on_import_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "mmcl_broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing module 'mmcl_broken_plugin' failed: "
                                          "RuntimeError: boom"):
        build_encoder(VECTOR, EncoderConfig(kind="mmcl_broken_plugin:Enc"), 4)


def test_mmcl_own_kinds_cannot_be_replaced_and_kind_text_is_checked():
    with pytest.raises(ValueError, match="one of mmcl's own"):
        mmcl.models.register_encoder("mlp")(MeanEncoder)
    with pytest.raises(ConfigError, match="model.encoder.kind"):
        config.from_dict({"model": {"encoder": {"kind": "bad kind!"}}})
    with pytest.raises(ConfigError, match="options"):
        config.from_dict({"model": {"encoder": {"kind": "mlp", "options": {"a": 1}}}})


def test_a_plugin_encoder_trains_inside_an_objective(plugin_module):
    cfg = config.from_dict({"model": {"embed_dim": 8, "fusion_heads": 2, "proj_hidden": 8,
                                      "proj_dim": 4, "encoders": {
                                          "seq": {"kind": "mmcl_test_plugins:MeanEncoder"}}}})
    objective = build_objective(cfg, Manifest([VECTOR, SEQ]))
    batch = {"vec": torch.randn(4, 6), "seq": torch.randn(4, 5, 3)}
    out = objective([batch] * objective.num_views, batch, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert objective.encoder.encoders["seq"].out.weight.grad is not None


def test_the_shipped_plugin_config_builds_and_trains(monkeypatch):
    from pathlib import Path

    repo = Path(__file__).parent.parent
    monkeypatch.syspath_prepend(str(repo / "configs" / "plugins"))
    cfg = config.load(repo / "configs" / "custom_encoder.yaml")
    manifest = Manifest([ModalitySpec(m, (8,)) for m in "abc"])
    objective = build_objective(cfg, manifest)
    assert type(objective.encoder.encoders["a"]).__name__ == "GatedMLP"
    assert len(objective.encoder.encoders["a"].branches) == 4
    assert type(objective.encoder.encoders["c"]).__name__ == "MLPEncoder"
    batch = {m: torch.randn(4, 8) for m in "abc"}
    objective([batch] * objective.num_views, batch, torch.Generator().manual_seed(0)).loss.backward()
