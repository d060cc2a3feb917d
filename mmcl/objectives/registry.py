"""Config name -> objective class. Objective files register themselves on import."""

from __future__ import annotations

from mmcl.objectives.base import Objective

OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls
