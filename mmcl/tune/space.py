"""Search spaces in YAML: a run config in which any field may be a Tune distribution.

A tune file is an ordinary run config (configs/*.yaml) where a field's value can be a mapping
with a `tune` key instead of a value, plus optional `sweep:` and `sample_opt:` sections:

    train:
      lr: {tune: loguniform, low: 1.0e-4, high: 1.0e-2}
    objective:
      negative_weights:
        weak: {tune: choice, values: [0.5, 1.0, 4.0]}
    augment:
      per_modality:
        weak: {noise: {tune: uniform, low: 0.0, high: 0.5}}
    sweep: {num_samples: 8, scheduler: asha}

Distributions (Tune's own, under the same names):
    uniform, loguniform           low, high (floats; loguniform needs low > 0)
    quniform, qloguniform         low, high, q (rounded to multiples of q)
    randint, lograndint           low, high (integers, high EXCLUSIVE, as in Tune)
    qrandint                      low, high, q (integers, high inclusive, as in Tune)
    choice                        values: [...] (sampled)
    grid                          values: [...] (every value, crossed with other grids)

A whole section may be a distribution too (`model: {tune: choice, values: [{...}, {...}]}`).
`scaling.*` and `storage.*` cannot be searched: every trial must fit the CPU budget that is
checked before the search starts, and writes to the search's own folder.

Every sampled config is a run config: before Ray starts, the bounds and every listed value of
every distribution are validated through `mmcl.config`, so a search never launches trials that
cannot run; inside a trial, the sampled values go through the same validation again.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from mmcl import config as config_mod
from mmcl.config import ConfigError, RunConfig

DIST_KEY = "tune"
SECTIONS = ("sweep", "sample_opt")
NOT_SEARCHABLE = ("scaling", "storage")

# kind -> (required keys, optional keys). Tune's function for a kind has the kind's name (but
# for grid, TUNE_FUNCTIONS) and takes the required keys in this order, the optional ones by
# keyword.
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "uniform": (("low", "high"), ()),
    "quniform": (("low", "high", "q"), ()),
    "loguniform": (("low", "high"), ("base",)),
    "qloguniform": (("low", "high", "q"), ("base",)),
    "randint": (("low", "high"), ()),
    "qrandint": (("low", "high", "q"), ()),
    "lograndint": (("low", "high"), ("base",)),
    "choice": (("values",), ()),
    "grid": (("values",), ()),
}
TUNE_FUNCTIONS = {"grid": "grid_search"}
INTEGER_KINDS = ("randint", "qrandint", "lograndint")
LOG_KINDS = ("loguniform", "qloguniform", "lograndint")


@dataclass(frozen=True)
class Distribution:
    """One searched field: its dotted path in the run config and a Tune distribution."""

    path: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    q: float | int | None = None
    base: float | None = None
    values: tuple = ()

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def to_tune(self, grid_choices: bool = False):
        """The Tune search-space object. With `grid_choices`, a `choice` becomes a grid."""
        from ray import tune

        kind = "grid" if grid_choices and self.kind == "choice" else self.kind
        required, optional = KINDS[kind]
        args = [list(self.values) if key == "values" else getattr(self, key) for key in required]
        options = {key: getattr(self, key) for key in optional if getattr(self, key)}
        return getattr(tune, TUNE_FUNCTIONS.get(kind, kind))(*args, **options)

    def edge_values(self) -> list:
        """Values a sample can take at the edges of the distribution (bounds, every listed
        value): each is validated as a run config before anything starts."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind in ("randint", "lograndint"):
            return [int(self.low), int(self.high) - 1]
        if self.kind == "qrandint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind} {list(self.values)}"
        q = f" q={self.q}" if self.q is not None else ""
        return f"{self.kind} [{self.low}, {self.high}]{q}"


@dataclass
class TuneFile:
    """A parsed tune file: the run config without its distributions, the distributions by
    dotted path, and the raw `sweep` / `sample_opt` sections."""

    base: dict
    space: dict[str, Distribution] = field(default_factory=dict)
    sections: dict[str, dict] = field(default_factory=dict)
    source: str = "config"
    overrides: tuple[str, ...] = ()  # the `--set`s applied, named by the errors they cause

    def raw_with(self, params: Mapping[str, Any]) -> dict:
        """The run config's raw mapping with `params` (dotted path -> value) filled in."""
        return with_values(self.base, params)

    def config_with(self, params: Mapping[str, Any], source: str | None = None) -> RunConfig:
        return config_mod.from_dict(self.raw_with(params), source=source or self.source,
                                    set_by=self.overrides)

    def representative(self) -> dict[str, Any]:
        """One valid value per distribution (its first edge value)."""
        return {path: d.edge_values()[0] for path, d in self.space.items()}

    def base_config(self) -> RunConfig:
        """The run config with every distribution at its representative value: what the
        search's shared settings (data, scaling, storage) are read from."""
        return self.config_with(self.representative())


# ------------------------------------------------------------------------------ parsing


def with_values(raw: dict, params: Mapping[str, Any]) -> dict:
    """A deep copy of `raw` with each dotted path in `params` set (sections created)."""
    out = copy.deepcopy(raw)
    for path, value in params.items():
        config_mod.set_path(out, path, copy.deepcopy(value), where=f"search space: {path}")
    return out


def _number(path: str, key: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
    if not ok or (integer and float(value) != int(value)):
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(f"search space: {path}.{key} must be {kind} (got {value!r})")
    return int(value) if integer else float(value)


def parse_distribution(path: str, written: Mapping[str, Any]) -> Distribution:
    """A `{tune: KIND, ...}` mapping at `path` -> Distribution, or a ConfigError that names
    the field and the fix."""
    kind = written.get(DIST_KEY)
    if kind not in KINDS:
        raise ConfigError(f"search space: {path}: unknown distribution {kind!r}; choose one "
                          f"of {', '.join(KINDS)}")
    required, optional = KINDS[kind]
    keys = set(written) - {DIST_KEY}
    missing = [k for k in required if k not in written]
    extra = sorted(keys - set(required) - set(optional))
    if missing or extra:
        want = ", ".join(required + tuple(f"[{o}]" for o in optional))
        raise ConfigError(f"search space: {path}: '{kind}' takes {want}"
                          + (f"; missing {missing}" if missing else "")
                          + (f"; unknown {extra}" if extra else ""))
    if kind in ("choice", "grid"):
        values = written["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space: {path}.values must be a non-empty list "
                              f"(got {values!r})")
        return Distribution(path, kind, values=tuple(values))
    integer = kind in INTEGER_KINDS
    low = _number(path, "low", written["low"], integer)
    high = _number(path, "high", written["high"], integer)
    q = _number(path, "q", written["q"], integer) if "q" in written else None
    base = _number(path, "base", written["base"], False) if "base" in written else None
    if not low < high:
        raise ConfigError(f"search space: {path}: low must be < high (got low={low}, "
                          f"high={high})")
    if kind in LOG_KINDS and low <= 0:
        raise ConfigError(f"search space: {path}: '{kind}' needs low > 0 (got {low})")
    if q is not None and q <= 0:
        raise ConfigError(f"search space: {path}.q must be > 0 (got {q})")
    if kind in ("randint", "lograndint") and high - low < 1:
        raise ConfigError(f"search space: {path}: '{kind}' excludes high; give high > low")
    return Distribution(path, kind, low, high, q, base)


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and DIST_KEY in value


def extract_space(raw: dict, prefix: str = "") -> tuple[dict, dict[str, Distribution]]:
    """(raw without distributions, {dotted path: Distribution}) of a run config mapping."""
    base: dict = {}
    space: dict[str, Distribution] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if _is_distribution(value):
            if not isinstance(value[DIST_KEY], str):
                raise ConfigError(f"search space: {path}.{DIST_KEY} must name a distribution "
                                  f"({', '.join(KINDS)})")
            space[path] = parse_distribution(path, value)
        elif isinstance(value, dict):
            sub_base, sub_space = extract_space(value, f"{path}.")
            base[key] = sub_base
            space.update(sub_space)
        else:
            base[key] = value
    return base, space


def parse(raw: dict, overrides: list[str] | tuple = (), source: str = "config") -> TuneFile:
    """A tune file's mapping (plus `--set` overrides, which may also give distributions:
    `--set 'train.lr={tune: loguniform, low: 1e-4, high: 1e-2}'`) -> TuneFile."""
    raw = copy.deepcopy(raw or {})
    for assignment in overrides:
        config_mod.apply_override(raw, assignment)
    sections = {}
    for name in SECTIONS:
        section = raw.pop(name, None)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{source}: `{name}:` must be a mapping of settings, not "
                              f"{type(section).__name__}")
        sections[name] = section or {}
    base, space = extract_space(raw)
    for path in space:
        if path.split(".")[0] in NOT_SEARCHABLE:
            raise ConfigError(
                f"search space: {path} cannot be searched: scaling and storage are shared by "
                f"every trial (the CPU budget is checked once, before the search starts)")
    return TuneFile(base, space, sections, source, tuple(overrides))


def load(path: str, overrides: list[str] | tuple = ()) -> TuneFile:
    """Read and parse a tune file (YAML) plus `--set` overrides."""
    return parse(config_mod.load_yaml(path), overrides, source=str(path))


def validate(tune_file: TuneFile) -> RunConfig:
    """Validate the search space through mmcl.config before anything starts: every edge value
    of every distribution (bounds, listed values), each with the other fields at their
    representative values. Returns the representative run config."""
    rep = tune_file.representative()
    try:
        base = tune_file.config_with(rep)
    except ConfigError as err:
        raise ConfigError(f"{err}\n(with every searched field at its first value: "
                          f"{rep})") from None
    for path, dist in tune_file.space.items():
        for value in dist.edge_values():
            try:
                tune_file.config_with({**rep, path: value})
            except ConfigError as err:
                raise ConfigError(
                    f"search space: {path} = {value!r} (from {dist.describe()}) is not a valid "
                    f"value for this field; narrow the distribution.\n{err}") from None
    return base
