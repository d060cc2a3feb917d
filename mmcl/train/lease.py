"""One run folder, one driver: a lease object in the run folder while `mmcl pretrain` runs.

The lease (`<run>/driver.lease`, JSON: host, pid, since, renewed, token) is created
atomically: an exclusive create (O_CREAT | O_EXCL) on local disk, a conditional put
(`If-None-Match: *`) on S3. A second driver for the same run finds it and is refused with a
message naming the holder. The lease is removed when the driver exits.

A driver killed with SIGKILL cannot remove its lease; such a stale lease is taken over:
  - held on this host: stale when the holder process is gone (its pid is not running, or
    runs a different process: the start time recorded in the lease differs);
  - held on another host: stale when the holder has not renewed it for EXPIRY_S seconds
    (a live driver renews it every RENEW_S seconds from a background thread).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from mmcl.storage import filesystem, is_remote, join
from mmcl.cluster import LaunchError  # the class launcher re-exports; no torch import

LEASE = "driver.lease"
RENEW_S = 60.0
EXPIRY_S = 600.0


class RunBusyError(LaunchError):
    """Another driver holds the run's lease; the message names it."""


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None if it is not running:
    with the pid it identifies a process even after the pid is reused."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def new_lease() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "renewed": now, "token": uuid.uuid4().hex}


def is_stale(lease: dict, now: float | None = None) -> bool:
    if lease.get("host") == socket.gethostname():
        started = process_start(int(lease.get("pid", -1)))
        return started is None or started != lease.get("started")
    return (now if now is not None else time.time()) - float(lease.get("renewed", 0)) > EXPIRY_S


def describe(lease: dict) -> str:
    return (f"host {lease.get('host')}, pid {lease.get('pid')}, since "
            f"{lease.get('since')} UTC")


class Lease:
    def __init__(self, run_url: str, endpoint_url: str | None = None,
                 region: str | None = None, name: str = LEASE,
                 what: str = "`mmcl pretrain` is running this run",
                 instead: str = "choose another storage.name"):
        # `name`, `what`, `instead`: the same lease for other writers (mmcl data import /
        # convert hold one beside their --out).
        self.url = join(run_url, name)
        self.what, self.instead = what, instead
        self.fs, self.path = filesystem(self.url, endpoint_url, region)
        self.remote = is_remote(run_url)
        self.mine: dict | None = None

    def _create(self, lease: dict) -> bool:
        """Write `lease` only if no lease exists; False if one does."""
        payload = json.dumps(lease).encode()
        if self.remote:
            try:
                self.fs.pipe_file(self.path, payload, mode="create")
            except FileExistsError:
                return False
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        return True

    def read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # cut short while written: treated as held by nobody alive
            return {}

    def acquire(self) -> None:
        lease = new_lease()
        for _ in range(2):  # once more after removing a stale lease
            if self._create(lease):
                self.mine = lease
                return
            held = self.read()
            if held is None:
                continue  # released meanwhile
            if held and not is_stale(held):
                raise RunBusyError(
                    f"another {self.what} ({describe(held)}; lease "
                    f"{self.url}). Wait for it to end, or {self.instead}. If "
                    f"that driver is gone, its lease expires by itself")
            print(f"[mmcl] taking over the stale lease of a driver that is gone "
                  f"({describe(held) if held else 'unreadable lease'})", flush=True)
            self.fs.rm(self.path)
        held = self.read() or {}
        raise RunBusyError(f"another driver took the lease {self.url} meanwhile "
                           f"({describe(held)}); {self.instead}")

    def renew(self) -> None:
        """Refresh `renewed`, unless another driver took the lease meanwhile."""
        if self.mine is None or (self.read() or {}).get("token") != self.mine["token"]:
            return
        self.mine = {**self.mine, "renewed": time.time()}
        self.fs.pipe_file(self.path, json.dumps(self.mine).encode())

    def release(self) -> None:
        if self.mine is not None and (self.read() or {}).get("token") == self.mine["token"]:
            self.fs.rm(self.path)
        self.mine = None


@contextmanager
def run_lease(run_url: str, endpoint_url: str | None = None, region: str | None = None,
              renew_s: float = RENEW_S, **lease_args) -> Iterator[Lease]:
    """Hold the run's lease for the body, renewing it; refuse if another driver holds it.
    A local folder the lease created and the body left empty (a refused or failed run) is
    removed when it ends."""
    local = None if is_remote(run_url) else os.path.abspath(os.path.expanduser(run_url))
    created = local is not None and not os.path.isdir(local)
    lease = Lease(run_url, endpoint_url, region, **lease_args)
    lease.acquire()
    stop = threading.Event()

    def keep_renewing():
        while not stop.wait(renew_s):
            try:
                lease.renew()
            except Exception:  # noqa: BLE001 - a failed renewal is retried next time
                pass

    renewer = threading.Thread(target=keep_renewing, name="mmcl-lease", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join(timeout=5)
        lease.release()
        if created and os.path.isdir(local) and not os.listdir(local):
            os.rmdir(local)
