"""Where data and runs live: any fsspec URL (local path, s3://...).

S3 endpoint, region and credentials come from the standard AWS environment variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION) or the optional
`storage:` config block for endpoint and region. Credentials are never stored or printed.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def s3_options(endpoint_url: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Options for s3fs from config, falling back to the AWS environment."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


def filesystem(url: str, endpoint_url: str | None = None,
               region: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL; local paths are made absolute."""
    url = str(url)
    if url.startswith("s3://") or url.startswith("s3a://"):
        return url_to_fs(url, **s3_options(endpoint_url, region))
    if not is_remote(url):
        url = os.path.abspath(os.path.expanduser(url))
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *[p.strip("/") for p in parts]])
