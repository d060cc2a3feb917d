"""`mmcl bench`: performance measured side by side, never asserted by timed tests.

    mmcl bench perf [--quick] [--out DIR]      -> DIR/perf.json and DIR/perf.md

Every figure is a ratio of two things measured in the same run (interleaved, so that load
from other processes hits both sides alike), and every result carries the machine (cores, GPU,
load average before and after), the versions and the settings it was taken with.

Modules: `env` (machine and versions), `timing` (interleaved timing, CPU peak memory from the
torch profiler), `reencode` (the reference code's TupleInfoNCE step, kept here as the
baseline only), `plane` (the Ray Train worker loop whose epochs
cycle through batch sources: Ray Data readers and in-memory tensors), `startup` (the README
demo, timed phase by phase), `perf` (the sections, JSON and markdown). See
docs/performance.md for the figures.
"""

from __future__ import annotations

__all__ = ["run_perf"]


def run_perf(*args, **kwargs):
    from mmcl.bench.perf import run_perf as run

    return run(*args, **kwargs)
