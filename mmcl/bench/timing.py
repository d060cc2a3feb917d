"""Timing that survives a shared machine, and CPU peak memory.

Other processes load the machine unevenly over time. `interleaved` therefore runs the things
being compared in rounds (every candidate once per round, the order rotated each round), and
`paired_ratio` takes the ratio within each round before the median over rounds: a burst of load
slows both sides of a round, not one side of the whole comparison.

`peak_memory` records the torch CPU allocator's allocations and frees with the profiler
(`profile_memory=True`) and returns the highest running total: the peak of memory allocated
by torch while the function ran, beyond what was allocated before it started.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable, Mapping


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round (the mean of `inner` calls)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def quartiles(values: list[float]) -> dict[str, float]:
    """median, 25th and 75th percentile, n."""
    values = sorted(values)
    if len(values) == 1:
        return {"median": values[0], "p25": values[0], "p75": values[0], "n": 1}
    q = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "n": len(values)}


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Quartiles over rounds of numerator[i] / denominator[i] (same-round ratios)."""
    return quartiles([a / b for a, b in zip(numerator, denominator)])


@contextlib.contextmanager
def quiet_fds():
    """Silence C-level writes to stdout/stderr (the profiler's start/stop lines)."""
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch on the CPU while `fn` runs (allocations minus frees,
    running maximum), from the profiler's memory events."""
    import sys

    from torch.profiler import ProfilerActivity, profile

    sys.stdout.flush()
    sys.stderr.flush()
    with quiet_fds():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if int(e.device_type().value) != 0:  # DeviceType.CPU
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
