"""Shared test set-up: one torch thread, one local Ray instance per test module, the tiny
model and training settings most modules start from, and the test tiers: every test that
starts Ray (the `ray` marker or the `local_ray` fixture) or the S3 server (`moto_s3`) is also
`slow`, so `pytest -m "not slow"` is the quick tier a developer runs while working."""

import os
import time
from pathlib import Path

import pytest
import torch

from mmcl.cluster import start_local_ray

# Tests sign Tune state (mmcl.tune.trust) with a key of their own, never with the user's
# ~/.config/mmcl/trust.key; a test of the key file sets its own XDG_CONFIG_HOME.
os.environ.setdefault("MMCL_TRUST_KEY", "mmcl-test-suite-key")


# The smallest model and training run that still exercise every part (the fusion has 2 heads).
TINY_MODEL = ["model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
              "model.proj_dim=16", "model.fusion_heads=2"]
TINY_TRAIN = ["train.batch_size=32", "train.warmup_epochs=0"]


SLOW_FIXTURES = {"local_ray", "moto_s3"}  # a Ray instance, an S3 server: seconds to start


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("ray") or SLOW_FIXTURES & set(getattr(item, "fixturenames",
                                                                          ())):
            item.add_marker(pytest.mark.slow)


def worker_shards(ds, num_workers: int) -> list:
    """The per-worker iterators Ray Train hands its workers for `ds`, built by the DataConfig
    that mmcl's training passes to its TorchTrainer (pipeline.train_data_config). All of them
    must be iterated concurrently each epoch (a barrier starts every epoch)."""
    from mmcl.data.pipeline import train_data_config

    shards = train_data_config().configure({"train": ds}, world_size=num_workers,
                                           worker_handles=None, worker_node_ids=None)
    return [shard["train"] for shard in shards]


@pytest.fixture
def no_ray(monkeypatch):
    """Refusals come before Ray: starting it for a run fails the test."""
    from mmcl.train import launcher

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(launcher, "start_ray", refuse)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test tensors are tiny: extra intra-op threads only add contention (on a busy 2-core
    machine they made the critic and probe tests ~10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module (each start costs seconds). 4 logical CPUs on a 2-core
    machine: Ray Data needs whole CPUs beside two 1-CPU training workers. address="local"
    never joins a cluster that another test started with `ray start`."""
    ray = pytest.importorskip("ray")
    start_local_ray(num_cpus=4, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------------ S3 on loopback


class MotoS3:
    """A moto server (the S3 stand-in that s3fs's own tests use) on 127.0.0.1 in this
    process, with helpers to reset it and to switch its credential checking on and off."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.server._server.server_port}"

    def post(self, path: str, body: bytes = b"") -> None:
        import urllib.request

        request = urllib.request.Request(self.endpoint + path, data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=30).read()

    def reset(self) -> None:
        """Forget every bucket, user and key; no credential checks."""
        self.post("/moto-api/reset-auth", b"inf")
        self.post("/moto-api/reset")

    def require_auth(self, on: bool = True) -> None:
        """From now on, S3 requests need a valid IAM access key and signature."""
        self.post("/moto-api/reset-auth", b"0" if on else b"inf")

    def client(self, service: str, **credentials):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            **credentials)

    def stop(self) -> None:
        self.reset()
        self.server.stop()


def clear_s3fs_cache() -> None:
    """s3fs instances are cached by their options: start each test from fresh clients."""
    import s3fs

    from mmcl import storage

    s3fs.S3FileSystem.clear_instance_cache()
    storage._s3_class().clear_instance_cache()


def _isolate_aws_env(monkeypatch) -> None:
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    # No profile files from the machine running the tests, no instance-metadata lookups.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key, value in {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def moto_s3():
    """One moto server for the whole test session (started on first use)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """An AWS environment of the test's own: no endpoint, profile files, instance metadata
    or credentials from the machine (the test sets what it needs), fresh s3fs clients."""
    _isolate_aws_env(monkeypatch)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    clear_s3fs_cache()
    yield monkeypatch
    clear_s3fs_cache()


@pytest.fixture
def s3_endpoint(moto_s3, aws_env):
    """A clean moto S3 on loopback with bucket "mmcl-test", AWS env vars pointing at fixed
    test credentials (not checked: moto accepts any). Yields the endpoint URL; the endpoint
    itself is not in the environment, so code under test must be given it."""
    moto_s3.reset()
    aws_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    moto_s3.client("s3").create_bucket(Bucket="mmcl-test")
    yield moto_s3.endpoint


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout`
    seconds naming `what`: a condition, never a sleep that assumes the machine's speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
