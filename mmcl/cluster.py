"""One way to start or join Ray, for every mmcl command that runs on it (pretrain, tune,
embed/eval, data import).

`connect` uses the Ray already initialised in this process, joins `address`, or starts a
local Ray sized for the jobs; then it shares this environment's S3 credentials with the job's
workers and checks that one job, and `concurrent` of them, fit the cluster's CPUs and GPUs.

Local Ray starts without its dashboard. The dashboard hosts Ray's state API, and Ray Train
2.60's own placement-group cleaner (ray/train/v2/_internal/execution/controller/
placement_group_cleaner.py) asks that API whether the Train controller is alive: without the
dashboard every query fails (`ServerUnavailable`, a RayStateApiException, which the cleaner
answers with `continue`), so a group whose controller was killed is never removed. But the
dashboard makes local `ray.init` much slower (docs/performance.md, section 5), a cost every
`mmcl pretrain` and every test module would pay; only a search whose scheduler
stops trials (ASHA) leaves such groups behind, and mmcl.tune.trial's PlacementGroupJanitor
removes those (tests/test_cluster.py checks it does). On a cluster started with `ray start`
the dashboard runs and both cleaners work.
"""

from __future__ import annotations

import os

DATA_CPUS = 1  # Ray Data's read/decode tasks need a whole CPU of their own


class LaunchError(RuntimeError):
    """Ray cannot run the job as configured; the message says what to change."""


def connect(address: str | None, cpus_per_job: int, concurrent: int | None = 1,
            gpus_per_job: int = 0, *, job: str = "run", cost: str | None = None,
            advice: str = "Add nodes", error: type[Exception] = LaunchError,
            init_kwargs: dict | None = None) -> int:
    """Start or join Ray and return how many jobs of `cpus_per_job` CPUs (and `gpus_per_job`
    GPUs) may run at once: `concurrent`, or as many as fit when it is None.

    `job`, `cost` (how `cpus_per_job` adds up) and `advice` word the refusal, raised as
    `error`; `init_kwargs` go to ray.init (train.console.driver_init_kwargs: a quiet driver)."""
    import ray

    from mmcl.storage import share_credentials

    if not ray.is_initialized():
        _start_or_join(address, cpus_per_job * (concurrent or 1), init_kwargs or {})
    share_credentials()  # S3 credentials from this environment, to this job's workers
    resources = ray.cluster_resources()
    return _jobs_that_fit(resources.get("CPU", 0), resources.get("GPU", 0), cpus_per_job,
                          concurrent, gpus_per_job, job=job,
                          cost=cost or f"{cpus_per_job} CPUs", advice=advice, error=error)


def _start_or_join(address: str | None, cpus_wanted: int, init_kwargs: dict) -> None:
    import ray

    if address:
        ray.init(address=address, log_to_driver=True, **init_kwargs)
        return
    # "local": never join a cluster someone else started on this machine. Logical CPUs may
    # exceed physical cores; what matters is that the jobs never take the last CPU that Ray
    # Data's read tasks wait for.
    start_local_ray(num_cpus=max(os.cpu_count() or 1, cpus_wanted), log_to_driver=True,
                    **init_kwargs)


def start_local_ray(**init_kwargs) -> None:
    """ray.init(address="local", include_dashboard=False, ...), started once more if the first
    start times out. Ray 2.60 waits a fixed 30 s for its raylet to register with the GCS
    (ray/_private/node.py, not configurable), which a busy shared machine can miss; the second
    start usually finds the machine's caches warm. Any other error, and a second timeout,
    propagate."""
    import ray

    from mmcl.reaper import owned_ray, start_reaper

    init_kwargs = {"include_dashboard": False, **init_kwargs}
    with owned_ray() as token:   # this Ray's processes carry the token: they end with us
        try:
            ray.init(address="local", **init_kwargs)
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(err):
                raise
            ray.shutdown()
            ray.init(address="local", **init_kwargs)
    start_reaper(token)   # a SIGKILLed driver's local Ray is stopped too (mmcl.reaper)


def _jobs_that_fit(cpus: float, gpus: float, cpus_per_job: int, concurrent: int | None,
                   gpus_per_job: int, *, job: str, cost: str, advice: str,
                   error: type[Exception]) -> int:
    fit = int(cpus // cpus_per_job)
    if fit < 1:
        raise error(f"the Ray cluster has {cpus:g} CPUs; one {job} needs {cost} = "
                    f"{cpus_per_job} CPUs. {advice}")
    if gpus_per_job:
        fit = min(fit, int(gpus // gpus_per_job))
        if fit < 1:
            raise error(f"scaling.use_gpu is on but the Ray cluster has {gpus:g} GPUs; one "
                        f"{job} needs {gpus_per_job}. Set scaling.use_gpu=false or add GPU "
                        "nodes")
    if concurrent is not None and concurrent > fit:
        raise error(f"{concurrent} concurrent {job}s need {concurrent * cpus_per_job} CPUs "
                    f"({cost} = {cpus_per_job} CPUs per {job}); the Ray cluster has "
                    f"{cpus:g}. Lower the number of concurrent {job}s, or {advice[0].lower()}"
                    f"{advice[1:]}")
    return concurrent or fit
