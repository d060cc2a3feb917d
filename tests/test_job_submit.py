"""`ray job submit` end to end: a local head on loopback with Ray's token authentication on
(the default for local clusters in Ray 2.60), the job CLI in the same auth mode, and
ray_jobs/pretrain.py run from an uploaded working dir."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, pid_alive

# A cold `ray start` plus a job that installs its working dir and trains takes minutes on a
# loaded 2-core machine: more than the suite's default per-test timeout.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [*TINY_MODEL, *TINY_TRAIN, "data.synth.n=300", "train.epochs=1", "scaling.num_workers=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    exe = BIN / "ray"
    return str(exe) if exe.exists() else shutil.which("ray")


def processes_under(folder: Path) -> set[int]:
    """The processes whose command line names `folder` (the cluster's --temp-dir: its GCS,
    raylet, dashboard, agents and workers all carry their session folder in their
    arguments), and their descendants: the cluster this module started, no other Ray."""
    children: dict[int, list[int]] = {}
    named = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
        if f"{folder}/" in cmdline:  # its session folder: not a sibling such as ray01
            named.add(int(proc.name))
    found, todo = set(), list(named)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found - {os.getpid()}



def stop_cluster(folder: Path, grace_s: float = 30) -> None:
    """Stop the processes of the cluster started with --temp-dir=folder, and only those
    (`ray stop` would stop every Ray on the machine: another suite's, a user's)."""
    pids = processes_under(folder)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = {p for p in pids if pid_alive(p)}
        if not pids:
            return


def wait_for_job_api(env: dict, address: str, timeout_s: float = 300) -> None:
    """`ray start` returns before the job API answers: poll `ray job list` (as the README
    says) until it does."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = subprocess.run([ray_cli(), "job", "list", "--address", address], env=env,
                                capture_output=True, text=True, timeout=120)
        if listed.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the job API at {address} never answered: "
                                 f"{listed.stdout[-1000:]}{listed.stderr[-1000:]}")
        time.sleep(1)


NO_AGENT = "No available agent to submit job"


def submit(env: dict, args: list[str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit`, resubmitted while the head's job agent is not up yet: the head
    refuses such a submission before it creates the job, so submitting again is safe."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = subprocess.run([ray_cli(), "job", "submit", *args], env=env, capture_output=True,
                             text=True, timeout=timeout_s, cwd=REPO)
        if NO_AGENT not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


def start_head(env: dict, args: list[str], temp: Path, attempts: int = 3) -> None:
    """`ray start --head`, tried again after stopping what it left: on a loaded machine the
    raylet can give up waiting for its dashboard agent ("The current node timed out during
    startup")."""
    for attempt in range(attempts):
        started = subprocess.run([ray_cli(), "start", "--head", *args], env=env,
                                 capture_output=True, text=True, timeout=300)
        if started.returncode == 0:
            return
        stop_cluster(temp)
    pytest.fail(f"ray start failed {attempts} times: {started.stdout[-1500:]}"
                f"{started.stderr[-1500:]}")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # The job's `python` is whatever the head's PATH finds first: make it this environment's.
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, dashboard = free_port(), free_port()
    # Every port of its own: the defaults (the job agent's 52365, the client server's 10001,
    # ...) are taken when another Ray runs on the machine, and a job agent that cannot bind
    # leaves the head answering "No available agent to submit job" for ever.
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "object-manager-port",
        "node-manager-port")]
    temp = tmp_path_factory.mktemp("ray")
    address = f"http://127.0.0.1:{dashboard}"
    subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, check=False,
                   capture_output=True)
    try:
        start_head(env, [f"--port={port}", "--node-ip-address=127.0.0.1",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                         "--num-cpus=3", f"--temp-dir={temp}", "--disable-usage-stats",
                         *own_ports], temp)
        wait_for_job_api(env, address)
        yield env, address
    finally:
        stop_cluster(temp)
        assert not processes_under(temp), "processes of the test's cluster survived"


def test_submitted_job_trains_and_writes_its_run(head, tmp_path):
    env, address = head
    sets = [arg for item in [*TINY, f"storage.path={tmp_path}", "storage.name=submitted"]
            for arg in ("--set", item)]
    job = submit(env, ["--address", address, "--working-dir", str(REPO), "--", "python",
                       "ray_jobs/pretrain.py", "--config", "configs/default.yaml", *sets])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    run = tmp_path / "submitted"
    assert (run / "model" / "weights.pt").exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == 1


def test_job_cli_without_the_clusters_auth_mode_is_refused(head):
    env, address = head
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    no_token["RAY_AUTH_TOKEN_PATH"] = "/nonexistent/token"
    listed = subprocess.run([ray_cli(), "job", "list", "--address", address], env=no_token,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode != 0
    assert "token" in (listed.stdout + listed.stderr).lower()


def test_stopping_the_test_cluster_spares_other_processes(tmp_path):
    """stop_cluster stops what runs under the test cluster's folder (and its children), not
    a process of another folder that merely shares its name's prefix."""
    ours, theirs = tmp_path / "ray0", tmp_path / "ray01"
    sleeper = "import sys, time; time.sleep(600)"
    mine = subprocess.Popen([sys.executable, "-c", sleeper, f"{ours}/session_x/logs"])
    other = subprocess.Popen([sys.executable, "-c", sleeper, f"{theirs}/session_y/logs"])
    try:
        assert mine.pid in processes_under(ours)
        assert other.pid not in processes_under(ours)
        stop_cluster(ours)
        assert mine.wait(timeout=60) is not None
        assert other.poll() is None, "a process of another cluster was stopped"
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait()
