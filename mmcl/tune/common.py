"""What the sweep (`sweep`) and the sample optimization (`sample_opt`) share: a tune file's
section validated with errors that name `section.field`, the search folder's name, the files
written into it, Tune's status of each trial and the one line a crashed trial reports."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from mmcl import config as config_mod
from mmcl.config import ConfigError
from mmcl.data.schema import unsafe_name
from mmcl.storage import write_text
from mmcl.tune.space import TuneFile


def section_config(model: type[BaseModel], raw: dict, section: str, source: str,
                   overrides: tuple[str, ...] = ()):
    """Validate a tune file's section, with errors that name `section.field` and, for a value
    given with `--set`, that `--set`."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        given = {a.split("=", 1)[0].strip(): a for a in overrides if "=" in a}
        lines, sources = [], []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            origin = config_mod.override_for([section, *loc.split(".")], given)
            sources.append(origin or source)
            msg = ("unknown field (check its spelling)" if e["type"] == "extra_forbidden"
                   else e["msg"])
            lines.append(f"  {section}.{loc}: {msg} (got {config_mod.short_repr(e.get('input'))})"
                         + (f" [from {origin}]" if origin else ""))
        where = ", ".join(dict.fromkeys(sources))
        raise ConfigError("\n".join([f"invalid `{section}:` settings in {where}:", *lines])
                          ) from None


def search_name(tune_file: TuneFile, base) -> str:
    """The search folder's name: storage.name (checked by the config), else the tune file's
    name, which must then be one plain folder name as well."""
    name = base.storage.name or (Path(tune_file.source).stem
                                 if tune_file.source.endswith((".yaml", ".yml")) else "tune")
    reason = unsafe_name(name)
    if reason:
        raise ConfigError(f"sweep name (the tune file's name): {reason}; set storage.name")
    return name


def write_output(url: str, text: str, cfg) -> str:
    """Write one output file of a search (local or s3://, with the run config's storage
    settings); returns its URL."""
    return write_text(url, text, cfg.storage.endpoint_url, cfg.storage.region)


def short_error(error) -> str:
    """The last non-empty line of an error (a trial's traceback), at most 200 characters."""
    text = str(error).strip().splitlines()
    lines = [line.strip() for line in text if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def trial_statuses(experiment: str, storage_fs) -> dict[str, tuple[str, dict]]:
    """Tune's (status, config) of every trial, read from the experiment's saved state; the
    status is TERMINATED, ERROR, PENDING, RUNNING or PAUSED."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(experiment, storage_filesystem=storage_fs)
    except Exception:  # noqa: BLE001 - statuses only refine the table
        return {}
    return {t.trial_id: (t.status, dict(t.config or {})) for t in analysis.trials}
