"""Where data and runs live: any fsspec URL (local path, s3://...).

S3 endpoint and region come from the optional `storage:` config block (or the `--endpoint-url`
/ `--region` flags), else from the standard AWS environment variables (AWS_ENDPOINT_URL_S3,
AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION). Credentials come from AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, else from botocore's usual chain (profile files,
an instance or pod role). They are never stored in configs, printed, or put in error messages.

Ray workers. The s3 filesystems made here pickle *without* their credentials. When one is
pickled on a Ray driver (a Ray Data read task, Ray Train's `storage_filesystem`, a Tune
experiment), the driver's credentials from the environment are put into the cluster's memory
(Ray's GCS key-value store, under this job's id) and the copy rebuilt in a worker takes them
from there; a worker of the same job that opens a path itself (`filesystem(...)`) finds them
the same way. Nothing is written to disk: not Ray's runtime_env (Ray logs its env_vars to
runtime_env_agent.log), not a pickled object that Ray or Tune saves (Tune writes its
RunConfig's storage_filesystem into tuner.pkl). Credentials that come from a profile or an
instance role are not shared: every node resolves its own.

First contact with a bucket is checked once per process (one LIST of at most one key), so that
a missing bucket, refused credentials or an unreachable endpoint end in one `StorageError`
naming the path and the endpoint, instead of a silently created bucket or a stack of retries
deep inside Ray.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from mmcl.data.schema import DataError

_CREDENTIAL_OPTIONS = ("key", "secret", "token")
_KV_NAMESPACE = "mmcl"


class StorageError(DataError):
    """S3 cannot be used as configured: the message names the path and the endpoint and says
    what to check. It never holds credentials."""


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def is_s3(url: str) -> bool:
    return str(url).startswith(("s3://", "s3a://"))


def endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the argument (config or flag), else $AWS_ENDPOINT_URL_S3 or
    $AWS_ENDPOINT_URL, else None (AWS itself)."""
    return (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def region_name(region: str | None = None) -> str | None:
    return region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_options(endpoint_url: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Options for s3fs from config, falling back to the AWS environment. Endpoint and region
    are resolved here, on the caller's machine, so that filesystems shipped to Ray workers
    carry them explicitly. No credentials in here."""
    client_kwargs: dict[str, Any] = {}
    if endpoint(endpoint_url):
        client_kwargs["endpoint_url"] = endpoint(endpoint_url)
    if region_name(region):
        client_kwargs["region_name"] = region_name(region)
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


def shown_endpoint(endpoint_url: str | None) -> str:
    """An endpoint as messages show it: user:password@ parts removed."""
    if not endpoint_url:
        return "AWS S3"
    return re.sub(r"//[^/@]*@", "//", str(endpoint_url))


# ---------------------------------------------------------------------------- credentials


def env_credentials() -> dict[str, str] | None:
    """Static credentials from the AWS environment variables, as s3fs options, or None."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return None
    creds = {"key": key, "secret": secret}
    if os.environ.get("AWS_SESSION_TOKEN"):
        creds["token"] = os.environ["AWS_SESSION_TOKEN"]
    return creds


def _ray_mode() -> str | None:
    """'driver' or 'worker' when this process is connected to Ray, else None. Never imports
    Ray: a process that has not imported it is not connected to it."""
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return None
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        return "worker" if global_worker.mode == WORKER_MODE else "driver"
    except Exception:  # noqa: BLE001 - Ray Client or an unknown Ray: treat as no Ray
        return None


def _kv_key() -> bytes:
    import ray

    return f"s3-credentials/{ray.get_runtime_context().get_job_id()}".encode()


_shared: dict[tuple[str, bytes], bytes] = {}   # (cluster, key) -> what this driver put there


def share_credentials(creds: dict[str, str] | None = None) -> bool:
    """On a Ray driver: make `creds` (default: the environment's) available to this job's
    workers through Ray's in-memory key-value store. True if shared."""
    creds = creds if creds is not None else env_credentials()
    if not creds or _ray_mode() != "driver":
        return False
    try:
        import ray
        from ray.experimental import internal_kv

        key, value = _kv_key(), json.dumps(creds).encode()
        # Job ids restart with every new cluster (ray.shutdown + ray.init): remember the
        # cluster too.
        where = (str(ray.get_runtime_context().gcs_address), key)
        if _shared.get(where) != value:
            internal_kv._internal_kv_put(key, value, overwrite=True, namespace=_KV_NAMESPACE)
            _shared[where] = value
    except Exception:  # noqa: BLE001 - e.g. Ray Client: the workers resolve their own
        return False
    return True


def _worker_credentials() -> dict[str, str] | None:
    """In a Ray worker: the credentials this job's driver shared, or None."""
    if _ray_mode() != "worker":
        return None
    try:
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(_kv_key(), namespace=_KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - no key-value store reachable: use the worker's own
        return None
    return json.loads(value) if value else None


def credentials() -> dict[str, str] | None:
    """Credentials for an s3 filesystem made in this process: in a Ray worker those its
    driver shared, else the environment's; None lets botocore find its own."""
    return _worker_credentials() or env_credentials()


_S3_CLASS = None


def _s3_class():
    """s3fs.S3FileSystem whose pickles hold no credentials (made on first use: s3fs imports
    are slow)."""
    global _S3_CLASS
    if _S3_CLASS is None:
        import s3fs

        class S3FileSystem(s3fs.S3FileSystem):
            def __reduce__(self):
                options = {k: v for k, v in self.storage_options.items()
                           if k not in _CREDENTIAL_OPTIONS}
                given = {k: self.storage_options[k] for k in _CREDENTIAL_OPTIONS
                         if self.storage_options.get(k)}
                if given:
                    share_credentials(given)
                return _rebuild_s3, (options,)

        _S3_CLASS = S3FileSystem
    return _S3_CLASS


def _rebuild_s3(options: dict) -> fsspec.AbstractFileSystem:
    return _s3_class()(**options, **(credentials() or {}))


# ---------------------------------------------------------------------------- filesystems


def filesystem(url: str, endpoint_url: str | None = None,
               region: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL; local paths are made absolute. The first use
    of an s3 bucket in this process is checked (see `check_bucket`)."""
    url = str(url)
    if is_s3(url):
        fs = _s3_class()(**s3_options(endpoint_url, region), **(credentials() or {}))
        path = fs._strip_protocol(url)
        check_bucket(fs, url, path)
        return fs, path
    if not is_remote(url):
        url = os.path.abspath(os.path.expanduser(url))
    return url_to_fs(url)


def pyarrow_filesystem(url: str, endpoint_url: str | None = None, region: str | None = None):
    """(path, pyarrow filesystem) for Ray's readers and writers and Ray Train's
    `storage_filesystem`; (local absolute path, None) for local paths."""
    if not is_remote(url):
        return os.path.abspath(os.path.expanduser(str(url))), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url, endpoint_url, region)
    return path, PyFileSystem(FSSpecHandler(fs))


def check_bucket(fs, url: str, path: str) -> None:
    """One LIST (at most one key) under `path`, once per filesystem and bucket: a missing
    bucket, refused credentials or an unreachable endpoint become one StorageError."""
    bucket, _, prefix = path.partition("/")
    checked = fs.__dict__.setdefault("_mmcl_checked", set())
    if bucket in checked:
        return
    where = shown_endpoint((fs.client_kwargs or {}).get("endpoint_url") or fs.endpoint_url)
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as err:  # noqa: BLE001 - sorted into a user's error below, else re-raised
        raise storage_error(err, url, where) from None
    checked.add(bucket)


def storage_error(err: BaseException, url: str, where: str) -> BaseException:
    """The StorageError a user can act on behind an S3 failure (or `err` itself if it is not
    one). Messages name the URL and endpoint; they never quote credentials."""
    import botocore.exceptions as bce

    bucket = str(url).split("://", 1)[-1].split("/", 1)[0]
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, FileNotFoundError):
        return StorageError(
            f"{url}: bucket {bucket!r} does not exist at {where}. Create it first (e.g. "
            f"`aws s3 mb s3://{bucket}`), or fix the path or storage.endpoint_url / "
            f"AWS_ENDPOINT_URL")
    if isinstance(err, bce.NoCredentialsError):
        return StorageError(
            f"{url}: no AWS credentials were found for {where}. Set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or use a profile or an instance/pod role)")
    if isinstance(err, PermissionError):
        return StorageError(
            f"{url}: {where} refused the credentials ({first}). Check AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or the profile/role in use) and that they may list and "
            f"write bucket {bucket!r}")
    if isinstance(err, (bce.EndpointConnectionError, bce.ConnectionError,
                        bce.ConnectTimeoutError, ConnectionError, TimeoutError)):
        return StorageError(
            f"{url}: cannot reach the S3 endpoint {where}. Check storage.endpoint_url / "
            f"--endpoint-url / AWS_ENDPOINT_URL and that the service is up and reachable "
            f"from this machine")
    if isinstance(err, (bce.ClientError, bce.BotoCoreError, OSError)):
        return StorageError(f"{url}: S3 request to {where} failed ({first})")
    return err


def write_text(url: str, text: str, endpoint_url: str | None = None,
               region: str | None = None) -> str:
    """Write `text` to a file at `url` (its folder created); returns `url`."""
    fs, path = filesystem(url, endpoint_url, region)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)
    return url


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *[p.strip("/") for p in parts]])


def check_inside(url: str, root: str) -> None:
    """Refuse to write `url` (a file or folder, there yet or not) inside the folder `root` when
    a symbolic link lies on its way from `root` or anywhere below it: a link in a run folder
    (a planted `RUN/eval -> /elsewhere`, `RUN/eval/report.md -> ~/.bashrc`) must never carry
    mmcl's outputs out of the run, nor onto another of its files. One StorageError naming
    the link. Object stores have no links: s3:// URLs pass. (Checked when the command
    starts: a link planted while it runs is not seen.)"""
    if is_remote(url) or is_remote(root):
        return
    base = os.path.abspath(os.path.expanduser(str(root)))
    target = os.path.abspath(os.path.expanduser(str(url)))
    relative = os.path.relpath(target, base)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise StorageError(f"cannot write {url}: it is not inside {root}")
    links = []
    step = base
    for part in ([] if relative == os.curdir else relative.split(os.sep)):
        step = os.path.join(step, part)
        if os.path.islink(step):
            links.append(step)
            break
        if not os.path.exists(step):
            break
    if not links and os.path.isdir(target) and not os.path.islink(target):
        for folder, dirs, files in os.walk(target):   # links are not followed
            found = [os.path.join(folder, n) for n in sorted(dirs + files)
                     if os.path.islink(os.path.join(folder, n))]
            if found:
                links.append(found[0])
                break
    if links:
        link = links[0]
        try:
            points = os.readlink(link)
        except OSError:
            points = "?"
        raise StorageError(
            f"cannot write {url}: {link} is a symbolic link (to {points}); mmcl writes a "
            f"run's outputs only into real folders inside the run {root}, never through a "
            f"link. Remove the link, or copy the run (cp -rL) and use the copy")
