"""Ray Tune for mmcl: YAML search spaces (`space`), sweeps (`sweep`), TupleInfoNCE's sample
optimization (`sample_opt`), the trial that launches one Ray Train run (`trial`), and what
`mmcl tune` runs once mmcl/cli.py has parsed it (`cli`). Ray is imported on use, so this
package imports fast."""

from __future__ import annotations

__all__ = ["run_sweep", "run_sample_opt", "load"]


def __getattr__(name):
    if name == "run_sweep":
        from mmcl.tune.sweep import run_sweep

        return run_sweep
    if name == "run_sample_opt":
        from mmcl.tune.sample_opt import run_sample_opt

        return run_sample_opt
    if name == "load":
        from mmcl.tune.space import load

        return load
    raise AttributeError(name)
