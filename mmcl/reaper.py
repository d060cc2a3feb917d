"""A local Ray that mmcl started ends with its driver, however the driver ends.

`ray.init(address="local")` starts Ray's own processes (GCS, raylet, agents, workers). A
driver that exits, or is interrupted, stops them (`ray.shutdown` at exit); a SIGKILLed driver
cannot: Ray's GCS and raylet follow it, but their agents and workers stay (2 processes after
`mmcl pretrain`, 14 after `mmcl tune`).

So `owned_ray()` marks the Ray it starts: an environment variable holding a fresh random token
is set while `ray.init` starts the processes, so every process of that Ray (and every process
they start) carries it in its environment, and nothing else does. `start_reaper(token)` then
starts one small process that holds the read end of a pipe whose only write end stays in the
driver: when the driver ends, in any way, the kernel closes that end, the reaper's read
returns, and it stops every process of this user that carries the token (SIGTERM, then
SIGKILL after a grace period). Nothing is polled while the driver runs. Linux only (it reads
/proc); elsewhere nothing is started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time

OWNER_VAR = "MMCL_RAY_OWNER"


@contextlib.contextmanager
def owned_ray():
    """Inside: processes started carry a fresh token (yielded); afterwards the environment
    is as it was."""
    token = secrets.token_hex(12)
    before = os.environ.get(OWNER_VAR)
    os.environ[OWNER_VAR] = token
    try:
        yield token
    finally:
        if before is None:
            os.environ.pop(OWNER_VAR, None)
        else:
            os.environ[OWNER_VAR] = before


_WRITE_ENDS: list[int] = []   # kept open for this process's life: their closing is its end


def start_reaper(token: str) -> subprocess.Popen | None:
    """Start the reaper of the processes marked with `token`; None where /proc is missing."""
    if not os.path.isdir("/proc"):
        return None
    read_end, write_end = os.pipe()   # not inheritable: no other child holds the write end
    try:
        env = {k: v for k, v in os.environ.items() if k != OWNER_VAR}  # not one of its own
        return subprocess.Popen([sys.executable, "-m", "mmcl.reaper", str(read_end), token],
                                pass_fds=(read_end,), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # a terminal's Ctrl-C is not for it
    finally:
        os.close(read_end)
        _WRITE_ENDS.append(write_end)


def marked(token: str) -> list[int]:
    """This user's processes whose environment carries `token`."""
    needle = f"{OWNER_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:   # gone, or another user's
            continue
    return found


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def reap(token: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process marked with `token`, then SIGKILL those left after `grace_s`."""
    for pid in marked(token):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(p) for p in marked(token)):
        time.sleep(0.1)
    for pid in marked(token):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    fd, token = int(argv[0]), argv[1]
    while True:
        try:
            if not os.read(fd, 1):   # EOF: the driver is gone
                break
        except InterruptedError:
            continue
        except OSError:
            break
    reap(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
