"""Signed search state: mmcl never lets Ray (or itself) unpickle a search folder it did not sign.

Resuming a sweep or a sample optimization restores Ray Tune's state from the storage, and Tune
restores by unpickling: `tuner.pkl`, the searcher/scheduler/callback states (`*.pkl`, and
`basic-variant-state-*.json`, which is a cloudpickle despite its name), `experiment_state-*.json`
(each trial's fields embedded as cloudpickled hex), and each trial's `error.pkl` (read when the
results are listed). Anyone who can write the folder (a shared bucket) could plant a pickle
that runs code on the next rerun. So the driver signs what it wrote, and every restore checks
the signatures first:

- The key is a secret kept outside the storage: `$MMCL_TRUST_KEY` when set, else a per-user
  key file (`$XDG_CONFIG_HOME/mmcl/trust.key`, default `~/.config/mmcl/trust.key`), created
  with mode 0600 on first use.
- Signed files of a Tune experiment folder: every `*.json` and `*.pkl` at its top (what Tune
  copies and reads on restore) and every `*.pkl` / `*.pickle` below it. Sample optimization's
  own `sample_opt_state.json` is signed on its own.
- The signatures (HMAC-SHA256 of each file's bytes, and one over the whole list) are in the
  folder's `.mmcl-signatures`. They are renewed while the search runs (`SignatureKeeper`, a Tune
  callback, on every controller step when something changed) and whenever mmcl regains control
  (after `Tuner.fit`, after writing its state), so a search whose driver was killed can be
  resumed.
- Before a restore: a signed file that is missing is fine (it cannot run code); an unsigned
  (extra) file, a file whose bytes changed, or signatures made with another key refuse the
  restore with one message: start fresh with a new name, or re-sign deliberately with
  `mmcl tune ... --trust-state` when the folder is trusted.

The trust boundary: the key holder's own processes writing the folder while they run are
trusted (their files are signed as they appear); everything found in the folder afterwards is
trusted only if it verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from mmcl.config import ConfigError
from mmcl.storage import filesystem, join

SIGNATURES = ".mmcl-signatures"
KEY_ENV = "MMCL_TRUST_KEY"
FORMAT = 1
TRUST_OPTION = "--trust-state"


class UntrustedState(ConfigError):
    """A search folder holds state mmcl did not sign; restoring it would run its pickles."""


# ------------------------------------------------------------------------------- the key


def key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mmcl" / "trust.key"


def trust_key() -> bytes:
    """The signing key: $MMCL_TRUST_KEY, else the per-user key file (created on first use,
    readable by its owner only)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return env.encode()
    path = key_file()
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another mmcl created it first
        return _read_key(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_text().strip()
    if not key:
        raise ConfigError(f"the trust key file {path} is empty; delete it (a new key is made) "
                          f"or set ${KEY_ENV}")
    return key.encode()


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Names a key without revealing it: which key signed a folder."""
    return _mac(key, b"mmcl key id")[:16]


# ---------------------------------------------------------------------------- the folder


def experiment_files(rel: str) -> bool:
    """Whether `rel` (a path inside a Tune experiment folder) may be unpickled by Tune."""
    top = "/" not in rel
    return rel.endswith((".pkl", ".pickle")) or (top and rel.endswith(".json"))


@dataclass
class Folder:
    """A folder whose pickle-bearing files are signed. `only` limits it to the named top-level
    files (sample optimization's own state); by default it is a Tune experiment folder."""

    url: str
    endpoint_url: str | None = None
    region: str | None = None
    only: tuple[str, ...] = ()
    what: str = "search"

    def _fs(self):
        return filesystem(self.url, self.endpoint_url, self.region)

    def signed_files(self) -> dict[str, dict]:
        """{relative path: fsspec info} of the files that must be signed."""
        fs, root = self._fs()
        root = root.rstrip("/")
        if self.only:
            found = {}
            for name in self.only:
                path = f"{root}/{name}"
                if fs.exists(path):
                    found[name] = fs.info(path)
            return found
        try:
            infos = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in infos.items():
            rel = path[len(root):].lstrip("/")
            if info.get("type") == "file" and rel != SIGNATURES and experiment_files(rel):
                out[rel] = info
        return out

    def _read(self, rel: str) -> bytes:
        fs, root = self._fs()
        return fs.cat_file(f"{root.rstrip('/')}/{rel}")

    def read_signatures(self) -> dict | None:
        fs, root = self._fs()
        path = f"{root.rstrip('/')}/{SIGNATURES}"
        if not fs.exists(path):
            return None
        try:
            return json.loads(fs.cat_file(path))
        except ValueError:
            return {}

    def write_signatures(self, macs: dict[str, str], key: bytes) -> None:
        body = {"format": FORMAT, "key": key_id(key), "files": dict(sorted(macs.items()))}
        body["mac"] = _mac(key, _canonical(body))
        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)
        path = f"{root.rstrip('/')}/{SIGNATURES}"
        tmp = path + ".tmp"
        with fs.open(tmp, "w") as f:
            json.dump(body, f, indent=1)
        fs.mv(tmp, path)


def _canonical(body: dict) -> bytes:
    return json.dumps({k: v for k, v in body.items() if k != "mac"}, sort_keys=True).encode()


def sign(folder: Folder, cache: dict | None = None) -> int:
    """Sign every pickle-bearing file of `folder` as it is now; returns how many. `cache`
    ({path: (size, mtime, mac)}) skips re-hashing unchanged files."""
    key = trust_key()
    macs = {}
    for rel, info in folder.signed_files().items():
        stamp = (info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""))
        if cache is not None and rel in cache and cache[rel][:2] == stamp:
            macs[rel] = cache[rel][2]
            continue
        macs[rel] = _mac(key, folder._read(rel))
        if cache is not None:
            cache[rel] = (*stamp, macs[rel])
    folder.write_signatures(macs, key)
    return len(macs)


def problems(folder: Folder) -> list[str]:
    """What keeps `folder` from being trusted (empty: it verifies, or holds nothing to sign)."""
    files = folder.signed_files()
    body = folder.read_signatures()
    if body is None:
        return [f"{len(files)} unsigned file(s) ({_few(files)})"] if files else []
    key = trust_key()
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict) or \
            not hmac.compare_digest(str(body.get("mac", "")), _mac(key, _canonical(body))):
        if isinstance(body, dict) and body.get("key") not in (None, key_id(key)):
            return ["its signatures were made with another key (another user or machine)"]
        return [f"its signature file {SIGNATURES} is damaged or was edited"]
    signed = body["files"]
    extra = sorted(set(files) - set(signed))
    changed = sorted(rel for rel in files if rel in signed and
                     not hmac.compare_digest(signed[rel], _mac(key, folder._read(rel))))
    out = []
    if extra:
        out.append(f"unsigned file(s) {_few(extra)}")
    if changed:
        out.append(f"file(s) changed since mmcl signed them: {_few(changed)}")
    return out


def _few(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def verify(folder: Folder) -> None:
    """Raise UntrustedState unless `folder` verifies (or holds nothing pickle-bearing)."""
    found = problems(folder)
    if found:
        raise UntrustedState(
            f"the {folder.what} folder {folder.url} is not trusted: {'; '.join(found)}. "
            f"Resuming would unpickle its state (run code from it), so nothing was loaded. "
            f"Start fresh under a new name (--set storage.name=NEW), or, if you trust this "
            f"folder, re-sign it deliberately: rerun with `mmcl tune ... {TRUST_OPTION}`")


def resign_search(url: str, endpoint_url: str | None, region: str | None,
                  state_name: str) -> list[str]:
    """Sign a search folder as it is now, on the user's explicit word (`--trust-state`): the
    folder itself and each Tune experiment folder directly inside it (sample optimization's
    rounds), and sample optimization's state file. Returns the folders signed."""
    done = []
    fs, root = filesystem(url, endpoint_url, region)
    if not fs.exists(root):
        return done
    candidates = [url] + [join(url, os.path.basename(p.rstrip("/")))
                          for p in fs.ls(root, detail=False) if fs.isdir(p)]
    for candidate in candidates:
        cfs, croot = filesystem(candidate, endpoint_url, region)
        if cfs.exists(f"{croot.rstrip('/')}/tuner.pkl"):
            sign(Folder(candidate, endpoint_url, region))
            done.append(candidate)
    if fs.exists(f"{root.rstrip('/')}/{state_name}"):
        sign(Folder(url, endpoint_url, region, only=(state_name,), what="sample-optimization"))
        done.append(join(url, state_name))
    return done


# ------------------------------------------------------------------------ while it runs


def _keeper_class():
    from ray import tune

    class SignatureKeeper(tune.Callback):
        """Renews a Tune experiment folder's signatures while the search runs (every
        controller step, at most every `every_s` seconds, hashing only changed files), so a
        killed driver leaves a folder that verifies. Pickled into tuner.pkl with the
        RunConfig: it holds the folder's address only, never the key."""

        def __init__(self, folder: Folder, every_s: float = 1.0):
            self.folder, self.every_s = folder, every_s
            self._cache: dict = {}
            self._last = 0.0

        def __getstate__(self):
            return {"folder": self.folder, "every_s": self.every_s}

        def __setstate__(self, state):
            self.__init__(state["folder"], state["every_s"])

        def _renew(self, force: bool = False) -> None:
            if force or time.monotonic() - self._last >= self.every_s:
                self._last = time.monotonic()
                sign(self.folder, self._cache)

        def on_step_begin(self, iteration, trials, **info):
            self._renew()

        def on_step_end(self, iteration, trials, **info):
            self._renew()

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            self._renew(force=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._renew(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._renew(force=True)

        def on_experiment_end(self, trials, **info):
            self._renew(force=True)

    return SignatureKeeper


def signature_keeper(folder: Folder):
    """The Tune callback that keeps `folder` signed; on object storage it lists the folder at
    most every 10 s (each renewal is one listing), on a local disk every second."""
    from mmcl.storage import is_remote

    return _keeper_class()(folder, every_s=10.0 if is_remote(folder.url) else 1.0)
