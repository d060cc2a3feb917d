"""The `mmcl` command: help texts, user errors as one line and exit 2, a tiny run end to end."""

import json

import pytest

import mmcl
from mmcl.cli import EXIT_USER_ERROR, main

COMMANDS = [[], ["config"], ["data"], ["data", "convert"], ["data", "inspect"],
            ["data", "synth"], ["pretrain"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "mmcl")
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: mmcl" in text and len(text.splitlines()) > 4


def test_a_config_mistake_is_one_line_naming_the_field(capsys):
    assert main(["config", "--set", "train.bach_size=3"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmcl: error:") and "train.bach_size" in err
    assert "Traceback" not in err


def test_a_missing_data_set_is_a_user_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == EXIT_USER_ERROR
    assert "nothing" in capsys.readouterr().err


def test_synth_inspect_and_a_tiny_in_process_run(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["data", "synth", "--preset", "weak", "--out", str(data), "--n", "300"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(data), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"] == {"train": 240, "val": 30, "test": 30}
    sets = ["data.path=" + str(data), "train.epochs=1", "train.batch_size=32",
            f"storage.path={tmp_path / 'runs'}", "storage.name=tiny", "model.embed_dim=16",
            "model.fusion_heads=2"]
    assert main(["pretrain", "--no-ray", *[a for s in sets for a in ("--set", s)]]) == 0
    model = mmcl.load(str(tmp_path / "runs" / "tiny"))
    assert model.manifest.modality_names == ["a", "b", "weak"]
    # README: embed takes arrays and returns a torch.Tensor (`.numpy()` for an array).
    import numpy as np
    import torch

    from mmcl.data.shards import read_split

    test = read_split(str(data), "test")
    z = model.embed({m: test[m][:4] for m in ("a", "b", "weak")})
    assert isinstance(z, torch.Tensor) and isinstance(z.numpy(), np.ndarray)


def test_a_failed_run_leaves_no_empty_run_folder(tmp_path, capsys, monkeypatch):
    from mmcl.train import launcher

    data = tmp_path / "data"
    assert main(["data", "synth", "--preset", "weak", "--out", str(data), "--n", "300"]) == 0

    def fail(*args, **kwargs):
        raise launcher.LaunchError("the workers are gone")

    monkeypatch.setattr(launcher, "_pretrain_in_process", fail)
    sets = [f"data.path={data}", f"storage.path={tmp_path / 'runs'}", "storage.name=dead"]
    assert main(["pretrain", "--no-ray", *[a for s in sets for a in ("--set", s)]]) == \
        EXIT_USER_ERROR
    assert "the workers are gone" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "dead").exists()


def test_config_says_which_data_is_used(tmp_path, capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "# data: the built-in 'rus' set (data.synth), since data.path is not set" in out
    assert main(["config", "--set", f"data.path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"# data: {tmp_path} (data.path); data.synth is not used" in out
    import yaml

    assert yaml.safe_load(out)["data"]["path"] == str(tmp_path)   # still one YAML document


def test_inspect_shows_uint8_image_statistics_on_the_manifests_0_to_1_scale(tmp_path, capsys):
    import numpy as np

    from mmcl.data.schema import Manifest, ModalitySpec
    from mmcl.data.shards import read_manifest, write_dataset

    img = np.random.default_rng(0).integers(100, 256, size=(20, 1, 4, 4)).astype(np.uint8)
    root = str(tmp_path / "ds")
    write_dataset(root, Manifest(modalities=[ModalitySpec("img", (1, 4, 4), kind="image",
                                                          dtype="uint8")], labels=[]),
                  {"train": {"id": np.arange(20), "img": img}}, stats_split="train")
    assert main(["data", "inspect", root, "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["modalities"]
    stored = read_manifest(root).modality("img")
    assert shown["mean"] == pytest.approx(stored.mean[0]) == pytest.approx((img / 255).mean())
    assert shown["std"] == pytest.approx((img / 255).std(), rel=1e-4)


def test_the_test_extra_installs_what_the_report_plots_need():
    """The README installs `.[test]`; `mmcl report` draws its PNGs with matplotlib."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["test"])
