"""Run configuration: defaults, YAML, --set overrides, and one clear message per mistake."""

import math

import pytest

from mmcl import config
from mmcl.config import ConfigError


def error_of(overrides=(), raw=None) -> str:
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw or {}, list(overrides))
    return str(info.value)


def test_defaults_are_valid_and_reload_identically(tmp_path):
    cfg = config.load()
    assert cfg.objective.name == config.DEFAULT_OBJECTIVE
    path = tmp_path / "resolved.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg


def test_set_overrides_parse_yaml_scalars_and_collections():
    cfg = config.load(None, ["train.batch_size=512", "train.lr=3e-4", "scaling.use_gpu=true",
                             "data.modalities=[a, b]", "objective.negative_weights={a: 2}"])
    assert cfg.train.batch_size == 512 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.scaling.use_gpu is True and cfg.data.modalities == ["a", "b"]
    assert cfg.objective.negative_weights == {"a": 2.0}


def test_objective_fields_default_to_the_default_objective():
    cfg = config.from_dict({"objective": {"temperature": 0.2}})
    assert cfg.objective.name == config.DEFAULT_OBJECTIVE and cfg.objective.temperature == 0.2


def test_each_objective_validates_its_own_fields():
    cfg = config.load(None, ["objective.name=comm", "objective.reduction=sum"])
    assert cfg.objective.reduction == "sum"
    message = error_of(["objective.name=comm", "objective.negative_weights={a: 1}"])
    assert "objective.negative_weights" in message and "unknown field" in message


def test_unknown_field_is_named():
    message = error_of(["train.bach_size=8"])
    assert "train.bach_size" in message and "unknown field" in message


def test_unknown_section_is_named():
    assert "trian" in error_of(raw={"trian": {"epochs": 1}})


def test_unknown_objective_lists_the_choices():
    message = error_of(["objective.name=simclr"])
    assert "objective" in message and "tuple_infonce" in message and "factorcl_ssl" in message


def test_wrong_type_is_named():
    message = error_of(["train.epochs=many"])
    assert "train.epochs" in message and "'many'" in message


def test_out_of_range_values_are_named():
    assert "train.batch_size" in error_of(["train.batch_size=0"])
    assert "objective.temperature" in error_of(["objective.temperature=-0.5"])
    assert "augment.default.noise" in error_of(["augment.default.noise=1.5"])


def test_bad_choice_lists_the_allowed_values():
    message = error_of(["model.fusion=attention"])
    assert "model.fusion" in message and "'concat'" in message and "'transformer'" in message


def test_cross_field_rule_names_both_fields():
    message = error_of(["model.embed_dim=30", "model.fusion_heads=4"])
    assert "model.embed_dim" in message and "model.fusion_heads" in message


def test_negative_weights_must_be_non_negative():
    assert "objective.negative_weights" in error_of(["objective.negative_weights={a: -1}"])


def test_log_weights_switch_off_zero_weights():
    cfg = config.load(None, ["objective.negative_weights={a: 0, b: 2}",
                             "objective.default_negative_weight=1"])
    assert cfg.objective.log_weights(["a", "b", "c"]) == [-math.inf, math.log(2), 0.0]


def test_malformed_set_is_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.load(None, ["train.batch_size"])
    with pytest.raises(ConfigError, match="not a section"):
        config.load(None, ["train.epochs=3", "train.epochs.x=1"])


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: [1e-3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        config.load(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_every_shipped_config_is_valid():
    from pathlib import Path

    shipped = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert shipped, "configs/ holds no YAML"
    names = set()
    for path in shipped:
        names.add(config.load(path).objective.name)
    assert set(config.OBJECTIVE_NAMES) <= names, "every objective has a ready config"


def test_objective_names_config_union_and_registry_agree():
    """One list (config.OBJECTIVE_CONFIGS): each name parses to its own config class, and the
    objectives package registers a class under every name and no other."""
    from mmcl.objectives import OBJECTIVES

    for cls, name in zip(config.OBJECTIVE_CONFIGS, config.OBJECTIVE_NAMES):
        assert type(config.load(None, [f"objective.name={name}"]).objective) is cls
    assert sorted(OBJECTIVES) == sorted(config.OBJECTIVE_NAMES)
    with pytest.raises(ConfigError, match="unknown objective; choose one of: cross, "):
        config.load(None, ["objective.name=nope"])


def test_objectives_and_models_never_import_ray():
    """docs/architecture.md: the model and loss code is plain PyTorch (no import of ray at
    any level, not even inside a function)."""
    import ast
    from pathlib import Path

    package = Path(__file__).parent.parent / "mmcl"
    for folder in ("objectives", "models"):
        for path in sorted((package / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n == "ray" or n.startswith("ray.") for n in names), path
