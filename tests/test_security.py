"""Hostile or careless input (issue 21): no code run from a search folder (signed Tune state),
no YAML alias bomb, no run written outside storage.path, one readable `mmcl: error:` line for
a manifest that is not one, a checkpoint refused on a worker, a non-finite config value or an
empty npz. Everything here runs without Ray except the one sweep at the end."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmcl import config
from mmcl.cli import EXIT_USER_ERROR, MAX_ERROR_CHARS, main
from mmcl.config import ConfigError
from mmcl.train import launcher
from mmcl.tune import trust


class Planted:
    """Unpickling this object creates a file: proof that a loader ran it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mmcl: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------- YAML bombs


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Nested aliases: `width ** levels` strings from about a kilobyte of YAML."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\ntrain: {{lr: *a{levels - 1}}}\n"


@pytest.mark.parametrize("command", [["config"], ["pretrain", "--no-ray"]])
def test_a_yaml_alias_bomb_is_refused_with_a_short_message(tmp_path, capsys, command, no_ray):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 1500
    assert main([*command, "-c", str(bomb)]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "bomb.yaml" in err and "aliases" in err and len(err) < 500


def test_a_small_alias_bomb_in_a_valid_place_gives_a_capped_message(tmp_path, capsys):
    """Below the expansion budget but still a huge value to quote: the message stays short."""
    bomb = tmp_path / "small.yaml"
    bomb.write_text(alias_bomb(levels=4, width=6))  # 1296 strings: under the budget
    assert main(["config", "-c", str(bomb)]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "train.lr" in err and len(err) < 1000


def test_ordinary_anchors_still_work_and_set_values_use_the_same_loader(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("augment:\n  default: &aug {noise: 0.2}\n  per_modality: {a: *aug}\n")
    assert config.load(path).augment.per_modality["a"].noise == 0.2
    with pytest.raises(ConfigError, match="aliases"):
        config.parse_yaml(alias_bomb(), "x")
    with pytest.raises(ConfigError, match="aliases"):  # a value that holds itself
        config.parse_yaml("a: &a [*a]", "x")
    with pytest.raises(ConfigError, match="nested too deeply"):
        config.parse_yaml("a: " + "[" * 5000 + "]" * 5000, "x")
    assert config.load(None, ["data.modalities=[a, b]"]).data.modalities == ["a", "b"]


def test_every_error_message_is_capped(monkeypatch, capsys):
    import mmcl.cli as cli

    def shout(args):
        raise ConfigError("x" * 100_000)

    monkeypatch.setattr(cli, "cmd_config", shout)
    assert main(["config"]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert len(err) < MAX_ERROR_CHARS + 200 and "more characters not shown" in err


# ----------------------------------------------------------------------- safe names


@pytest.mark.parametrize("name", ["../../x", "/tmp/absolute", "..", ".", "a\\b", "a\x01b"])
def test_a_run_name_must_be_one_folder_inside_storage_path(tmp_path, capsys, name, no_ray):
    storage = tmp_path / "deep" / "runs"
    storage.mkdir(parents=True)
    argv = ["pretrain", "--no-ray", "--set", f"storage.path={storage}",
            "--set", f"storage.name={name}", "--set", "data.synth.n=64"]
    assert main(argv) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "storage.name" in err and "--set storage.name=" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "runs"], "something written"


def test_a_sweep_name_and_split_names_must_be_plain_names(tmp_path, capsys):
    tune_file = tmp_path / "t.yaml"
    tune_file.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path)},
                                         "sweep": {"num_samples": 1}}))
    assert main(["tune", "-c", str(tune_file), "--set", "storage.name=../up"]) == \
        EXIT_USER_ERROR
    assert "storage.name" in one_error(capsys)
    assert main(["config", "--set", "data.val_split=../../etc"]) == EXIT_USER_ERROR
    assert "data.val_split" in one_error(capsys)


@pytest.mark.parametrize("name,reason", [("a/../b", "not a path"), ("a__b", "'__'"),
                                         ("..", "not a path")])
def test_npz_array_names_that_would_be_paths_or_reserved_are_refused(tmp_path, capsys, name,
                                                                     reason):
    src = tmp_path / "in.npz"
    np.savez(src, **{name: np.zeros((8, 3), np.float32), "ok": np.zeros((8, 2), np.float32)})
    out = tmp_path / "out"
    assert main(["data", "convert", str(src), "--out", str(out)]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "modality name" in err and reason in err and not out.exists()


# ------------------------------------------------------------------------ manifests


GOOD_MODALITY = {"name": "a", "shape": [3]}


@pytest.mark.parametrize("manifest,expected", [
    ([1, 2, 3], "JSON array"), (None, "JSON null"), ("hello", "JSON string"),
    ({"modalities": [GOOD_MODALITY], "splits": "x"}, "'splits'"),
    ({}, "no 'modalities'"), ({"modalities": [{"shape": [3]}]}, "missing 'name'"),
    ({"modalities": [{**GOOD_MODALITY, "colour": 1}]}, "unknown field(s) 'colour'"),
    ({"modalities": "a"}, "'modalities' must be a list"),
    ({"modalities": [GOOD_MODALITY], "splits": {"../up": 3}}, "split name"),
    ({"modalities": [GOOD_MODALITY], "version": "x"}, "'version' must be an integer"),
])
def test_a_manifest_that_is_not_one_is_a_single_readable_error(tmp_path, capsys, manifest,
                                                               expected):
    root = tmp_path / "data"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "inspect", str(root)]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert "manifest.json" in err and expected in err, err
    assert "Error(" not in err and "\\n" not in err, "a raw Python repr in the message"


# ---------------------------------------------------------- errors from Ray workers


def test_a_checkpoint_refused_on_a_worker_is_one_line(monkeypatch, capsys):
    """Ray Train hands a worker's exception to the driver inside a WorkerGroupError."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    import mmcl.cli as cli
    from mmcl.train.checkpoint import CheckpointError

    refused = CheckpointError("state.pt cannot be loaded safely: it needs unpickling")

    def resume(args):
        wrapped = UserExceptionWithTraceback(refused, "Traceback (most recent call last):\n...")
        try:
            raise WorkerGroupError("worker 0 failed", {0: wrapped})
        except WorkerGroupError as err:
            raise launcher.user_error(err) from err

    monkeypatch.setattr(cli, "cmd_pretrain", resume)
    assert main(["pretrain"]) == EXIT_USER_ERROR
    assert "state.pt cannot be loaded safely" in one_error(capsys)


# ------------------------------------------------------------------- config hygiene


@pytest.mark.parametrize("assignment", ["train.lr=inf", "train.lr=.nan", "train.lr=-.inf",
                                        "objective.temperature=.inf",
                                        "augment.default.noise=.nan",
                                        "objective.negative_weights={a: .inf}"])
def test_non_finite_numbers_are_refused_and_blame_the_set(capsys, assignment):
    assert main(["config", "--set", assignment]) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert f"--set {assignment}" in err and "defaults" not in err.splitlines()[0]


def test_a_set_error_names_the_set_and_a_file_error_names_the_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("train:\n  epochs: 0\n")
    message = str(pytest.raises(ConfigError, config.load, path, ["train.lr=inf"]).value)
    first, *lines = message.splitlines()
    assert "base.yaml" in first and "--set train.lr=inf" in first
    lr = next(line for line in lines if "train.lr" in line)
    epochs = next(line for line in lines if "train.epochs" in line)
    assert "[from --set train.lr=inf]" in lr and "--set" not in epochs


def test_a_set_error_in_a_tune_file_names_the_set(tmp_path, capsys):
    tune_file = tmp_path / "t.yaml"
    tune_file.write_text("train:\n  epochs: 1\nsweep:\n  num_samples: 1\n")
    for assignment, field in (("train.lr=inf", "train.lr"),
                              ("sweep.reduction_factor=.inf", "sweep.reduction_factor")):
        assert main(["tune", "-c", str(tune_file), "--set", assignment]) == EXIT_USER_ERROR
        err = one_error(capsys)
        first = err.splitlines()[0]
        assert f"--set {assignment}" in first and "t.yaml" not in first and field in err


def test_the_unknown_field_hint_names_a_command_that_prints_every_field(capsys):
    message = str(pytest.raises(ConfigError, config.load, None, ["train.bach=1"]).value)
    hint = message.split("`")[1]
    assert hint == "mmcl config"
    assert main(hint.split()[1:]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) == set(config.RunConfig.model_fields)
    assert set(printed["train"]) == set(config.TrainConfig.model_fields)


def test_a_zero_tuple_npz_is_refused_and_never_replaces_a_data_set(tmp_path, capsys):
    good, empty = tmp_path / "good.npz", tmp_path / "empty.npz"
    np.savez(good, a=np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32))
    np.savez(empty, a=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64))
    out = tmp_path / "data"
    assert main(["data", "convert", str(good), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["data", "convert", str(empty), "--out", str(out), "--overwrite"]) == \
        EXIT_USER_ERROR
    assert "0 tuples" in one_error(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------- signed Tune state


def fake_experiment(root: Path) -> Path:
    """The pickle-bearing layout of a Tune experiment folder, plus files that are not."""
    (root / "trial_1").mkdir(parents=True)
    (root / "runs" / "trial-1").mkdir(parents=True)
    (root / "tuner.pkl").write_bytes(pickle.dumps({"a": 1}))
    (root / "experiment_state-1.json").write_text('{"trial_data": []}')
    (root / "basic-variant-state-1.json").write_bytes(pickle.dumps({"b": 2}))
    (root / "trial_1" / "params.pkl").write_bytes(pickle.dumps({"lr": 1}))
    (root / "trial_1" / "result.json").write_text("{}")  # not signed: Tune never unpickles it
    (root / "runs" / "trial-1" / "metrics.jsonl").write_text("{}\n")
    return root


def test_signatures_cover_what_tune_unpickles_and_catch_every_change(tmp_path, monkeypatch):
    folder = trust.Folder(str(fake_experiment(tmp_path / "sweep")))
    assert sorted(folder.signed_files()) == ["basic-variant-state-1.json",
                                             "experiment_state-1.json", "trial_1/params.pkl",
                                             "tuner.pkl"]
    assert trust.problems(folder) == ["4 unsigned file(s) (basic-variant-state-1.json, "
                                      "experiment_state-1.json, trial_1/params.pkl and 1 more)"]
    assert trust.sign(folder) == 4 and trust.problems(folder) == []
    (tmp_path / "sweep" / "trial_1" / "result.json").write_text('{"x": 1}')  # not signed
    assert trust.problems(folder) == []

    (tmp_path / "sweep" / "trial_1" / "error.pkl").write_bytes(b"planted")
    assert trust.problems(folder) == ["unsigned file(s) trial_1/error.pkl"]
    os.remove(tmp_path / "sweep" / "trial_1" / "error.pkl")
    (tmp_path / "sweep" / "experiment_state-1.json").write_text('{"trial_data": [1]}')
    assert trust.problems(folder) == ["file(s) changed since mmcl signed them: "
                                      "experiment_state-1.json"]
    with pytest.raises(trust.UntrustedState, match="storage.name=NEW.*--trust-state"):
        trust.verify(folder)
    trust.sign(folder)
    os.remove(tmp_path / "sweep" / "tuner.pkl")  # a missing file cannot run code
    assert trust.problems(folder) == []

    monkeypatch.setenv(trust.KEY_ENV, "someone else's key")
    assert trust.problems(folder) == ["its signatures were made with another key (another "
                                      "user or machine)"]
    monkeypatch.setenv(trust.KEY_ENV, "mmcl-test-suite-key")
    signatures = tmp_path / "sweep" / trust.SIGNATURES
    body = json.loads(signatures.read_text())
    body["files"]["trial_1/params.pkl"] = body["files"]["experiment_state-1.json"]
    signatures.write_text(json.dumps(body))
    assert trust.problems(folder) == [f"its signature file {trust.SIGNATURES} is damaged or "
                                      f"was edited"]


def test_the_key_file_is_made_once_and_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(trust.KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = trust.trust_key()
    path = tmp_path / "config" / "mmcl" / "trust.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 64
    assert trust.trust_key() == key


def test_sample_optimization_state_is_verified_before_it_is_used(tmp_path):
    from mmcl.tune.sample_opt import STATE_NAME, read_state, write_state

    cfg = config.load(None, [f"storage.path={tmp_path}"])
    url = str(tmp_path / "so")
    write_state(url, cfg, {"completed": 1})
    assert read_state(url, cfg) == {"completed": 1}
    (tmp_path / "so" / STATE_NAME).write_text('{"completed": 2}')
    with pytest.raises(trust.UntrustedState, match="sample-optimization folder"):
        read_state(url, cfg)


TINY_SWEEP = {
    "data": {"synth": {"preset": "rus", "n": 200}},
    "train": {"batch_size": 32, "warmup_epochs": 0, "epochs": 1},
    "model": {"embed_dim": 16, "encoder": {"hidden": 16}, "proj_hidden": 16, "proj_dim": 16,
              "fusion_heads": 2},
    "objective": {"name": "tuple_infonce"},
    "scaling": {"num_workers": 1},
    "sweep": {"num_samples": 1, "scheduler": "none", "metric": "reward"},
}


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_a_planted_tuner_pkl_is_never_unpickled_and_a_signed_sweep_resumes(tmp_path, capsys):
    """The attack of issue 21: replace a sweep's tuner.pkl with a pickle that would create a
    file, rerun the same `mmcl tune` command. Also: the untampered sweep reruns (restores)
    as before, and an unsigned folder is resumed only with --trust-state."""
    tune_file = tmp_path / "sweep.yaml"
    tune_file.write_text(yaml.safe_dump({**TINY_SWEEP, "storage": {"path": str(tmp_path)}}))
    command = ["tune", "-c", str(tune_file)]
    folder = tmp_path / "sweep"
    assert main(command) == 0
    assert (folder / trust.SIGNATURES).exists() and (folder / "tuner.pkl").exists()
    assert trust.problems(trust.Folder(str(folder))) == []

    capsys.readouterr()
    assert main(command) == 0, capsys.readouterr().err  # the signed folder is restored
    assert "resuming the interrupted sweep" in capsys.readouterr().out

    original = (folder / "tuner.pkl").read_bytes()
    marker = tmp_path / "pwned"
    (folder / "tuner.pkl").write_bytes(pickle.dumps(Planted(str(marker))))
    assert main(command) == EXIT_USER_ERROR
    err = one_error(capsys)
    assert not marker.exists(), "a pickle from the sweep folder was loaded"
    assert len(err.strip().splitlines()) == 1
    assert "not trusted" in err and "tuner.pkl" in err and "--trust-state" in err
    assert "storage.name" in err

    (folder / "tuner.pkl").write_bytes(original)
    os.remove(folder / trust.SIGNATURES)  # e.g. a sweep from before signing existed
    assert main(command) == EXIT_USER_ERROR
    assert "unsigned" in one_error(capsys) and not marker.exists()
    assert main([*command, "--trust-state"]) == 0
    assert trust.problems(trust.Folder(str(folder))) == []


def test_signatures_work_the_same_on_s3(s3_endpoint, tmp_path):
    """A sweep folder in a bucket: signed, verified, a planted file found."""
    import s3fs

    local = fake_experiment(tmp_path / "sweep")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(local), "mmcl-test/searches/sweep", recursive=True)
    folder = trust.Folder("s3://mmcl-test/searches/sweep", endpoint_url=s3_endpoint)
    assert len(folder.signed_files()) == 4 and trust.problems(folder)
    trust.sign(folder)
    assert trust.problems(folder) == []
    fs.pipe("mmcl-test/searches/sweep/tuner.pkl", pickle.dumps(Planted(str(tmp_path / "x"))))
    with pytest.raises(trust.UntrustedState, match="changed since mmcl signed them: tuner.pkl"):
        trust.verify(folder)


def test_the_keeper_renews_signatures_while_tune_runs_and_pickles_without_its_state(tmp_path):
    root = fake_experiment(tmp_path / "sweep")
    keeper = trust.signature_keeper(trust.Folder(str(root)))
    keeper.on_step_end(iteration=1, trials=[])
    assert trust.problems(keeper.folder) == []
    (root / "experiment_state-2.json").write_text("{}")  # Tune saves its state again
    keeper.on_checkpoint(iteration=2, trials=[], trial=None, checkpoint=None)
    assert trust.problems(keeper.folder) == []
    from ray import cloudpickle

    restored = cloudpickle.loads(cloudpickle.dumps(keeper))  # it travels inside tuner.pkl
    assert restored.folder == keeper.folder and restored._cache == {}
    assert b"mmcl-test-suite-key" not in cloudpickle.dumps(keeper)
