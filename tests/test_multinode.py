"""Multi-node on one machine (issue 20 item 5): a Ray cluster of two nodes on loopback (each
its own raylet and object store, `ray.cluster_utils.Cluster`) runs `mmcl pretrain --address`
with one training worker per node and the run on a loopback S3; the node of one worker is
killed mid-run and the run resumes from its checkpoint on S3 on the node left. No local Ray
of its own: the cluster is this module's Ray, started and stopped by the test (only its own
processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, pid_alive, wait_for

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")
pytest.importorskip("moto.server")
pytestmark = [pytest.mark.ray]

TINY = [*TINY_MODEL, *TINY_TRAIN, "scaling.num_workers=2", "train.checkpoint_every=1",
        "objective.name=tuple", "data.synth.n=400"]
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints



NODE_DRIVER = """
import functools, os, sys

import ray.train

import mmcl.train.launcher as launcher
from mmcl.cli import main

HEAD = os.environ["MMCL_TEST_HEAD_NODE"]
MARKS = os.environ["MMCL_TEST_MARKS"]


def put(name, fields):
    import json, os

    with open(os.path.join(MARKS, name + ".tmp"), "w") as f:
        json.dump(fields, f)
    os.replace(os.path.join(MARKS, name + ".tmp"), os.path.join(MARKS, name))


def loop(loop_config):
    # mmcl's worker loop. Each worker records its node; the worker that is not on the head
    # node stalls at its second batch of epoch 2 until the test kills its node.
    import json, os, time

    import ray
    import ray.train

    from mmcl.train import worker

    node = ray.get_runtime_context().get_node_id()
    record = {"rank": ray.train.get_context().get_world_rank(), "node": node,
              "pid": os.getpid(), "started": time.time()}
    put(f"worker-{os.getpid()}.json", record)
    real = worker.Engine.train_step
    seen = {}

    def train_step(self, batch):
        seen[self.epoch] = n = seen.get(self.epoch, 0) + 1
        if node != HEAD and self.epoch == 1 and n == 2:
            put("stalled.json", {**record, "step": self.step})
            time.sleep(600)  # its node is killed meanwhile
        return real(self, batch)

    worker.Engine.train_step = train_step
    return worker.train_loop_per_worker(loop_config)


real_make_trainer = launcher.make_trainer


def make_trainer(cfg, root, manifest, steps, name, loop_=None, **kw):
    # One worker per node while both are up: Ray Train's default PACK would put both on
    # the head node, which has the CPUs for them. SPREAD is best effort: the test checks
    # where the workers ran.
    scaling = ray.train.ScalingConfig
    ray.train.ScalingConfig = functools.partial(scaling, placement_strategy="SPREAD")
    try:
        return real_make_trainer(cfg, root, manifest, steps, name, loop=loop, **kw)
    finally:
        ray.train.ScalingConfig = scaling


real_check = launcher.check_storage_reachable


def check_storage_reachable(cfg, error=launcher.LaunchError):
    # Connected to the 2-node cluster: the same check for a local storage.path, unmarked
    # and marked shared, before the run's own.
    def local(**fields):
        storage = cfg.storage.model_copy(update={"path": os.path.join(MARKS, "runs"),
                                                 **fields})
        return cfg.model_copy(update={"storage": storage})

    try:
        real_check(local(), error)
        refused = None
    except error as err:
        refused = str(err)
    real_check(local(shared=True), error)
    put("refused.json", {"local": refused})
    real_check(cfg, error)


launcher.check_storage_reachable = check_storage_reachable
launcher.make_trainer = make_trainer
sys.exit(main(sys.argv[1:]))
"""


def read_s3_json(url: str, endpoint: str, lines: bool = False):
    """A JSON file (or JSON lines) on S3 as it is now, or None while it is not there."""
    from mmcl.storage import filesystem

    fs, path = filesystem(url, endpoint)
    fs.invalidate_cache()
    try:
        text = fs.cat_file(path).decode()
        return [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
    except (FileNotFoundError, ValueError):
        return None


def s3_registered_epoch(run_url: str, endpoint: str) -> int:
    snapshot = read_s3_json(f"{run_url}/{SNAPSHOT}", endpoint)
    try:
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        return read_s3_json(f"{run_url}/{name}/meta.json", endpoint)["epoch"]
    except (TypeError, KeyError):
        return 0


def test_a_node_lost_mid_run_the_run_resumes_on_the_nodes_left(s3_endpoint, tmp_path,
                                                               monkeypatch):
    """Two Ray nodes on loopback (a head with 3 CPUs, a node with 1), run storage and data
    on S3 (loopback moto). `mmcl pretrain --address` runs 2 workers, one per node; in epoch
    2, once Ray Train has registered the checkpoint of epoch 1, the second node is killed
    (raylet, object store and the worker on it, SIGKILL). The run restarts its worker group
    on the node left (scaling.max_failures=1), resumes from that checkpoint on S3 and
    finishes. On the same cluster, a local storage.path is refused (storage.shared)."""
    from ray.cluster_utils import Cluster

    from mmcl.storage import filesystem

    # The nodes start without the driver's credentials: their workers reach the bucket
    # only through mmcl (shared in Ray's memory by the driver).
    creds = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for key in creds:
        monkeypatch.delenv(key)
    cluster = Cluster(shutdown_at_exit=True)
    driver = None
    try:
        head = cluster.add_node(num_cpus=3, include_dashboard=False)
        lost = cluster.add_node(num_cpus=1)
        for key, value in creds.items():
            monkeypatch.setenv(key, value)
        cluster.wait_for_nodes(timeout=120)

        marks = tmp_path / "marks"
        marks.mkdir()
        script = tmp_path / "driver.py"
        script.write_text(NODE_DRIVER)
        runs = "s3://mmcl-test/runs"
        run_url = f"{runs}/node-lost"
        # No online probe, no tracker: neither is what this test is about.
        common = [*TINY, "train.epochs=2", "scaling.max_failures=1", "eval.every_epochs=0",
                  "tracking.backend=none", f"storage.endpoint_url={s3_endpoint}"]

        def argv(*sets):
            return [a for s in [*common, *sets] for a in ("--set", s)] + [
                "--address", cluster.address]

        def driver_log():
            return (tmp_path / "driver.log").read_text()[-4000:]

        env = {**os.environ, "MMCL_TEST_HEAD_NODE": head.node_id,
               "MMCL_TEST_MARKS": str(marks)}
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen(
            [sys.executable, str(script), "pretrain",
             *argv(f"storage.path={runs}", "storage.name=node-lost")],
            env=env, stdout=log, stderr=subprocess.STDOUT)

        def stalled():
            if driver.poll() is not None:
                raise AssertionError(f"the driver exited early:\n{driver_log()}")
            path = marks / "stalled.json"
            return path.exists() and json.loads(path.read_text())

        stall = wait_for(stalled, 360, "the worker on the second node to reach epoch 2")
        wait_for(lambda: s3_registered_epoch(run_url, s3_endpoint) == 1, 120,
                 "Ray Train to register the checkpoint of epoch 1")
        assert stall["node"] == lost.node_id
        cluster.remove_node(lost, allow_graceful=False)
        wait_for(lambda: not pid_alive(stall["pid"]), 60, "the lost node's worker to exit")
        try:
            rc = driver.wait(timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not finish:\n{driver_log()}") from None
        log.close()
        assert rc == 0, driver_log()
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        cluster.shutdown()  # this test's nodes only: the processes they started

    # On the cluster of 2 nodes, a local storage.path is refused unless marked shared.
    refused = json.loads((marks / "refused.json").read_text())["local"]
    assert refused and "is a local folder, but the Ray cluster has 2 nodes" in refused
    assert "storage.shared=true" in refused
    # One worker per node at first; after the node was lost, both on the head node.
    workers = sorted((json.loads(p.read_text()) for p in marks.glob("worker-*.json")),
                     key=lambda w: w["started"])
    assert len(workers) == 4, workers
    first, restarted = workers[:2], workers[2:]
    assert {w["node"] for w in first} == {head.node_id, lost.node_id}, workers
    assert {w["node"] for w in restarted} == {head.node_id}, workers
    assert [sorted(w["rank"] for w in attempt) for attempt in (first, restarted)] == [
        [0, 1], [0, 1]]
    # The run resumed from the checkpoint of epoch 1 and finished.
    history = read_s3_json(f"{run_url}/metrics.jsonl", s3_endpoint, lines=True)
    steps = history[0]["step"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["resumed_from_step"] for h in history] == [0, steps]
    assert steps > 0 and history[-1]["step"] == 2 * steps
    assert stall["step"] == steps + 1  # killed one batch into epoch 2
    fs, path = filesystem(run_url, s3_endpoint)
    assert fs.exists(f"{path}/model/weights.pt")  # the model is exported: a finished run
