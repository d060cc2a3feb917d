"""Objectives: one file per method (reading like its section of docs/methods.md), a
functional core of pure tensor losses, and a registry from config names to objective
classes. Plain PyTorch: nothing here imports Ray.

Adding an objective: its config class in mmcl.config.OBJECTIVE_CONFIGS and a module here whose
class is decorated with `registry.register`; every module of this package is imported below,
so there is no list of imports to keep in step.
"""

from __future__ import annotations

import importlib
import pkgutil

from mmcl.objectives.base import LossOutput, Objective, ObjectiveError, OptimGroup
from mmcl.objectives.registry import OBJECTIVES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # each objective registers itself


def build_objective(run_cfg, manifest) -> Objective:
    """The objective a run config names, on the data set the manifest describes (restricted to
    the config's modalities)."""
    from mmcl.data.prepare import model_manifest

    manifest = model_manifest(manifest, getattr(getattr(run_cfg, "data", None), "normalize", True))
    cls = OBJECTIVES[run_cfg.objective.name]
    check_missing(cls, run_cfg, manifest)
    return cls(run_cfg.objective, manifest, run_cfg.model)


def check_missing(cls: type[Objective], run_cfg, manifest) -> None:
    """data.missing=mask on data whose modalities can be absent: the one place that refuses
    an objective (or fusion) that would treat an absent modality as a value."""
    if getattr(getattr(run_cfg, "data", None), "missing", None) != "mask":
        return
    absent = [m.name for m in manifest.modalities if m.nullable]
    if not absent:
        return
    if not cls.supports_missing:
        honour = sorted(name for name, c in OBJECTIVES.items() if c.supports_missing)
        raise ObjectiveError(
            f"objective {cls.name!r} does not support data.missing=mask (modalities "
            f"{absent} can be absent, and it would contrast their absent values); use one of "
            f"{', '.join(honour)}, or data.missing=drop")
    fusion = getattr(getattr(run_cfg, "model", None), "fusion", "transformer")
    if cls.uses_fusion and fusion != "transformer":
        raise ObjectiveError(
            f"objective {cls.name!r} with data.missing=mask needs model.fusion=transformer "
            f"(model.fusion={fusion} cannot leave an absent modality out of a tuple; "
            f"modalities {absent} can be absent)")


__all__ = ["OBJECTIVES", "LossOutput", "Objective", "ObjectiveError", "OptimGroup",
           "build_objective"]
