"""`ray job submit` end to end: a local head on loopback with Ray's token authentication on
(the default for local clusters in Ray 2.60), the job CLI in the same auth mode, and
ray_jobs/pretrain.py run from an uploaded working dir."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["data.synth.n=300", "train.epochs=1", "train.batch_size=32", "train.warmup_epochs=0",
        "model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
        "model.proj_dim=16", "model.fusion_heads=2", "scaling.num_workers=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    exe = BIN / "ray"
    return str(exe) if exe.exists() else shutil.which("ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # The job's `python` is whatever the head's PATH finds first: make it this environment's.
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, check=False,
                   capture_output=True)
    subprocess.run(
        [ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=3",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180)
    yield env, f"http://127.0.0.1:{dashboard}"
    subprocess.run([ray_cli(), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submitted_job_trains_and_writes_its_run(head, tmp_path):
    env, address = head
    sets = [arg for item in [*TINY, f"storage.path={tmp_path}", "storage.name=submitted"]
            for arg in ("--set", item)]
    job = subprocess.run(
        [ray_cli(), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "ray_jobs/pretrain.py", "--config", "configs/default.yaml", *sets],
        env=env, capture_output=True, text=True, timeout=540, cwd=REPO)
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
