"""What every benchmark figure carries: the machine, its load, the versions."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """Cores, GPU, memory, CPU model, load average now, and the versions that matter."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        gpu = {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": _memory_gib(),
        "gpu": gpu,
        "load_average": load_average(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": sys.version.split()[0],
            "mmcl": _version("mmcl"),
            "torch": torch.__version__,
            "ray": _version("ray"),
            "pyarrow": _version("pyarrow"),
            "numpy": _version("numpy"),
        },
    }


def describe(m: dict) -> str:
    """One line for a markdown report."""
    gpu = f"GPU {m['gpu']['count']}x {m['gpu']['name']}" if m.get("gpu") else "no GPU"
    v = m["versions"]
    return (f"{m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, {gpu}; "
            f"python {v['python']}, torch {v['torch']}, ray {v['ray']}, pyarrow {v['pyarrow']}, "
            f"mmcl {v['mmcl']}")


def json_default(value):
    """json.dump's fallback for the numpy scalars in bench reports."""
    import numpy as np

    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
