"""The encoder registry: one table of every encoder kind a config may name.

An entry maps a kind name to a builder `builder(spec, cfg, embed_dim) -> nn.Module`; the module
maps a batch of the modality to (B, embed_dim) and is called `encoder(x)` or, when the batch
holds a padding mask for the modality, `encoder(x, mask=mask)`. A class whose `__init__` takes
`(spec, cfg, embed_dim)` is such a builder.

Kinds come from three places, all through this one table:
- mmcl's own (mlp, gru, transformer, cnn, hf) register when mmcl.models.encoders loads;
- `@mmcl.models.register_encoder("name")` on a user's class or function, in the same process;
- `kind: "my_package.module:MyEncoder"` in a config: imported only when a config names it, and
  then registered under that string, so Ray workers (which never ran the user's script) find
  it by importing it themselves.

A config the user gives (a file, `--set`) is the user's own: its plug-ins are imported. A config
read back from a run folder or checkpoint (`mmcl.load`, `mmcl eval`, `mmcl embed`) may have
been written or edited by someone else, and `kind: "os:system"` would be called: its plug-in
kinds are refused (`refuse_plugins`) unless the caller consents (`trust_plugins=True`,
`--allow-plugins`). mmcl's own kinds and names registered in this process need no consent.

Entries may be given as an import string ("mmcl.models.hf:HFEncoder") so that heavy
dependencies (transformers) load only when a config uses the kind.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable

from mmcl.config import ConfigError

Builder = Callable[..., Any]
# "package.module:Name" (the form a config may use to name a plug-in encoder).
IMPORT_FORM = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class Entry:
    name: str
    target: Builder | str               # the builder, or "module:Name" not yet imported
    fits: tuple[str, ...] | None = None  # modality kinds it accepts; None = any

    def builder(self) -> Builder:
        if isinstance(self.target, str):
            self.target = import_target(self.target, f"encoder kind {self.name!r}")
        return self.target


_REGISTRY: dict[str, Entry] = {}
BUILTIN: set[str] = set()  # mmcl's own kinds: a plug-in may not replace them


def register_encoder(name: str, fits: tuple[str, ...] | list[str] | None = None):
    """Decorator: register a class or function as encoder kind `name`.

        @mmcl.models.register_encoder("my_mlp", fits=["vector"])
        class MyMLP(nn.Module):
            def __init__(self, spec, cfg, embed_dim): ...
            def forward(self, x, mask=None): ...   # (B, *spec.shape) -> (B, embed_dim)

    `fits` lists the modality kinds the encoder accepts (None: any). Registering a name twice
    replaces the earlier entry, except that mmcl's own kinds cannot be replaced."""
    if not isinstance(name, str) or not name or "__" in name:
        raise ValueError(f"an encoder kind needs a non-empty name without '__', got {name!r}")

    def decorate(target: Builder) -> Builder:
        if name in _REGISTRY and name in BUILTIN and _REGISTRY[name].target is not target:
            raise ValueError(f"encoder kind {name!r} is one of mmcl's own; choose another name")
        _REGISTRY[name] = Entry(name, target, tuple(fits) if fits is not None else None)
        return target

    return decorate


def register_builtin(name: str, target: Builder | str, fits: tuple[str, ...] | None) -> None:
    BUILTIN.add(name)
    _REGISTRY[name] = Entry(name, target, fits)


def import_target(target: str, what: str) -> Builder:
    """The object `module:Name` names, or one ConfigError saying what failed."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{what}: cannot import module {module_name!r} ({err}); install the "
                          f"package that provides it on every machine of the run, or fix "
                          f"the name") from None
    except Exception as err:  # noqa: BLE001 - any failure in the user's module is the user's
        raise ConfigError(f"{what}: importing module {module_name!r} failed: "
                          f"{type(err).__name__}: {err}") from None
    found = getattr(module, attr, None)
    if found is None:
        raise ConfigError(f"{what}: module {module_name!r} has no {attr!r}")
    if not callable(found):
        raise ConfigError(f"{what}: {target!r} is a {type(found).__name__}, not a class or "
                          f"function that builds an encoder")
    return found


def lookup(kind: str, field: str = "model.encoder.kind") -> Entry:
    """The entry for `kind`; "module:Name" kinds are imported and registered on first use.
    `field` names the config field in the message of an unknown kind."""
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    if IMPORT_FORM.match(kind):
        entry = Entry(kind, import_target(kind, f"encoder kind {kind!r}"))
        _REGISTRY[kind] = entry
        return entry
    raise ConfigError(f"{field}: unknown encoder kind {kind!r}; known kinds: {kinds()}, or "
                      f"name a plug-in as 'package.module:ClassName' (a name registered with "
                      f"mmcl.models.register_encoder must be registered before the model is "
                      f"built, in every process)")


def kinds() -> list[str]:
    """Every registered kind name ("auto" resolves per modality kind and is not listed)."""
    return sorted(k for k in _REGISTRY if not IMPORT_FORM.match(k))


PLUGIN_CONSENT = ("pass --allow-plugins (mmcl eval / mmcl embed) or "
                  "mmcl.load(path, trust_plugins=True)")


def plugin_kinds(kinds) -> list[str]:
    """The kinds among `kinds` that would be imported: "module:Name" plug-ins."""
    return sorted({k for k in kinds if isinstance(k, str) and IMPORT_FORM.match(k)})


def refuse_plugins(kinds, source: str) -> None:
    """One ConfigError when `kinds` (those a recorded config names) hold a plug-in: building
    the model would import that module and call what it names. Built-in and registered kinds
    pass."""
    plugins = plugin_kinds(kinds)
    if plugins:
        raise ConfigError(
            f"{source} names the plug-in encoder kind {plugins[0]!r}: loading the model would "
            f"import that module and run its code. A plug-in named by a recorded config (a run "
            f"or checkpoint folder, which anyone with write access to it may have edited) is "
            f"imported only when you say so: {PLUGIN_CONSENT}, only for a run you trust")
