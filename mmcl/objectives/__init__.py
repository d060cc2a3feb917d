"""Objectives: one file per method (reading like its section of docs/methods.md), a
functional core of pure tensor losses, and a registry from config names to objective
classes. Plain PyTorch: nothing here imports Ray."""

from __future__ import annotations

from mmcl.objectives import comm, cross, factorcl, supcon, tuple_contrast, tuple_infonce  # noqa: F401  (register)
from mmcl.objectives.base import LossOutput, Objective, ObjectiveError, OptimGroup
from mmcl.objectives.registry import OBJECTIVES


def build_objective(run_cfg, manifest) -> Objective:
    """The objective a run config names, on the data set the manifest describes (restricted to
    the config's modalities)."""
    from mmcl.data.prepare import model_manifest

    manifest = model_manifest(manifest, getattr(getattr(run_cfg, "data", None), "normalize", True))
    return OBJECTIVES[run_cfg.objective.name](run_cfg.objective, manifest, run_cfg.model)


__all__ = ["OBJECTIVES", "LossOutput", "Objective", "ObjectiveError", "OptimGroup",
           "build_objective"]
