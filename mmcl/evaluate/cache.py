"""A cache of the raw-feature probes: they are the same for every run of a data set.

`mmcl eval` probes each modality's raw features (and all of them together) beside the run's
embeddings as the reference of what is linearly there at all. Those probes depend on the data
and the probe settings only, never on the run, so sibling runs of one data set (seeds,
objectives, a Tune sweep) would refit identical probes. The cache keeps each representation's
results under a content key:

    key = blake2b(cache format, probe settings, for every split: the feature matrix's dtype,
                  shape and bytes, the row ids, and every probed column's spec and values)

so anything that changes the result (other rows, a changed data set, another max_rows sample,
other settings or label columns, a new cache format when the probe code changes its figures)
gives another key; nothing is trusted by name or date. Entries are JSON files (never pickle:
a cache file is data, not code) under a folder the caller names, which `mmcl eval` puts in the
user's own storage, beside the runs: STORAGE_PATH/_probe_cache/<key>.json. A file that does
not parse, or whose stored key differs from its name, is ignored (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping, Sequence

import numpy as np

from mmcl import storage

CACHE_FORMAT = 1     # bump when the probes' figures change for the same inputs
CACHE_DIR = "_probe_cache"


def _update_array(h, values: np.ndarray) -> None:
    values = np.ascontiguousarray(values)
    h.update(f"{values.dtype.str}{values.shape}".encode())
    h.update(values.tobytes())


def probe_key(features: Mapping[str, np.ndarray], ids: Mapping[str, np.ndarray],
              targets: Mapping[str, Mapping[str, np.ndarray]], specs: Sequence,
              settings: Mapping) -> str:
    """The content key of one representation's probes. `features`/`ids`: split -> (N, D) /
    (N,); `targets`: column -> split -> values; `specs`: the LabelSpecs probed; `settings`:
    the probe settings that change results (JSON-able)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"format": CACHE_FORMAT, "settings": settings,
                         "specs": [repr(s) for s in specs]}, sort_keys=True,
                        default=str).encode())
    for split in sorted(features):
        h.update(split.encode())
        _update_array(h, np.asarray(features[split]))
        _update_array(h, np.asarray(ids[split]))
        for column in sorted(targets):
            h.update(column.encode())
            _update_array(h, np.asarray(targets[column][split]))
    return h.hexdigest()


def _finite(value):
    """JSON-safe: NaN/inf as null (read back as NaN)."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _restore(value):
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return float("nan") if value is None else value


class ProbeCache:
    """JSON files of probe results by content key, in `folder` (local or s3://)."""

    def __init__(self, folder: str, endpoint_url: str | None = None,
                 region: str | None = None):
        self.folder = folder
        self.remote = {"endpoint_url": endpoint_url, "region": region}
        self.hits = 0
        self.misses = 0

    def _url(self, key: str) -> str:
        return storage.join(self.folder, f"{key}.json")

    def get(self, key: str) -> dict | None:
        fs, path = storage.filesystem(self._url(key), **self.remote)
        try:
            if not fs.exists(path):
                self.misses += 1
                return None
            entry = json.loads(fs.cat_file(path).decode())
        except (OSError, ValueError, UnicodeDecodeError):
            self.misses += 1
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or \
                entry.get("format") != CACHE_FORMAT or not isinstance(entry.get("result"), dict):
            self.misses += 1
            return None
        self.hits += 1
        return _restore(entry["result"])

    def put(self, key: str, result: dict) -> None:
        text = json.dumps({"format": CACHE_FORMAT, "key": key, "result": _finite(result)})
        try:
            storage.write_text(self._url(key), text, **self.remote)
        except OSError:
            pass   # a cache that cannot be written only costs the next eval its time
