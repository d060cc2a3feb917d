"""Run configuration: one validated object drives a whole run.

A run is described by YAML, validated here by pydantic before anything starts. Every field has
a default that works on a laptop, unknown fields are refused, and `--set a.b=c` overrides any
field from the command line. Objectives are a discriminated union on `name`, so each objective
validates only its own parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message names the field and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------- data

SynthPreset = Literal["rus", "factorcl", "weak"]


class SynthConfig(Strict):
    """The built-in controlled data set, generated on the fly when `data.path` is not given."""

    preset: SynthPreset = "rus"
    n: int = Field(4096, ge=16, description="number of tuples over all splits")
    seed: int = 0


class DataConfig(Strict):
    path: str | None = Field(
        None, description="shard data set folder (local path or fsspec URL such as s3://b/p); "
        "None generates `synth` into the run directory")
    synth: SynthConfig = SynthConfig()
    modalities: list[str] | None = Field(None, description="modalities to use; None = all")
    label_columns: list[str] | None = Field(None, description="labels to carry; None = all")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    nonfinite: Literal["fail", "drop"] = Field(
        "fail", description="what to do with a row holding NaN or inf: fail, or drop and count")
    shuffle_buffer: int = Field(256, ge=0, description="rows of the in-stream local shuffle")


# --------------------------------------------------------------------------- augmentation


class ModalityAugment(Strict):
    """Strengths in [0, 1]; 0 switches a transform off. Only transforms that fit the modality's
    kind apply (time masking to sequences, crop/flip/jitter to images)."""

    noise: float = Field(0.1, ge=0, le=1, description="Gaussian noise, std relative to 1")
    dropout: float = Field(0.1, ge=0, le=1, description="fraction of features zeroed")
    time_mask: float = Field(0.0, ge=0, le=1, description="fraction of time steps masked")
    crop: float = Field(0.0, ge=0, le=1, description="sequence/image crop strength")
    mixup: float = Field(0.0, ge=0, le=1, description="max mixing weight with another row")
    flip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast jitter")


class AugmentConfig(Strict):
    default: ModalityAugment = ModalityAugment()
    per_modality: dict[str, ModalityAugment] = Field(
        default_factory=dict, description="overrides of `default` by modality name")

    def for_modality(self, name: str) -> ModalityAugment:
        return self.per_modality.get(name, self.default)


# --------------------------------------------------------------------------------- model

EncoderKind = Literal["auto", "mlp", "gru", "transformer", "cnn"]


class EncoderConfig(Strict):
    kind: EncoderKind = Field("auto", description="auto: mlp for vectors, gru for sequences, "
                              "cnn for images")
    hidden: int = Field(128, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelConfig(Strict):
    embed_dim: int = Field(64, ge=1, description="size of every modality and fused embedding")
    encoder: EncoderConfig = EncoderConfig()
    encoders: dict[str, EncoderConfig] = Field(
        default_factory=dict, description="per-modality overrides of `encoder`")
    fusion: Literal["concat", "transformer"] = "transformer"
    fusion_layers: int = Field(1, ge=1)
    fusion_heads: int = Field(4, ge=1)
    proj_hidden: int = Field(128, ge=1)
    proj_dim: int = Field(64, ge=1)

    def encoder_for(self, name: str) -> EncoderConfig:
        return self.encoders.get(name, self.encoder)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.fusion == "transformer" and self.embed_dim % self.fusion_heads:
            raise ValueError(
                f"model.embed_dim={self.embed_dim} must be divisible by "
                f"model.fusion_heads={self.fusion_heads}")
        return self


# ---------------------------------------------------------------------------- objectives

Temperature = Annotated[float, Field(gt=0, le=10, description="softmax temperature tau > 0")]


class _Objective(Strict):
    temperature: Temperature = 0.1


class CrossConfig(_Objective):
    name: Literal["cross"] = "cross"


class CrossSelfConfig(_Objective):
    name: Literal["cross_self"] = "cross_self"
    self_weight: float = Field(1.0, ge=0, description="weight of the per-modality SimCLR terms")


class TupleConfig(_Objective):
    name: Literal["tuple"] = "tuple"
    symmetric: bool = Field(True, description="average both directions (view1->view2 and back)")


class TupleInfoNCEConfig(_Objective):
    name: Literal["tuple_infonce"] = "tuple_infonce"
    temperature: Temperature = 0.07
    symmetric: bool = True
    negative_weights: dict[str, float] = Field(
        default_factory=dict,
        description="alpha_k per modality for k-disturbed negatives (0 switches it off); "
                    "modalities not named take `default_negative_weight`")
    default_negative_weight: float = Field(1.0, ge=0)

    @field_validator("negative_weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not (w >= 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"negative weights must be finite and >= 0, got {bad}")
        return v

    def log_weights(self, modalities: list[str]) -> list[float]:
        weights = [self.negative_weights.get(m, self.default_negative_weight) for m in modalities]
        return [math.log(w) if w > 0 else -math.inf for w in weights]


class CommConfig(_Objective):
    name: Literal["comm"] = "comm"
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean over the M+1 terms (CoMM's code) or sum (its paper)")
    masked_from: Literal["augmented", "original"] = Field(
        "augmented", description="masked views from the augmented views (CoMM's code) or the "
        "un-augmented tuple (its paper; one more encoder pass)")


class _FactorCL(_Objective):
    temperature: float = Field(1.0, gt=0, le=10, description="critic scores are divided "
                                     "by it; 1 = FactorCL's code")
    critic: Literal["concat", "separable"] = Field(
        "concat", description="concat: MLP on [x, y] as FactorCL's code; separable: dot product")
    critic_hidden: int = Field(256, ge=1)
    critic_lr: float = Field(1e-4, gt=0, description="lr of the CLUB critics' own optimiser")


class FactorCLSSLConfig(_FactorCL):
    name: Literal["factorcl_ssl"] = "factorcl_ssl"


class FactorCLSupConfig(_FactorCL):
    name: Literal["factorcl_sup"] = "factorcl_sup"
    label_column: str | None = Field(None, description="label used in place of augmentations; "
                                     "None = the first classification label")


class SupConConfig(_Objective):
    name: Literal["supcon"] = "supcon"
    label_column: str | None = Field(None, description="None = the first classification label")


ObjectiveConfig = Annotated[
    Union[CrossConfig, CrossSelfConfig, TupleConfig, TupleInfoNCEConfig, CommConfig,
          FactorCLSSLConfig, FactorCLSupConfig, SupConConfig],
    Field(discriminator="name"),
]
DEFAULT_OBJECTIVE = "tuple_infonce"
OBJECTIVE_NAMES = ("cross", "cross_self", "tuple", "tuple_infonce", "comm", "factorcl_ssl",
                   "factorcl_sup", "supcon")


# ------------------------------------------------------------------------------ training


class TrainConfig(Strict):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=2, description="tuples per worker per step")
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up, then cosine decay")
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; None = off")
    mixed_precision: bool = Field(False, description="bf16 autocast on GPU; ignored on CPU")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    nonfinite_loss: Literal["fail", "skip"] = Field(
        "fail", description="a NaN/inf loss stops the run (fail) or skips the batch (skip)")


class ScalingConfig(Strict):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0, description="worker-group restarts before giving up")


class StorageConfig(Strict):
    path: str = Field("./runs", description="where runs go: local folder or s3://bucket/prefix")
    name: str | None = Field(None, description="run name; rerunning a name resumes it. "
                             "None = objective name plus a timestamp")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default: AWS "
                                     "or $AWS_ENDPOINT_URL")
    region: str | None = None


class TrackingConfig(Strict):
    """Experiment tracking from rank 0 (mmcl.train.tracking): step curves of the loss, lr,
    samples/s, data wait and the objective's own metrics, and the epoch summaries."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "tensorboard", description="tensorboard: event files in the run folder's tensorboard/ "
        "(`tensorboard --logdir RUN`); mlflow / wandb: Ray Train's setup_mlflow / "
        "setup_wandb (optional extras: pip install 'mmcl[mlflow]' / 'mmcl[wandb]')")
    every_n_steps: int = Field(10, ge=1, description="log step metrics every n steps")
    experiment: str | None = Field(None, description="MLflow experiment / W&B project; "
                                   "None = 'mmcl'")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None = a local "
                                     "file store in the run folder's mlruns/")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode; offline writes the run folder's wandb/ only")


class RunConfig(Strict):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = Field(default_factory=TupleInfoNCEConfig)
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_objective_name(cls, raw: Any) -> Any:
        # `objective: {temperature: 0.2}` means "the default objective, with this field".
        if isinstance(raw, dict) and isinstance(raw.get("objective"), dict):
            raw = {**raw, "objective": {"name": DEFAULT_OBJECTIVE, **raw["objective"]}}
        return raw


# ------------------------------------------------------------------------- loading/errors


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; see `mmcl config --show` for all fields)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown objective; choose one of: {', '.join(OBJECTIVE_NAMES)}"
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        lines.append(f"  {loc or '(top level)'}: {msg} (got {e.get('input')!r})"
                     if e["type"] != "missing" else f"  {loc}: required field is missing")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in OBJECTIVE_NAMES


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: 512, 1e-3, true, [a, b], {x: 1}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.batch_size=512")
    key, value = assignment.split("=", 1)
    set_path(raw, key.strip(), _parse_value(value), where=f"--set {key}")


def set_path(raw: dict, path: str, value: Any, where: str) -> None:
    """Set the dotted `path` of a raw config dict in place, creating missing sections; a
    path through a value is a ConfigError that starts with `where`."""
    parts = path.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict | None, overrides: list[str] = (), source: str = "config") -> RunConfig:
    raw = dict(raw or {})
    for assignment in overrides:
        apply_override(raw, assignment)
    # Switching objective with --set objective.name=X keeps only fields X knows about is not
    # done silently: an unknown field is an error, so the user sees the mismatch.
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; see configs/ for ready ones")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: "
                          f"{getattr(err, 'problem', err)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections "
                          f"(data:, model:, objective:, ...), not a {type(raw).__name__}")
    return raw or {}


def load(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a run config from YAML (or defaults when path is None) plus `--set` overrides."""
    raw = load_yaml(path) if path is not None else {}
    return from_dict(raw, overrides, source=str(path) if path else "defaults")


def dump(cfg: RunConfig) -> str:
    """YAML of a resolved config, suitable to reload. Never holds credentials: the config has
    no credential fields; they come from the environment."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
