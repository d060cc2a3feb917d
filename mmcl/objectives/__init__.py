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
    return OBJECTIVES[run_cfg.objective.name](run_cfg.objective, manifest, run_cfg.model)


__all__ = ["OBJECTIVES", "LossOutput", "Objective", "ObjectiveError", "OptimGroup",
           "build_objective"]
