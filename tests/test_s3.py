"""S3 end to end against a real S3 endpoint on loopback: moto's server mode on 127.0.0.1 with
credential checking on (an IAM user's access key, as on AWS).

    convert -> pretrain (2 Ray Train workers) -> resume -> eval, every path s3://

The module's local Ray starts before the credentials are set, so its workers do not inherit
them: they can only reach the bucket through mmcl (credentials shared in Ray's memory, never
pickled, never on disk). Afterwards every object in the bucket, everything printed, and Ray's
session logs are searched for the secret. A missing bucket, refused credentials and an
unreachable endpoint each end in one clear error that names the path and the endpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest

import mmcl
from mmcl import cli, config, storage
from mmcl.data.synth import make_arrays
from mmcl.train import launcher
from conftest import TINY_MODEL, TINY_TRAIN

ray = pytest.importorskip("ray")
pytest.importorskip("moto.server")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("local_ray")]

BUCKET = "mmcl-s3"
DATA = f"s3://{BUCKET}/sets/rus"
RUNS = f"s3://{BUCKET}/runs"
TINY = [*TINY_MODEL, *TINY_TRAIN, "scaling.num_workers=2", "train.checkpoint_every=1",
        "objective.name=tuple_infonce"]


@pytest.fixture(scope="module")
def iam_key(moto_s3):
    """An IAM user allowed s3:*, its access key, a bucket, then credential checking on."""
    moto_s3.reset()
    boot = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
    iam = moto_s3.client("iam", **boot)
    iam.create_user(UserName="mmcl")
    iam.put_user_policy(UserName="mmcl", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="mmcl")["AccessKey"]
    moto_s3.client("s3", **boot).create_bucket(Bucket=BUCKET)
    moto_s3.require_auth()
    yield {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    moto_s3.reset()


@pytest.fixture
def aws(iam_key, moto_s3, aws_env):
    """The driver's AWS environment: the IAM user's key. The endpoint is not in it (tests
    give it through the storage block or --endpoint-url unless they set it themselves)."""
    aws_env.setenv("AWS_ACCESS_KEY_ID", iam_key["id"])
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", iam_key["secret"])
    return {"endpoint": moto_s3.endpoint, **iam_key}


def bucket_objects(moto_s3, key: dict) -> dict[str, bytes]:
    s3 = moto_s3.client("s3", aws_access_key_id=key["id"], aws_secret_access_key=key["secret"])
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def read_s3_text(url: str, endpoint: str) -> str:
    fs, path = storage.filesystem(url, endpoint)
    return fs.cat_file(path).decode()


def metrics(run_url: str, endpoint: str) -> list[dict]:
    return [json.loads(line) for line in
            read_s3_text(storage.join(run_url, "metrics.jsonl"), endpoint).splitlines()]


def ray_session_files() -> list[Path]:
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]


@ray.remote(num_cpus=0)
def worker_secret():
    return os.environ.get("AWS_SECRET_ACCESS_KEY")


@ray.remote(num_cpus=0)
def list_in_worker(filesystem, path: str, url: str, endpoint: str):
    """A filesystem shipped to a worker, and one the worker opens itself."""
    from pyarrow.fs import FileSelector

    from mmcl import storage as st

    shipped = [i.path for i in filesystem.get_file_info(FileSelector(path, recursive=True))]
    fs, p = st.filesystem(url, endpoint)
    return shipped, fs.ls(p)


# ------------------------------------------------------------------------------ credentials


def test_credentials_reach_ray_workers_in_memory_only(aws, tmp_path):
    # The workers of this module's Ray started before the key was set.
    assert ray.get(worker_secret.remote()) != aws["secret"]
    cfg = config.load(None, [f"storage.path={RUNS}", f"storage.endpoint_url={aws['endpoint']}"])
    fs = launcher.storage_filesystem(cfg)
    fs.create_dir(f"{BUCKET}/probe")
    with fs.open_output_stream(f"{BUCKET}/probe/x.txt") as f:
        f.write(b"hello")
    # What Ray ships (and what Tune writes into tuner.pkl) holds neither key nor secret.
    for blob in (pickle.dumps(fs), ray.cloudpickle.dumps(fs)):
        assert aws["secret"].encode() not in blob and aws["id"].encode() not in blob
    shipped, own = ray.get(list_in_worker.remote(fs, f"{BUCKET}/probe",
                                                 f"s3://{BUCKET}/probe", aws["endpoint"]))
    assert shipped == [f"{BUCKET}/probe/x.txt"]
    assert own == [f"{BUCKET}/probe/x.txt"]
    # A copy unpickled outside Ray uses that process's own credentials (here: the env's).
    assert pickle.loads(pickle.dumps(fs)).get_file_info(f"{BUCKET}/probe/x.txt").size == 5


# ------------------------------------------------------------------------------ end to end


def test_convert_pretrain_resume_eval_all_on_s3(aws, moto_s3, tmp_path, capfd):
    endpoint, secret = aws["endpoint"], aws["secret"]
    manifest, arrays = make_arrays("rus", 300, seed=0)
    keep = ["a", "b", "c", "y", "unique_a", "synergy", "z_redundancy"]
    np.savez(tmp_path / "rus.npz", **{k: arrays[k] for k in keep})

    # convert: straight to the bucket
    assert cli.main(["data", "convert", str(tmp_path / "rus.npz"), "--out", DATA,
                     "--endpoint-url", endpoint]) == 0

    # pretrain: data, Ray Train checkpoints and the run folder on S3 (endpoint in the config)
    base = [*TINY, f"data.path={DATA}", f"storage.path={RUNS}", "storage.name=demo",
            f"storage.endpoint_url={endpoint}"]
    result = launcher.pretrain(config.load(None, [*base, "train.epochs=1"]))
    run = f"{RUNS}/demo"
    assert result.run_url == run
    assert result.checkpoint_url.startswith(f"{run}/checkpoint")
    first = metrics(run, endpoint)
    assert [m["epoch"] for m in first] == [1]

    # resume: as if the driver had been killed after epoch 1's checkpoint, before the export
    # (a finished run is never resumed), the same name with more epochs goes on from the
    # checkpoint on S3
    fs, path = storage.filesystem(f"{run}/model", endpoint)
    fs.rm(path, recursive=True)
    fs.invalidate_cache()
    resumed = launcher.pretrain(config.load(None, [*base, "train.epochs=2"]))
    again = metrics(run, endpoint)
    assert [m["epoch"] for m in again] == [1, 2]
    assert again[:1] == first, "resuming retrained the finished epoch"
    assert again[1]["resumed_from_step"] == first[0]["step"] > 0
    assert resumed.checkpoint_url != result.checkpoint_url

    model = mmcl.load(run, endpoint_url=endpoint)
    batch = {m: arrays[m][:4] for m in "abc"}
    assert tuple(model.embed(batch).shape) == (4, 16)

    # eval: reads the run from S3, embeds with Ray Data actors, writes its report to S3
    assert cli.main(["eval", "--run", run, "--endpoint-url", endpoint, "--few-label-k",
                     "--few-label-seeds", "1", "--l2-grid", "1e-3", "1e-1",
                     "--concurrency", "1"]) == 0
    report = json.loads(read_s3_text(f"{run}/eval/report.json", endpoint))
    assert report["run"] == run and report["epochs"] == 2
    assert {"y", "unique_a", "synergy"} <= set(report["labels"])

    # the secret is nowhere: not in the bucket, not in what was printed, not in Ray's logs
    objects = bucket_objects(moto_s3, aws)
    for key in ("runs/demo/config.yaml", "runs/demo/model/weights.pt",
                "runs/demo/eval/report.json", "sets/rus/manifest.json"):
        assert key in objects, sorted(objects)
    assert any(k.startswith("runs/demo/checkpoint_") for k in objects), sorted(objects)
    leaked = [k for k, body in objects.items() if secret.encode() in body]
    printed = capfd.readouterr()
    assert "mmcl-s3/runs/demo" in printed.out + printed.err
    assert secret not in printed.out + printed.err
    logs = ray_session_files()
    assert logs
    leaked += [str(p) for p in logs if secret.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_synth_and_inspect_with_the_endpoint_from_the_environment(aws, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws["endpoint"])
    url = f"s3://{BUCKET}/sets/synth-factorcl"
    assert cli.main(["data", "synth", "--preset", "factorcl", "--n", "64", "--out", url]) == 0
    assert f"wrote {url}" in capsys.readouterr().out
    assert cli.main(["data", "inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sum(info["splits"].values()) == 64


# ----------------------------------------------------------------------------------- errors


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmcl: error: "), err
    return err[0]


@pytest.mark.parametrize("case", ["missing_bucket", "wrong_secret", "unknown_key",
                                  "unreachable"])
def test_each_s3_failure_is_one_clear_error(aws, monkeypatch, capsys, case):
    endpoint, secret = aws["endpoint"], aws["secret"]
    data = DATA
    if case == "missing_bucket":
        data = "s3://mmcl-no-such-bucket/sets/rus"
    elif case == "wrong_secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret[6:])
    elif case == "unknown_key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    else:
        endpoint = f"http://127.0.0.1:{closed_port()}"
    rc = cli.main(["pretrain", "--set", f"data.path={data}", "--set",
                   f"storage.path=s3://{BUCKET}/runs", "--set", "storage.name=failing",
                   "--set", f"storage.endpoint_url={endpoint}"])
    assert rc == cli.EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert endpoint in line
    expected = {"missing_bucket": "'mmcl-no-such-bucket' does not exist",
                "wrong_secret": "refused the credentials",
                "unknown_key": "refused the credentials",
                "unreachable": "cannot reach the S3 endpoint"}[case]
    assert expected in line, line
    assert secret[6:] not in line and "AKIANOSUCHKEY" not in line


def test_writing_to_a_missing_bucket_does_not_create_it(aws, moto_s3, capsys):
    rc = cli.main(["data", "synth", "--preset", "rus", "--n", "64", "--out",
                   "s3://mmcl-not-there/sets/x", "--endpoint-url", aws["endpoint"]])
    assert rc == cli.EXIT_USER_ERROR
    assert "'mmcl-not-there' does not exist" in one_error_line(capsys)
    s3 = moto_s3.client("s3", aws_access_key_id=aws["id"], aws_secret_access_key=aws["secret"])
    assert "mmcl-not-there" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_eval_with_refused_credentials_names_the_run(aws, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x" * 40)
    rc = cli.main(["eval", "--run", f"{RUNS}/demo", "--endpoint-url", aws["endpoint"]])
    assert rc == cli.EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert f"{RUNS}/demo" in line and "refused the credentials" in line
    assert "x" * 40 not in line and aws["secret"] not in line


def test_live_metrics_and_tensorboard_events_reach_an_s3_run_folder(aws, tmp_path):
    from mmcl.train import tracking

    cfg = config.load(None, [f"storage.path={RUNS}", "storage.name=live",
                             f"storage.endpoint_url={aws['endpoint']}",
                             "tracking.every_n_steps=1"])
    run_url = storage.join(RUNS, "live")
    run_log = tracking.RunLog(cfg, run_url)
    history = []
    for epoch in (1, 2):
        run_log.step({"loss": 1.0 / epoch, "step": epoch, "lr": 1e-3})
        history.append({"epoch": epoch, "step": epoch, "loss": 1.0 / epoch})
        run_log.epoch(history[-1], history)
        epochs = [m["epoch"] for m in metrics(run_url, aws["endpoint"])]
        assert epochs == list(range(1, epoch + 1)), "metrics.jsonl is behind the run"
    run_log.close()
    fs, path = storage.filesystem(storage.join(run_url, "tensorboard"), aws["endpoint"])
    local = tmp_path / "tb"
    fs.get(path + "/", str(local), recursive=True)
    assert [s for s, _ in tracking.read_scalars(str(local))["train/loss"]] == [1, 2]


# ------------------------------------------------------------------------------ data import


def test_import_to_s3_and_overwrite_leave_no_temporary_copy(aws, moto_s3, tmp_path, capsys):
    """`mmcl data import` to s3:// (new, then --overwrite, then a failing --overwrite): each
    completes with only the data set in the bucket, or fails with one error line and the
    previous data set whole (issue 34: a temporary copy was left, `The specified key does
    not exist`)."""
    from import_files import image_text_table, write_spec

    table, spec = image_text_table(tmp_path / "src", n=16)
    spec_path = write_spec(tmp_path / "spec.yaml", spec)
    out = f"s3://{BUCKET}/sets/imported"
    prefix = "sets/imported"

    def imported() -> dict[str, bytes]:
        return {k: v for k, v in bucket_objects(moto_s3, aws).items()
                if k.startswith(prefix)}

    def import_(*extra) -> int:
        return cli.main(["data", "import", table, "--out", out, "--spec", spec_path,
                         "--endpoint-url", aws["endpoint"], *extra])

    for extra in ([], ["--overwrite"]):
        rc = import_(*extra)
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        objects = imported()
        assert all(k.startswith(prefix + "/") for k in objects), sorted(objects)  # no aside
        assert f"{prefix}/manifest.json" in objects
        manifest = json.loads(objects[f"{prefix}/manifest.json"])
        assert sum(manifest["splits"].values()) == 16
        for split in manifest["splits"]:
            assert any(k.startswith(f"{prefix}/{split}/part-") for k in objects)
    before = imported()

    os.remove(tmp_path / "src" / "img" / "5.png")
    assert import_("--overwrite") == cli.EXIT_USER_ERROR
    assert "5.png: no such file" in one_error_line(capsys)
    assert imported() == before
