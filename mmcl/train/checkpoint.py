"""Checkpoints and exported models: plain files a user can read without Ray.

A checkpoint directory holds
    state.pt       engine state (weights, optimisers, schedulers, RNG, step, epoch history)
    config.yaml    the resolved run config
    manifest.json  the data set's manifest, restricted to the modalities the run used
    meta.json      step, epoch, format version
An exported model (the run's `model/` folder) holds weights.pt (the objective's state dict),
config.yaml and manifest.json. Everything loads with torch.load(weights_only=True): a file that
needs arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
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
    """torch.load restricted to tensors and plain containers."""
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{what} cannot be loaded safely: {first}. mmcl only loads weights-only files "
            f"(tensors and plain containers); it never unpickles arbitrary objects") from None


def read_checkpoint_state(directory: str) -> dict:
    return safe_load(os.path.join(directory, STATE), os.path.join(directory, STATE))


def export_model(state: dict, cfg: RunConfig, manifest: Manifest, out_url: str,
                 endpoint_url: str | None = None, region: str | None = None) -> str:
    """Write the model folder (weights, config, manifest) to a local path or s3:// URL."""
    fs, path = filesystem(out_url, endpoint_url, region)
    fs.makedirs(path, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state["objective"], buffer)
    files = {WEIGHTS: buffer.getvalue(), CONFIG: config_mod.dump(cfg).encode(),
             MANIFEST: manifest.to_json().encode()}
    for name, payload in files.items():
        # Write then rename, so a reader never sees a half-written weights file.
        tmp = join(path, f".{name}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(payload)
        fs.mv(tmp, join(path, name))
    return out_url


@dataclass
class TrainedModel:
    """A trained objective loaded without Ray: embeds tuples."""

    objective: "torch.nn.Module"
    config: RunConfig
    manifest: Manifest

    def _tensors(self, batch: Mapping) -> dict[str, torch.Tensor]:
        device = next(self.objective.parameters()).device
        return {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in batch.items()
                if k in self.manifest.modality_names}

    def embed(self, batch: Mapping) -> torch.Tensor:
        """The representation handed downstream, for a batch of tuples (name -> array)."""
        return self.objective.embed(self._tensors(batch))

    def modality_embeddings(self, batch: Mapping) -> dict[str, torch.Tensor]:
        return self.objective.modality_embeddings(self._tensors(batch))


def load(path: str, endpoint_url: str | None = None, region: str | None = None) -> TrainedModel:
    """Open a trained model from a run folder, its model/ folder, or a checkpoint folder."""
    from mmcl.objectives import build_objective  # objectives are heavy; load them on use

    fs, root = filesystem(path, endpoint_url, region)
    candidates = [root, join(root, "model")]
    for folder in candidates:
        for weights_name in (WEIGHTS, STATE):
            if fs.exists(join(folder, weights_name)) and fs.exists(join(folder, CONFIG)):
                cfg = config_mod.from_dict(
                    config_mod.yaml.safe_load(fs.cat_file(join(folder, CONFIG)).decode()),
                    source=join(folder, CONFIG))
                manifest = Manifest.from_json(fs.cat_file(join(folder, MANIFEST)).decode(),
                                              join(folder, MANIFEST))
                state = safe_load(fs.cat_file(join(folder, weights_name)),
                                  join(folder, weights_name))
                weights = state["objective"] if weights_name == STATE else state
                objective = build_objective(cfg, manifest)
                try:
                    objective.load_state_dict(weights)
                except RuntimeError as err:
                    raise CheckpointError(
                        f"{folder}: the weights do not fit the model its config describes "
                        f"({str(err).splitlines()[0]})") from None
                return TrainedModel(objective.eval(), cfg, manifest)
    raise CheckpointError(
        f"no trained model at {path}: expected {WEIGHTS} or {STATE} with {CONFIG} there or "
        f"in its model/ folder. Pass a run folder written by `mmcl pretrain`")
