"""Paths a user gives, resolved on the driver before anything reaches a Ray worker.

Ray workers (Train workers, Ray Data actors, Tune trials) do not run in the user's working
directory, so a relative path in a config, a `--set` value or an import spec would point
somewhere else there. Every entry point that ships work to Ray passes what the user wrote
through this module first:

    cfg = resolve_config(cfg)            # data.path, storage.path, hf model folders
    raw = resolve_raw(raw)               # the same on a raw config dict (tune files)
    path = resolve_path(p, "--continue-from")

Rules: a URL (s3://..., any scheme://) stays as it is. data.path and storage.path are
always paths. A field that may also hold a Hugging Face hub id (an hf encoder's `model`, an
import spec's `tokenizer`) is a path only when it looks like one (starts with ./, ../, /, ~)
or names something that exists on disk; a hub id such as `bert-base-uncased` or
`org/model` stays as it is. A local path that must exist and does not is one ConfigError
naming the field, before Ray starts.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from mmcl.config import ConfigError, RunConfig, StorageConfig

PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
HINTS = {"data.path": ". Create a data set with `mmcl data import`, `mmcl data convert` or "
                      "`mmcl data synth`, or leave data.path unset for the built-in one"}


def is_url(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def looks_like_path(value: str, cwd: str | None = None) -> bool:
    """A value of a field that takes a path or a hub id: a path when it starts like one or
    names something that exists (relative to `cwd`)."""
    if is_url(value):
        return False
    if value in (".", "..") or value.startswith(PATH_PREFIXES):
        return True
    return os.path.exists(os.path.join(cwd or os.getcwd(), value))


def absolute(value: str, cwd: str | None = None) -> str:
    """`value` as an absolute local path (~ expanded, relative to `cwd`); URLs unchanged."""
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif is_url(value):
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(cwd or os.getcwd(), value))


def resolve_path(value: str | None, field: str, cwd: str | None = None,
                 must_exist: bool = True, hub_ok: bool = False) -> str | None:
    """One user-given path resolved against `cwd` (default: this process's working
    directory). `hub_ok`: the field may hold a hub id instead (kept as it is unless it looks
    like a path). A local path that must exist and does not is a ConfigError naming
    `field`."""
    if value is None:
        return None
    value = str(value)
    if is_url(value) or (hub_ok and not looks_like_path(value, cwd)):
        return value
    resolved = absolute(value, cwd)
    if must_exist and not os.path.exists(resolved):
        shown = value if resolved == value else f"{value} (resolved to {resolved})"
        what = "no mmcl data set at " if field == "data.path" else ""
        raise ConfigError(f"{field}: {what}{shown}: it does not exist; relative paths are read "
                          f"from the working directory {cwd or os.getcwd()}"
                          f"{HINTS.get(field, '')}")
    return resolved


def _encoder_sections(raw: dict) -> list[tuple[str, dict]]:
    model = raw.get("model")
    if not isinstance(model, dict):
        return []
    found = []
    if isinstance(model.get("encoder"), dict):
        found.append(("model.encoder", model["encoder"]))
    for name, enc in (model.get("encoders") or {}).items():
        if isinstance(enc, dict):
            found.append((f"model.encoders.{name}", enc))
    return found


def resolve_raw(raw: dict, cwd: str | None = None, check: bool = True) -> dict:
    """A copy of a raw run config (as YAML gives it) whose local paths are absolute:
    data.path, storage.path (its default ./runs too) and the `model` of hf encoders that
    names a folder. `check`: refuse a data.path or hf model folder that does not exist.
    Values that are not strings (a tune distribution, say) are left as they are."""
    raw = copy.deepcopy(raw or {})
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str):
        data["path"] = resolve_path(data["path"], "data.path", cwd, must_exist=check)
    storage = raw.setdefault("storage", {})
    if isinstance(storage, dict):
        value = storage.get("path", StorageConfig.model_fields["path"].default)
        if isinstance(value, str):
            storage["path"] = resolve_path(value, "storage.path", cwd, must_exist=False)
    for where, enc in _encoder_sections(raw):
        if isinstance(enc.get("model"), str):
            enc["model"] = resolve_path(enc["model"], f"{where}.model", cwd,
                                        must_exist=check, hub_ok=True)
    return raw


def resolve_config(cfg: RunConfig, cwd: str | None = None, check: bool = True) -> RunConfig:
    """`cfg` with every local path absolute (see resolve_raw); the one call the driver makes
    before it ships a config to Ray."""
    resolved = resolve_raw(cfg.model_dump(mode="json"), cwd, check)
    if resolved == cfg.model_dump(mode="json"):
        return cfg
    return RunConfig.model_validate(resolved)


def resolve_import_spec(spec, cwd: str | None = None):
    """An import spec (mmcl.data.ingest.ImportSpec) whose tokenizer folders are absolute:
    Ray Data's decode actors load them in another working directory."""
    modalities = {}
    for name, m in spec.modalities.items():
        tok = getattr(m, "tokenizer", None)
        if isinstance(tok, str):
            m = m.model_copy(update={"tokenizer": resolve_path(
                tok, f"modalities.{name}.tokenizer", cwd, hub_ok=True)})
        modalities[name] = m
    return spec.model_copy(update={"modalities": modalities})
