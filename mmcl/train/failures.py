"""Failures a restart cannot mend: a full disk is not retried.

Ray Train restarts the worker group after any worker failure, up to `scaling.max_failures`
times. A worker that fails because the disk (or quota) is full fails the same way on every
restart, so the user would wait through every retry and then read Ray's WorkerGroupError.
`no_retry_when_disk_full()` installs, for one `trainer.fit()`, a failure policy that gives
up at once when a worker's error is "no space left on the device" (ENOSPC) or "disk quota
exceeded" (EDQUOT); `disk_full_error(err)` finds that error behind Ray's wrappers, and the
launcher turns it into one StorageError (`mmcl: error: cannot write ...: no space left on the
device`). Other failures keep Ray Train's own policy (retried up to scaling.max_failures).

The policy object is built on the driver and runs in Ray Train's controller actor, which
imports it from this module.
"""

from __future__ import annotations

import contextlib
import errno

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")


def _is_disk_full(err: BaseException) -> bool:
    if not isinstance(err, OSError):
        return False
    if err.errno in DISK_FULL_ERRNOS:
        return True
    # pyarrow's and fsspec's errors carry the errno in their text only
    return any(text in str(err).lower() for text in DISK_FULL_TEXTS)


def disk_full_error(err: BaseException | None) -> OSError | None:
    """The OSError saying the disk or quota is full behind `err` (its causes and contexts,
    Ray's wrappers of a worker's exception, a worker group's failures), or None."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or len(seen) > 100:
            continue
        seen.add(id(e))
        if _is_disk_full(e):
            return e
        failures = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, getattr(e, "_base_exc", None),
                 getattr(e, "cause", None),
                 *(failures.values() if isinstance(failures, dict) else [])]
    return None


def _policy_class():
    from ray.train.v2._internal.execution.failure_handling import (DefaultFailurePolicy,
                                                                   FailureDecision)

    class NoRetryWhenDiskFull(DefaultFailurePolicy):
        """Ray Train's default policy, except that a full disk ends the run at once."""

        def make_decision(self, training_failed_error):
            if disk_full_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    NoRetryWhenDiskFull.__module__ = __name__
    NoRetryWhenDiskFull.__qualname__ = "NoRetryWhenDiskFull"
    return NoRetryWhenDiskFull


def __getattr__(name: str):
    # The class is made on first use (Ray is heavy), and found here by name when the
    # controller actor unpickles the policy.
    if name == "NoRetryWhenDiskFull":
        cls = _policy_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


@contextlib.contextmanager
def no_retry_when_disk_full():
    """For the `trainer.fit()` inside this block: a full disk on a worker is not retried."""
    from ray.train.v2.api import data_parallel_trainer as dpt

    policy = globals().get("NoRetryWhenDiskFull") or __getattr__("NoRetryWhenDiskFull")
    real = dpt.create_failure_policy
    dpt.create_failure_policy = lambda failure_config: policy(failure_config)
    try:
        yield
    finally:
        dpt.create_failure_policy = real
