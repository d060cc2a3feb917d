"""cluster/: the launcher YAML validates against the schema Ray ships for it, and the KubeRay
manifests parse and name entrypoints and configs that exist. Neither is launched here."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from mmcl import config

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
# What an AWS key or a literal secret in a file looks like.
SECRET_PATTERNS = [re.compile(p) for p in (
    r"\b(AKIA|ASIA)[A-Z0-9]{16}\b",
    r"(?i)secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}",
    r"(?i)auth_token[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=_-]{16,}",
)]


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def no_secrets(path: Path) -> None:
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path.name}: looks like a credential: {pattern.pattern}"


# ----------------------------------------------------------------------------- aws.yaml


@pytest.fixture(scope="module")
def aws():
    return load_yaml(CLUSTER / "aws.yaml")


def test_aws_yaml_validates_against_rays_schema(aws):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(aws, schema)

    # Ray's own check, on the config as `ray up` fills it out (defaults of the AWS provider).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_yaml_head_and_autoscaling_cpu_and_gpu_workers(aws):
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != aws["head_node_type"]}
    assert set(workers) == {"cpu_worker", "gpu_worker"}
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] < spec["max_workers"] <= aws["max_workers"], name
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    version = ray.__version__
    images = [aws["docker"]["image"], types["gpu_worker"]["docker"]["worker_image"]]
    assert all(f":{version}-" in image for image in images), images
    assert "gpu" in types["gpu_worker"]["docker"]["worker_image"]


def test_aws_yaml_installs_mmcl_from_files_that_exist(aws):
    mounts = aws["file_mounts"]
    for remote, local in mounts.items():
        if local.startswith("~"):
            continue  # the token file on the user's machine
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repo"
    sources = {remote for remote, local in mounts.items() if not local.startswith("~")}
    assert {"~/mmcl/pyproject.toml", "~/mmcl/mmcl"} <= sources
    gpu = aws["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    for commands in (aws["setup_commands"], gpu):
        assert any(re.search(r"pip install .*~/mmcl\b", c) for c in commands), commands
        assert any("torch==" in c for c in commands)


def test_aws_yaml_dashboard_on_localhost_and_token_auth(aws):
    head = " ".join(aws["head_start_ray_commands"])
    worker = " ".join(aws["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands
    assert aws["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    no_secrets(CLUSTER / "aws.yaml")


# ----------------------------------------------------------------------------- KubeRay


def manifest_ids():
    return [p.name for p in MANIFESTS]


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def test_the_manifests_are_there():
    kinds = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert kinds.get("RayCluster") == ["mmcl"]
    assert sorted(kinds.get("RayJob", [])) == ["mmcl-pretrain", "mmcl-tune"]


@pytest.mark.parametrize("path", MANIFESTS, ids=manifest_ids())
def test_kuberay_manifest_parses_with_token_auth_and_resources(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1
    doc = docs[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group in spec.get("workerGroupSpecs", []):
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
    for container in containers(spec):
        assert container["image"]
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["limits"]["memory"]
        # S3 keys from a Secret (or a pod role), never a literal value
        for env in container.get("env", []):
            if env["name"].startswith("AWS_") and "KEY" in env["name"]:
                assert "valueFrom" in env and "value" not in env, env
    no_secrets(path)


def test_raycluster_dashboard_listens_on_the_head_pods_loopback():
    doc = load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def entrypoint_files(entrypoint: str) -> tuple[str, str]:
    """(script, --config value) of `python SCRIPT ... --config FILE ...`."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    config_path = argv[argv.index("--config") + 1] if "--config" in argv else None
    return argv[1], config_path


def require(relative: str) -> Path:
    path = REPO / relative
    assert path.exists(), f"{relative} does not exist"
    return path


JOBS = [p for p in MANIFESTS if load_yaml(p)["kind"] == "RayJob"]


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_rayjob_names_an_existing_entrypoint_and_config(path):
    doc = load_yaml(path)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/mmcl"
    assert "COPY --chown=ray:users ray_jobs /home/ray/mmcl/ray_jobs" in \
        (CLUSTER / "Dockerfile").read_text()
    # Ray writes runtime_env env_vars into its logs: nothing secret may go there.
    for name in runtime_env.get("env_vars", {}):
        assert not name.startswith("AWS_") and "TOKEN" not in name, name
    script, config_path = entrypoint_files(spec["entrypoint"])
    assert script.startswith("ray_jobs/")
    require(script)
    assert config_path, "the entrypoint names no --config"
    require(config_path)
    if script == "ray_jobs/pretrain.py":
        cfg = config.load(REPO / config_path)   # a valid run config
        assert cfg.storage.path.startswith("s3://"), "a RayJob's cluster disks go away"


def test_s3_example_config_is_valid_and_holds_no_credentials():
    cfg = config.load(REPO / "configs" / "s3_example.yaml")
    assert cfg.data.path.startswith("s3://") and cfg.storage.path.startswith("s3://")
    no_secrets(REPO / "configs" / "s3_example.yaml")


def test_cluster_readme_covers_launch_submit_logs_results_teardown():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ray dashboard cluster/aws.yaml",
                   "ray job submit --address", "--working-dir .", "ray job logs",
                   "ray down cluster/aws.yaml", "kubectl apply -f cluster/kuberay/",
                   "RAY_AUTH_MODE=token", "storage.path"):
        assert needle in text, needle
    for path in [CLUSTER / "aws.yaml", *MANIFESTS]:
        assert str(path.relative_to(CLUSTER)) in text, path.name
