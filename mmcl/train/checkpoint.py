"""Checkpoints and exported models: plain files a user can read without Ray.

A checkpoint directory holds
    state.pt       engine state (weights, optimisers, schedulers, RNG, step, epoch history)
    config.yaml    the resolved run config
    manifest.json  the data set's manifest, restricted to the modalities the run used
    meta.json      step, epoch, format version
An exported model (the run's `model/` folder) holds weights.pt (the objective's state dict),
config.yaml and manifest.json. Everything loads with torch.load(weights_only=True): a file that
needs arbitrary unpickling is refused, never executed.

A model with Hugging Face backbones (encoder kind hf) exports each backbone as an ordinary
transformers folder, backbones/<modality>/{config.json, model.safetensors} (AutoModel.
from_pretrained reads it too); weights.pt then holds everything else, and config.yaml names
the backbones' configs inline (`hf_config`, `pretrained: false`), so that mmcl.load rebuilds
the model without the hub or the original model folder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from mmcl import config as config_mod
from mmcl.config import RunConfig
from mmcl.data.schema import Manifest
from mmcl.storage import filesystem, join

STATE, WEIGHTS, CONFIG, MANIFEST, META = ("state.pt", "weights.pt", "config.yaml",
                                          "manifest.json", "meta.json")
BACKBONES, BACKBONE_WEIGHTS, BACKBONE_CONFIG = "backbones", "model.safetensors", "config.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or model cannot be used; the message names the path and the reason."""


def _write_common(directory: str, cfg: RunConfig, manifest: Manifest) -> None:
    with open(os.path.join(directory, CONFIG), "w") as f:
        f.write(config_mod.dump(cfg))
    with open(os.path.join(directory, MANIFEST), "w") as f:
        f.write(manifest.to_json())


def write_checkpoint(directory: str, state: dict, cfg: RunConfig, manifest: Manifest) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to storage)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, STATE))
    _write_common(directory, cfg, manifest)
    with open(os.path.join(directory, META), "w") as f:
        json.dump({"format": FORMAT, "step": state["step"], "epoch": state["epoch"]}, f)


def safe_load(data: bytes | str, what: str) -> dict:
    """torch.load restricted to tensors and plain containers. A file whose pickle needs
    anything else (a class, a callable) is refused without running it; a truncated or
    corrupt file is one CheckpointError too."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError,
            IndexError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
            blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            raise CheckpointError(
                f"{what} cannot be loaded safely: it holds "
                + (f"a pickled {blocked.group(1)}" if blocked else "pickled Python objects")
                + ", not only tensors and plain containers. mmcl loads weights-only files "
                "(torch.load(weights_only=True)) and never unpickles arbitrary objects; "
                "only load files you trust, and re-save them as plain state dicts") from None
        raise CheckpointError(
            f"{what} is not a readable checkpoint file (truncated or corrupt: {first}). "
            f"Use an earlier checkpoint or rerun the run") from None
    except FileNotFoundError:
        raise CheckpointError(f"{what} does not exist") from None
    except OSError as err:  # torch reports a cut-off zip archive as EINVAL
        raise CheckpointError(
            f"{what} is not a readable checkpoint file (truncated or corrupt: {err}). "
            f"Use an earlier checkpoint or rerun the run") from None


def read_checkpoint_state(directory: str) -> dict:
    return safe_load(os.path.join(directory, STATE), os.path.join(directory, STATE))


@dataclass
class FoundCheckpoint:
    url: str
    epoch: int
    state: dict


def _complete(fs, folder: str, url: str) -> FoundCheckpoint | None:
    """The checkpoint in `folder` if all of its files are there and its state loads and
    agrees with its meta.json; None for one cut short (a driver or worker killed while it
    was uploaded)."""
    try:
        if not all(fs.exists(join(folder, n)) for n in (STATE, CONFIG, MANIFEST, META)):
            return None
        epoch = int(json.loads(fs.cat_file(join(folder, META)))["epoch"])
        state = safe_load(fs.cat_file(join(folder, STATE)), url)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        return None
    return FoundCheckpoint(url, epoch, state) if state.get("epoch") == epoch else None


def newest_complete_checkpoint(run_url: str | None, endpoint_url: str | None = None,
                               region: str | None = None) -> FoundCheckpoint | None:
    """The complete checkpoint of the latest epoch and step in a run folder, registered with
    Ray Train or not: a checkpoint whose upload finished counts even when the process that
    would have registered it was killed first, so at most the steps since the last
    checkpoint (an epoch, or train.checkpoint_every_steps) are lost."""
    if not run_url:
        return None
    fs, path = filesystem(run_url, endpoint_url, region)
    try:
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    progress = []  # (epoch, step, name): mid-epoch checkpoints share their epoch
    for name in names:
        if name.startswith("checkpoint_"):
            try:
                meta = json.loads(fs.cat_file(join(path, name, META)))
                progress.append((int(meta["epoch"]), int(meta.get("step", 0)), name))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    for *_, name in sorted(progress, reverse=True):
        found = _complete(fs, join(path, name), join(run_url, name))
        if found is not None:
            return found
    return None


def export_model(state: dict, cfg: RunConfig, manifest: Manifest, out_url: str,
                 endpoint_url: str | None = None, region: str | None = None) -> str:
    """Write the model folder (weights, config, manifest) to a local path or s3:// URL.

    Every file is first written under a temporary name; only when all are written are they
    renamed into place, weights.pt last: a model folder holding weights.pt is complete, and a
    write that fails (disk or bucket full, storage not writable) leaves an earlier model there
    untouched and raises one StorageError naming the path."""
    cfg, weights, backbones = split_backbones(state["objective"], cfg, manifest)
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    # weights.pt last: renamed into place last, it marks a complete folder.
    files = {CONFIG: config_mod.dump(cfg).encode(), MANIFEST: manifest.to_json().encode(),
             **backbones, WEIGHTS: buffer.getvalue()}
    fs, path = filesystem(out_url, endpoint_url, region)
    target, written = out_url, []
    try:
        fs.makedirs(path, exist_ok=True)
        for name, payload in files.items():
            target = join(out_url, name)
            tmp = join(path, _tmp_name(name))
            written.append(tmp)
            if "/" in name:
                fs.makedirs(join(path, os.path.dirname(name)), exist_ok=True)
            with fs.open(tmp, "wb") as f:
                f.write(payload)
        for name in files:
            target = join(out_url, name)
            fs.mv(join(path, _tmp_name(name)), join(path, name))
    except BaseException as err:
        for tmp in written:
            _remove_quietly(fs, tmp)
        if isinstance(err, OSError):
            raise unwritable(target, err) from None
        raise
    return out_url


def _tmp_name(name: str) -> str:
    folder, base = os.path.split(name)
    return os.path.join(folder, f".{base}.tmp") if folder else f".{base}.tmp"


def _hf_modalities(cfg: RunConfig, manifest: Manifest) -> list[str]:
    return [m for m in manifest.modality_names if cfg.model.encoder_for(m).kind == "hf"]


def _backbone_prefix(modality: str) -> str:
    return f"encoder.encoders.{modality}.backbone."


def split_backbones(weights: Mapping, cfg: RunConfig, manifest: Manifest
                    ) -> tuple[RunConfig, dict, dict[str, bytes]]:
    """(export config, weights without backbones, backbone files) for export; a model
    without hf encoders comes back unchanged with no backbone files."""
    modalities = _hf_modalities(cfg, manifest)
    if not modalities:
        return cfg, weights, {}
    from safetensors.torch import save as save_safetensors

    from mmcl.models.hf import pinned_config

    encoders, files, rest = dict(cfg.model.encoders), {}, dict(weights)
    for m in modalities:
        pinned = pinned_config(cfg.model.encoder_for(m))
        encoders[m] = pinned
        prefix = _backbone_prefix(m)
        # clone: safetensors refuses tensors sharing storage (tied embeddings)
        tensors = {k[len(prefix):]: rest.pop(k).detach().contiguous().clone()
                   for k in [k for k in rest if k.startswith(prefix)]}
        folder = f"{BACKBONES}/{m}"
        files[f"{folder}/{BACKBONE_CONFIG}"] = json.dumps(pinned.hf_config, indent=2).encode()
        files[f"{folder}/{BACKBONE_WEIGHTS}"] = save_safetensors(tensors,
                                                                 metadata={"format": "pt"})
    model = cfg.model.model_copy(update={"encoders": encoders})
    return cfg.model_copy(update={"model": model}), rest, files


def join_backbones(weights: dict, cfg: RunConfig, manifest: Manifest, fs, folder: str) -> dict:
    """The full state dict of an exported model: weights.pt plus its backbone files."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    full = dict(weights)
    for m in _hf_modalities(cfg, manifest):
        url = join(folder, BACKBONES, m, BACKBONE_WEIGHTS)
        if not fs.exists(url):
            continue  # a checkpoint's state, or an older export: weights.pt holds it all
        try:
            tensors = load_safetensors(fs.cat_file(url))
        except (SafetensorError, ValueError, OSError) as err:
            raise CheckpointError(f"{url} is not a readable safetensors file ({err}); "
                                  f"export the run again") from None
        full.update({_backbone_prefix(m) + k: v for k, v in tensors.items()})
    return full


def _fresh_backbones(cfg: RunConfig, manifest: Manifest) -> RunConfig:
    """The config to rebuild a model whose weights come from a file: hf backbones built
    fresh from their config, not read with from_pretrained (their weights are replaced)."""
    modalities = _hf_modalities(cfg, manifest)
    if not modalities:
        return cfg
    encoders = dict(cfg.model.encoders)
    for m in modalities:
        encoders[m] = cfg.model.encoder_for(m).model_copy(update={"pretrained": False})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"encoders": encoders})})


def _remove_quietly(fs, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception:  # noqa: BLE001 - best effort; the original error matters
        pass


def unwritable(url: str, err: OSError) -> Exception:
    """The StorageError for a failed write to `url`; its message never holds credentials."""
    import errno

    from mmcl.storage import StorageError

    reason = {errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted",
              errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(
                  err.errno, err.strerror or type(err).__name__)
    if err.errno is None and "no space left on device" in str(err).lower():
        reason = "no space left on the device"   # pyarrow's errors carry only the text
    return StorageError(f"cannot write {url}: {reason}. Free space or fix the permissions "
                        f"there, or choose another storage.path; the run's earlier files "
                        f"and checkpoints are left as they were")


def check_storage_writable(url: str, endpoint_url: str | None = None,
                           region: str | None = None) -> None:
    """Refuse, before any work starts, storage that cannot be written: on S3 a missing
    bucket, refused credentials or an unreachable endpoint (mmcl.storage checks a bucket on
    first use); locally a read-only folder or file system, or a path through a file (the
    folder is created and a probe file written and deleted)."""
    from mmcl.storage import is_remote

    fs, path = filesystem(url, endpoint_url, region)
    if is_remote(url):
        return
    probe = join(path, f".mmcl-write-test-{os.getpid()}")
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as err:
        raise unwritable(url, err) from None


def check_weights_fit(expected: Mapping, weights: Mapping, weights_url: str,
                      config_url: str) -> None:
    """Refuse weights that do not fit the model a config describes (a checkpoint of another
    config, or a config edited after training), naming the first differences."""
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{weights_url} does not hold a state dict (found "
                              f"{type(weights).__name__})")
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    resized = [f"{k}: {list(weights[k].shape)} in the file, {list(v.shape)} in the model"
               for k, v in expected.items() if k in weights
               and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or resized):
        return
    parts = []
    if resized:
        parts.append(f"{len(resized)} tensor(s) differ in shape (e.g. {resized[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    raise CheckpointError(
        f"{weights_url} does not fit the model that {config_url} describes: "
        + "; ".join(parts) + ". The weights come from a run with another config (objective, "
        "model sizes or modalities); use that run's own folder and config")


@dataclass
class TrainedModel:
    """A trained objective loaded without Ray: embeds tuples."""

    objective: "torch.nn.Module"
    config: RunConfig
    manifest: Manifest

    def _tensors(self, batch: Mapping) -> dict[str, torch.Tensor]:
        from mmcl.data.prepare import Preparer

        device = next(self.objective.parameters()).device
        # A modality and its `<m>__len` / `<m>__present` columns, prepared as in training.
        tensors = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in batch.items()
                   if k.split("__")[0] in self.manifest.modality_names}
        return Preparer.for_run(self.manifest, self.config.data)(tensors)

    def embed(self, batch: Mapping) -> torch.Tensor:
        """The representation handed downstream, for a batch of tuples (name -> array)."""
        return self.objective.embed(self._tensors(batch))

    def modality_embeddings(self, batch: Mapping) -> dict[str, torch.Tensor]:
        return self.objective.modality_embeddings(self._tensors(batch))

    def shared_embeddings(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Each modality in the objective's cross-modal space (retrieval), from a prepared
        batch as in training: stored uint8 images and `<m>__len` columns are not inputs."""
        return self.objective.shared_embeddings(self._tensors(batch))


def encoder_kinds(cfg: RunConfig) -> list[str]:
    """Every encoder kind a config names (the default encoder and the per-modality ones)."""
    return [cfg.model.encoder.kind, *(e.kind for e in cfg.model.encoders.values())]


def read_config(fs, folder: str, shown: str | None = None,
                trust_plugins: bool = False) -> RunConfig:
    """The config.yaml recorded in a run, model or checkpoint folder (`shown`: the folder as
    messages name it). Everything wrong with it is one CheckpointError or ConfigError naming
    the file: not UTF-8, not YAML, a YAML tag (`!!python/object...`: mmcl's loader is safe and
    never constructs objects), not a mapping, an invalid field. A plug-in encoder kind
    ("module:Name") is refused unless `trust_plugins` (see mmcl.models.registry)."""
    import yaml

    from mmcl.models.registry import refuse_plugins

    url = join(shown or folder, CONFIG)
    try:
        text = fs.cat_file(join(folder, CONFIG)).decode("utf-8")
        raw = config_mod.parse_yaml(text, url)
    except UnicodeDecodeError:
        raise CheckpointError(f"{url} is not UTF-8 text; it is not a config mmcl "
                              f"wrote. Use the run's own folder or rerun it") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0][:200]
        raise CheckpointError(
            f"{url} is not a readable run config{where}: {problem}. A recorded config is "
            f"plain YAML as mmcl wrote it (no tags such as !!python/...); use the run's own "
            f"folder or rerun it") from None
    except OSError as err:
        raise CheckpointError(f"{url} cannot be read ({err.strerror or err})") from None
    if raw is not None and not isinstance(raw, dict):
        raise CheckpointError(f"{url} holds a YAML {type(raw).__name__}, not a run config "
                              f"(a mapping of sections); use the run's own folder or rerun it")
    cfg = config_mod.from_dict(raw, source=url)
    if not trust_plugins:
        refuse_plugins(encoder_kinds(cfg), url)
    return cfg


def load(path: str, endpoint_url: str | None = None, region: str | None = None,
         trust_plugins: bool = False) -> TrainedModel:
    """Open a trained model from a run folder, its model/ folder, or a checkpoint folder.
    `trust_plugins`: import a plug-in encoder kind ("module:Name") the recorded config names
    (refused by default: the folder may have been edited by someone else)."""
    from mmcl.objectives import build_objective  # objectives are heavy; load them on use

    fs, root = filesystem(path, endpoint_url, region)
    candidates = [root, join(root, "model")]
    for folder in candidates:
        for weights_name in (WEIGHTS, STATE):
            if fs.exists(join(folder, weights_name)) and fs.exists(join(folder, CONFIG)):
                cfg = read_config(fs, folder, trust_plugins=trust_plugins)
                manifest = Manifest.from_json(fs.cat_file(join(folder, MANIFEST)).decode(),
                                              join(folder, MANIFEST))
                state = safe_load(fs.cat_file(join(folder, weights_name)),
                                  join(folder, weights_name))
                weights = state["objective"] if weights_name == STATE else state
                if isinstance(weights, Mapping):
                    weights = join_backbones(weights, cfg, manifest, fs, folder)
                objective = build_objective(_fresh_backbones(cfg, manifest), manifest)
                check_weights_fit(objective.state_dict(), weights, join(folder, weights_name),
                                  join(folder, CONFIG))
                objective.load_state_dict(weights)
                return TrainedModel(objective.eval(), cfg, manifest)
    raise CheckpointError(
        f"no trained model at {path}: expected {WEIGHTS} or {STATE} with {CONFIG} there or "
        f"in its model/ folder. Pass a run folder written by `mmcl pretrain`")
