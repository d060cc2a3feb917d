"""Models: encoder shapes and kind checks, fusion masking semantics, gradient flow, and the
one-pass-per-encoder promise objectives rely on."""

import pytest
import torch

from mmcl.config import ConfigError, EncoderConfig, ModelConfig
from mmcl.data.schema import ModalitySpec
from mmcl.models import (ConcatFusion, LinearFusion, MultimodalEncoder, ProjectionHead,
                         TransformerFusion, build_encoder)
from mmcl.models.fusion import swapped_embeddings

D = 16
VEC = ModalitySpec("vec", (6,), "vector")
SEQ = ModalitySpec("seq", (7, 3), "sequence")
IMG = ModalitySpec("img", (2, 9, 9), "image")
SPECS = [VEC, SEQ, IMG]
NAMES = [s.name for s in SPECS]


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(embed_dim=D, encoder=EncoderConfig(hidden=12, layers=2),
                       proj_hidden=24, fusion_heads=2, **kw)


def batch_of(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {s.name: torch.randn(n, *s.shape, generator=g) for s in SPECS}
    batch.update(label=torch.arange(n), id=torch.arange(n) + 100)
    return batch


def embeddings_of(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, D, generator=g) for m in NAMES}


@pytest.mark.parametrize("spec,kind", [
    (VEC, "auto"), (VEC, "mlp"),
    (SEQ, "auto"), (SEQ, "gru"), (SEQ, "transformer"), (SEQ, "mlp"),
    (IMG, "auto"), (IMG, "cnn"), (IMG, "mlp"),
])
def test_encoder_output_shape(spec, kind):
    enc = build_encoder(spec, EncoderConfig(kind=kind, hidden=12, layers=2), D)
    out = enc(torch.randn(3, *spec.shape))
    assert out.shape == (3, D) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hidden", [5, 6, 8])
def test_transformer_encoder_takes_any_hidden_size(hidden):
    enc = build_encoder(SEQ, EncoderConfig(kind="transformer", hidden=hidden, layers=1), D)
    assert enc(torch.randn(2, *SEQ.shape)).shape == (2, D)


def test_auto_picks_the_documented_encoders():
    auto = EncoderConfig(kind="auto", hidden=8, layers=1)
    kinds = {s.name: type(build_encoder(s, auto, D)).__name__ for s in SPECS}
    assert kinds == {"vec": "MLPEncoder", "seq": "GRUEncoder", "img": "CNNEncoder"}


@pytest.mark.parametrize("spec,kind", [(VEC, "gru"), (VEC, "transformer"), (VEC, "cnn"),
                                       (SEQ, "cnn"), (IMG, "gru"), (IMG, "transformer")])
def test_encoder_kind_that_does_not_fit_is_a_config_error(spec, kind):
    with pytest.raises(ConfigError) as err:
        build_encoder(spec, EncoderConfig(kind=kind), D)
    message = str(err.value)
    assert repr(spec.name) in message and spec.kind in message and repr(kind) in message
    assert "'mlp'" in message  # the allowed kinds are listed


def test_per_modality_encoder_override_is_used():
    cfg = small_cfg(encoders={"seq": EncoderConfig(kind="transformer", hidden=8, layers=1)})
    model = MultimodalEncoder(SPECS, cfg)
    assert type(model.encoders["seq"]).__name__ == "TransformerEncoder"
    assert type(model.encoders["vec"]).__name__ == "MLPEncoder"


def test_bad_override_fails_when_the_model_is_built():
    cfg = small_cfg(encoders={"img": EncoderConfig(kind="gru")})
    with pytest.raises(ConfigError, match="'img'"):
        MultimodalEncoder(SPECS, cfg)


@pytest.mark.parametrize("fusion", ["concat", "transformer"])
def test_multimodal_shapes_and_non_modality_keys_ignored(fusion):
    model = MultimodalEncoder(SPECS, small_cfg(fusion=fusion))
    batch = batch_of()
    embeddings = model.encode(batch)
    assert sorted(embeddings) == sorted(NAMES)
    assert all(e.shape == (5, D) for e in embeddings.values())
    assert model(batch).shape == (5, D)
    for keep in (["vec"], ["seq", "img"], NAMES):
        assert model.fuse(embeddings, keep).shape == (5, D)
    assert isinstance(model.fusion, ConcatFusion if fusion == "concat" else TransformerFusion)


def test_linear_fusion_is_one_linear_layer():
    model = MultimodalEncoder(SPECS, small_cfg(fusion="linear"))
    assert isinstance(model.fusion, LinearFusion) and not model.fusion.supports_missing
    assert isinstance(model.fusion.mlp, torch.nn.Linear)
    assert model(batch_of()).shape == (5, D)


def reference_transformer(fusion, e, kept):
    """nn.TransformerEncoder over the whole sequence, CLS out: what the fusion must equal."""
    index = [fusion.modalities.index(m) for m in kept]
    tokens = torch.stack([e[m] for m in kept], dim=1) + fusion.type_embed[index]
    cls = fusion.cls.expand(tokens.shape[0], -1, -1)
    return fusion.norm(fusion.layers(torch.cat([cls, tokens], dim=1))[:, 0])


@pytest.mark.parametrize("layers", [1, 2])
def test_cls_only_last_layer_equals_the_full_transformer(layers):
    torch.manual_seed(0)
    fusion = TransformerFusion(NAMES, D, layers=layers, heads=2)
    e = embeddings_of()
    for kept in (NAMES, ["seq"], ["vec", "img"]):
        torch.testing.assert_close(fusion(e, kept), reference_transformer(fusion, e, kept),
                                   rtol=0, atol=1e-5)
    # Gradients in float64: LayerNorm of the tiny CLS parameter scales its gradient ~50x,
    # past what float32 rounding can compare at 1e-5.
    fusion, e = fusion.double(), {m: v.double().requires_grad_() for m, v in e.items()}
    inputs = list(fusion.parameters()) + list(e.values())
    for kept in (NAMES, ["vec", "img"]):
        out, ref = fusion(e, kept), reference_transformer(fusion, e, kept)
        g = torch.randn_like(out)
        mine = torch.autograd.grad(out, inputs, g, allow_unused=True)
        theirs = torch.autograd.grad(ref, inputs, g, allow_unused=True)
        for a, b in zip(mine, theirs):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layers", [1, 2])
def test_absent_modality_values_change_nothing(layers):
    torch.manual_seed(0)
    fusion = TransformerFusion(NAMES, D, layers=layers, heads=2)
    e = embeddings_of(n=5)
    present = {"seq": torch.tensor([True, False, True, True, False])}
    out = fusion(e, present=present)
    junk = e["seq"].clone()
    junk[~present["seq"]] = torch.tensor([1e4, float("nan")]).repeat(D // 2)
    torch.testing.assert_close(fusion({**e, "seq": junk}, present=present), out, rtol=0, atol=0)
    # An absent row is fused as if its token were dropped; present rows are untouched.
    dropped = fusion({m: e[m][[1, 4]] for m in ("vec", "img")}, ["vec", "img"])
    torch.testing.assert_close(out[[1, 4]], dropped, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[[0, 2, 3]], fusion(e)[[0, 2, 3]], rtol=0, atol=0)
    # MultimodalEncoder.fuse passes an Embeddings dict's `.present` on.
    model = MultimodalEncoder(SPECS, small_cfg())
    model.fusion = fusion

    class Embeddings(dict):
        pass

    carried = Embeddings(e)
    carried.present = present
    torch.testing.assert_close(model.fuse(carried), out, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["concat", "linear"])
def test_concat_fusions_refuse_absent_rows(kind):
    fusion = (ConcatFusion if kind == "concat" else LinearFusion)(NAMES, D, hidden=20)
    e = embeddings_of(n=3)
    all_there = {"vec": torch.ones(3, dtype=torch.bool)}
    torch.testing.assert_close(fusion(e, present=all_there), fusion(e))
    with pytest.raises(ValueError, match="missing modalities"):
        fusion(e, present={"vec": torch.tensor([True, False, True])})


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("fusion_kind", ["transformer", "concat"])
def test_fuse_swapped_equals_fusing_each_swapped_set(layers, fusion_kind):
    torch.manual_seed(0)
    model = MultimodalEncoder(SPECS, small_cfg(fusion=fusion_kind, fusion_layers=layers))
    e = {m: v.requires_grad_() for m, v in embeddings_of(n=6).items()}
    swaps = [("vec", torch.randperm(6)), ("img", torch.randperm(6)), ("vec", torch.randperm(6))]
    fast = model.fuse_swapped(e, swaps)
    plain = torch.cat([model.fuse({**e, m: e[m][rows]}) for m, rows in swaps])
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    g = torch.randn_like(fast)
    inputs = list(model.fusion.parameters()) + list(e.values())
    for a, b in zip(torch.autograd.grad(fast, inputs, g), torch.autograd.grad(plain, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if fusion_kind == "transformer":  # with absent rows, the swapped-in row's absence travels
        present = {"img": torch.tensor([True, False, True, True, False, True])}
        torch.testing.assert_close(
            model.fusion.fuse_swapped(e, swaps, present),
            model.fusion(swapped_embeddings(e, swaps),
                         present=swapped_embeddings(present, swaps)), rtol=0, atol=1e-5)


def test_transformer_fusion_drops_left_out_modalities():
    torch.manual_seed(0)
    fusion = TransformerFusion(NAMES, D, layers=2, heads=2).eval()
    e = embeddings_of()
    changed_other = {**e, "seq": e["seq"] + 5.0, "img": torch.randn(4, D)}
    changed_kept = {**e, "vec": e["vec"] + 1.0}
    base = fusion(e, ["vec"])
    torch.testing.assert_close(fusion(changed_other, ["vec"]), base, rtol=0, atol=0)
    assert not torch.allclose(fusion(changed_kept, ["vec"]), base)
    # left-out modalities need not even be present
    torch.testing.assert_close(fusion({"vec": e["vec"]}, ["vec"]), base, rtol=0, atol=0)
    # ...but with every modality kept, all of them matter
    assert not torch.allclose(fusion(changed_other), fusion(e))


def test_transformer_fusion_ignores_the_order_of_keep():
    torch.manual_seed(0)
    fusion = TransformerFusion(NAMES, D, layers=1, heads=2).eval()
    e = embeddings_of()
    torch.testing.assert_close(fusion(e, ["img", "vec"]), fusion(e, ["vec", "img"]))


def test_concat_fusion_uses_the_missing_embedding():
    torch.manual_seed(0)
    fusion = ConcatFusion(NAMES, D, hidden=20)
    with torch.no_grad():
        fusion.missing.copy_(torch.randn_like(fusion.missing))
    e = embeddings_of()
    by_hand = {**e, "seq": fusion.missing[1].expand(4, D), "img": fusion.missing[2].expand(4, D)}
    out = fusion(e, ["vec"])
    torch.testing.assert_close(out, fusion(by_hand), rtol=0, atol=1e-6)
    torch.testing.assert_close(fusion({**e, "seq": e["seq"] * 3}, ["vec"]), out)
    assert not torch.allclose(fusion(e), out)


@pytest.mark.parametrize("fusion", ["concat", "linear", "transformer"])
def test_gradients_reach_every_encoder_and_every_parameter(fusion):
    # Every parameter gets a gradient from a full-tuple loss: DDP without
    # find_unused_parameters fails on any that does not (ConcatFusion's `missing` included).
    torch.manual_seed(0)
    model = MultimodalEncoder(SPECS, small_cfg(fusion=fusion))
    model(batch_of()).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for m, enc in model.encoders.items():
        total = sum(p.grad.abs().sum() for p in enc.parameters())
        assert total > 0, f"no gradient reached encoder {m}"


def test_each_encoder_runs_once_per_encode():
    model = MultimodalEncoder(SPECS, small_cfg())
    calls = {m: 0 for m in NAMES}
    for m, enc in model.encoders.items():
        enc.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    embeddings = model.encode(batch_of())
    assert calls == {m: 1 for m in NAMES}
    for keep in (None, ["vec"], ["seq", "img"]):
        model.fuse(embeddings, keep)
    assert calls == {m: 1 for m in NAMES}  # fusing never re-runs the encoders


@pytest.mark.parametrize("fusion", ["concat", "transformer"])
def test_bad_keep_is_a_value_error(fusion):
    model = MultimodalEncoder(SPECS, small_cfg(fusion=fusion))
    embeddings = model.encode(batch_of())
    with pytest.raises(ValueError, match="'audio'") as err:
        model.fuse(embeddings, ["vec", "audio"])
    assert all(m in str(err.value) for m in NAMES)  # lists the known modalities
    with pytest.raises(ValueError, match="empty"):
        model.fuse(embeddings, [])


def test_encode_names_a_missing_or_misshapen_modality():
    model = MultimodalEncoder(SPECS, small_cfg())
    batch = batch_of()
    with pytest.raises(ValueError, match="'img'"):
        model.encode({k: v for k, v in batch.items() if k != "img"})
    with pytest.raises(ValueError, match="'seq'"):
        model.encode({**batch, "seq": torch.randn(5, 3, 7)})


def test_projection_head_shape_and_no_batchnorm():
    head = ProjectionHead(D, 32, 8)
    assert head(torch.randn(3, D)).shape == (3, 8)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())
    # batch-independent: a row's output does not depend on the rest of the batch
    x = torch.randn(4, D)
    torch.testing.assert_close(head(x)[:1], head(x[:1]))


def test_cnn_encoder_standardises_images_with_the_manifests_constants():
    """Images reach the encoder in [0, 1]; with the manifest's per-channel mean/std the cnn
    encoder sees (x - mean) / std, exactly: same weights, standardised input by hand."""
    from dataclasses import replace

    spec = replace(IMG, mean=(0.2, 0.6), std=(0.1, 0.3))
    cfg = EncoderConfig(kind="cnn", hidden=12, layers=2)
    torch.manual_seed(0)
    normalising = build_encoder(spec, cfg, D)
    plain = build_encoder(IMG, cfg, D)
    plain.load_state_dict(normalising.state_dict())   # the constants are not in the state
    x = torch.rand(3, *IMG.shape)
    by_hand = (x - torch.tensor([0.2, 0.6]).view(1, 2, 1, 1)) / torch.tensor(
        [0.1, 0.3]).view(1, 2, 1, 1)
    assert torch.allclose(normalising(x), plain(by_hand), atol=1e-5)
    assert not torch.allclose(normalising(x), plain(x), atol=1e-3)
    assert set(normalising.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("normalize", [True, False])
def test_data_normalize_decides_whether_the_image_encoder_standardises(normalize):
    from dataclasses import replace

    from mmcl import config
    from mmcl.data.schema import LabelSpec, Manifest
    from mmcl.objectives import build_objective

    img = replace(ModalitySpec("img", (3, 8, 8), "image", "uint8"), mean=(0.5,) * 3,
                  std=(0.2,) * 3)
    manifest = Manifest([img, ModalitySpec("vec", (4,))],
                        [LabelSpec("y", "classification", 2)])
    cfg = config.load(None, ["objective.name=cross", f"data.normalize={str(normalize).lower()}",
                             "model.encoder.hidden=8", "model.encoder.layers=1"])
    encoder = build_objective(cfg, manifest).encoder.encoders["img"]
    assert encoder.normalizes is normalize
