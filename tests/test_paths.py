"""Paths a user gives are resolved against the user's working directory on the driver
(mmcl.paths), before anything is shipped to Ray workers that run elsewhere; a local path that
does not exist is refused naming the field; URLs and hub ids stay as they are. No Ray."""

import os

import pytest

from mmcl import config, paths
from mmcl.config import ConfigError


def test_relative_paths_become_absolute_against_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data" / "digits").mkdir(parents=True)
    (tmp_path / "hf" / "tiny").mkdir(parents=True)
    (tmp_path / "org").mkdir()  # a folder named like a hub owner, not the model
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, ["data.path=data/digits", "storage.path=./runs",
                             "model.encoders.image.kind=hf",
                             "model.encoders.image.model=./hf/tiny",
                             "model.encoders.text.kind=hf",
                             "model.encoders.text.model=bert-base-uncased",
                             "model.encoders.audio.kind=hf",
                             "model.encoders.audio.model=org/model"])
    resolved = paths.resolve_config(cfg)
    assert resolved.data.path == str(tmp_path / "data" / "digits")
    assert resolved.storage.path == str(tmp_path / "runs")  # need not exist yet
    assert resolved.model.encoders["image"].model == str(tmp_path / "hf" / "tiny")
    # Hub ids are not paths.
    assert resolved.model.encoders["text"].model == "bert-base-uncased"
    assert resolved.model.encoders["audio"].model == "org/model"
    # Resolving again changes nothing; the defaults' ./runs is resolved too.
    assert paths.resolve_config(resolved) == resolved
    assert paths.resolve_config(config.load()).storage.path == str(tmp_path / "runs")


def test_urls_stay_and_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d").mkdir()
    cfg = config.load(None, ["data.path=~/d", "storage.path=s3://bucket/runs"])
    resolved = paths.resolve_config(cfg, cwd="/elsewhere")
    assert resolved.data.path == str(tmp_path / "d")
    assert resolved.storage.path == "s3://bucket/runs"
    assert paths.resolve_path("s3://b/data", "data.path") == "s3://b/data"


@pytest.mark.parametrize("sets, field", [
    (["data.path=data/nope"], "data.path"),
    (["model.encoder.kind=hf", "model.encoder.model=./hf/missing"], "model.encoder.model"),
    (["model.encoders.image.kind=hf", "model.encoders.image.model=../gone"],
     "model.encoders.image.model"),
])
def test_a_missing_local_path_is_one_error_naming_the_field(tmp_path, monkeypatch, sets,
                                                           field):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        paths.resolve_config(config.load(None, sets))
    message = str(err.value)
    assert message.startswith(f"{field}: ") and "does not exist" in message
    assert str(tmp_path) in message and "\n" not in message


def test_raw_tune_configs_keep_distributions_and_resolve_paths(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    raw = {"train": {"lr": {"tune": "loguniform", "low": 1e-4, "high": 1e-2}},
           "model": {"encoder": {"kind": "hf", "model": "./m"}}}
    out = paths.resolve_raw(raw)
    assert out["train"] == raw["train"] and "storage" not in raw  # the input is not changed
    assert out["storage"]["path"] == str(tmp_path / "runs")
    assert out["model"]["encoder"]["model"] == str(tmp_path / "m")


def test_the_cli_refuses_a_missing_data_path_before_ray(tmp_path, monkeypatch, capsys, no_ray):
    from mmcl.cli import EXIT_USER_ERROR, main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--set", "data.path=data/digits"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmcl: error: data.path: no mmcl data set at "
                                               "data/digits")
    assert not (tmp_path / "runs").exists()


def test_an_import_spec_tokenizer_folder_is_resolved(tmp_path, monkeypatch):
    from mmcl.data.ingest import ImportSpec

    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = ImportSpec.model_validate({"modalities": {
        "caption": {"column": "c", "kind": "text", "tokenizer": "./tok", "max_len": 8},
        "title": {"column": "t", "kind": "text", "tokenizer": "bert-base-uncased",
                  "max_len": 8}}})
    out = paths.resolve_import_spec(spec)
    assert out.modalities["caption"].tokenizer == os.path.join(str(tmp_path), "tok")
    assert out.modalities["title"].tokenizer == "bert-base-uncased"
