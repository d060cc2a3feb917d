"""`python -m mmcl.bench.startup --timings FILE -- <mmcl arguments>`: run an mmcl command
(the README demo) and write how long each phase took.

The parent puts its launch time (time.time()) in $MMCL_BENCH_T0; phases are measured by
wrapping the launcher's own functions, so the command runs exactly as `mmcl ...` would.
FILE gets {phase: seconds} plus `_fit_start_since_launch_s` and `_main_end_since_launch_s`
(seconds after launch), from which the parent splits the run further.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    entered = time.time()
    launched = float(os.environ.get("MMCL_BENCH_T0", entered))
    if "--" not in argv or argv[0] != "--timings":
        print("usage: python -m mmcl.bench.startup --timings FILE -- ARGS", file=sys.stderr)
        return 2
    timings_path, args = argv[1], argv[argv.index("--") + 1:]
    phases: dict[str, float] = {"interpreter": entered - launched}
    marks: dict[str, float] = {}

    start = time.perf_counter()
    from mmcl import cli
    from mmcl.train import launcher

    import ray  # noqa: F401  (the launcher imports it lazily; counted as an import)

    phases["imports"] = time.perf_counter() - start

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            if name == "fit":
                marks["_fit_start_since_launch_s"] = time.time() - launched
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    original_make_trainer = launcher.make_trainer

    def make_trainer(*a, **kw):
        t = time.perf_counter()
        trainer = original_make_trainer(*a, **kw)
        phases["make_trainer"] = time.perf_counter() - t
        trainer.fit = timed("fit", trainer.fit)
        return trainer

    launcher.prepare_data = timed("prepare_data", launcher.prepare_data)
    launcher.start_ray = timed("start_ray", launcher.start_ray)
    launcher.make_trainer = make_trainer
    launcher.finish_run = timed("finish_run", launcher.finish_run)

    t = time.perf_counter()
    code = cli.main(args)
    total_main = time.perf_counter() - t
    known = sum(v for k, v in phases.items() if k not in ("interpreter", "imports"))
    phases["other_in_command"] = max(0.0, total_main - known)
    t = time.perf_counter()
    import ray

    if ray.is_initialized():
        ray.shutdown()
    phases["ray_shutdown"] = time.perf_counter() - t
    marks["_main_end_since_launch_s"] = time.time() - launched
    with open(timings_path, "w") as f:
        json.dump({**phases, **marks}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
