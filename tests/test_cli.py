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
