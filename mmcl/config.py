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

from mmcl.data.schema import unsafe_name


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message names the field and the fix."""


class Strict(BaseModel):
    # inf and nan are refused in every float field: `train.lr=inf` would otherwise pass and
    # fail minutes later inside the workers.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------- data

SynthPreset = Literal["rus", "factorcl", "weak", "factorcl_hard", "many"]


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

    @field_validator("train_split", "val_split", "test_split")
    @classmethod
    def _split_is_a_name(cls, v: str) -> str:
        return _safe_name(v, "a split folder of the data set")

    missing: Literal["fail", "drop", "mask"] = Field(
        "fail", description="tuples lacking a modality: fail, drop them, or mask (the model "
        "gets <m>__present; needs an objective and fusion that treat absence exactly)")
    normalize: bool = Field(
        True, description="standardise inputs with the manifest's train-split mean/std "
        "(vectors, sequences, audio in the data layer; images in the image encoder)")


# --------------------------------------------------------------------------- augmentation


class ModalityAugment(Strict):
    """Strengths in [0, 1]; 0 switches a transform off. Only transforms that fit the modality's
    kind apply (time masking to sequences, crop/flip/jitter/grayscale/blur to images, token
    masking/deletion/span crop to text)."""

    noise: float = Field(0.1, ge=0, le=1, description="Gaussian noise, std relative to 1")
    dropout: float = Field(0.1, ge=0, le=1, description="fraction of features zeroed")
    time_mask: float = Field(0.0, ge=0, le=1, description="fraction of time steps masked")
    crop: float = Field(0.0, ge=0, le=1, description="sequence/image crop strength; text: "
                        "span crop (keep a window of >= (1 - crop) of the tokens)")
    mixup: float = Field(0.0, ge=0, le=1, description="max mixing weight with another row")
    flip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    color_jitter: float = Field(0.0, ge=0, le=1, description="images: SimCLR colour jitter "
                                "of strength s (brightness/contrast/saturation 0.8 s, hue "
                                "0.2 s, applied with probability 0.8)")
    grayscale: float = Field(0.0, ge=0, le=1, description="images: probability of "
                             "converting to grayscale (SimCLR: 0.2)")
    blur: float = Field(0.0, ge=0, le=1, description="images: probability of a Gaussian blur "
                        "(sigma in [0.1, 2], kernel ~10% of the image; SimCLR: 0.5)")
    token_mask: float = Field(0.0, ge=0, le=1, description="text: fraction of tokens "
                              "replaced by mask_token_id")
    token_delete: float = Field(0.0, ge=0, le=1, description="text: fraction of tokens "
                                "deleted (the rest move up, the padding grows)")
    mask_token_id: int | None = Field(None, ge=0, description="text: the tokenizer's mask id "
                                      "(e.g. [MASK] = 103 in BERT) for token_mask; None = "
                                      "the data set's (manifest mask_id)")
    keep_ends: bool = Field(True, description="text: never mask, delete or crop away the "
                            "first and last real token ([CLS]/[SEP]-style markers)")


class AugmentConfig(Strict):
    default: ModalityAugment = ModalityAugment()
    per_modality: dict[str, ModalityAugment] = Field(
        default_factory=dict, description="overrides of `default` by modality name")

    def for_modality(self, name: str) -> ModalityAugment:
        return self.per_modality.get(name, self.default)


# --------------------------------------------------------------------------------- model

# mmcl's own encoder kinds; a plug-in kind is a name registered with
# mmcl.models.register_encoder or "package.module:ClassName" (checked when the model is built).
BUILTIN_ENCODER_KINDS = ("auto", "mlp", "gru", "transformer", "cnn", "text", "audio", "hf")
_PLUGIN_KIND = r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$"


class EncoderConfig(Strict):
    kind: str = Field("auto", pattern=_PLUGIN_KIND,
                      description="auto (mlp for vectors, gru for sequences, cnn for images, "
                      "text for text, audio for audio), mlp, gru, transformer, cnn, text, "
                      "audio, hf (a Hugging Face backbone), a name "
                      "registered with mmcl.models.register_encoder, or "
                      "'package.module:ClassName'")
    hidden: int = Field(128, ge=1)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # -- kind "hf"
    model: str | None = Field(None, description="hf: hub name or local folder of a "
                              "transformers model")
    pretrained: bool = Field(True, description="hf: load the model's weights "
                             "(from_pretrained); false: fresh weights from its config")
    hf_config: dict[str, Any] | None = Field(
        None, description="hf: an inline transformers config (needs model_type, e.g. "
        "{model_type: bert, hidden_size: 64, ...}) for a fresh model; wins over `model`")
    pooling: Literal["cls", "mean", "pooler"] = Field(
        "mean", description="hf: first token (cls), mean over real tokens/patches/frames, or "
        "the model's own pooler output")
    freeze: Literal["all", "none"] | Annotated[int, Field(ge=0)] = Field(
        "none", description="hf: all, none, or N = only the last N blocks (and what follows "
        "them) train")
    lr_scale: float = Field(1.0, gt=0, description="hf: backbone lr = train.lr * lr_scale")
    layer_decay: float = Field(1.0, gt=0, le=1, description="hf: layer-wise lr decay; block "
                               "i of L gets lr_scale * layer_decay**(L + 1 - i), "
                               "embeddings i = 0")
    gradient_checkpointing: bool = Field(False, description="hf: recompute block activations "
                                         "in backward (less memory, ~30% more compute)")
    image_mean: list[float] | None = Field(None, description="hf images: per-channel mean; "
                                           "None = the model folder's preprocessor config, "
                                           "else ImageNet's")
    image_std: list[float] | None = Field(None, description="hf images: per-channel std "
                                          "(as image_mean)")
    # -- plug-in kinds
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="settings a plug-in encoder reads; mmcl's "
                                    "own kinds take none")

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "EncoderConfig":
        if self.kind == "hf" and not (self.model or self.hf_config):
            raise ValueError("kind hf needs `model` (hub name or local folder) or `hf_config`")
        if self.kind in BUILTIN_ENCODER_KINDS and self.options:
            raise ValueError(f"`options` is for plug-in encoders; kind {self.kind!r} takes "
                             "none")
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("give image_mean and image_std together")
        return self


class ModelConfig(Strict):
    embed_dim: int = Field(64, ge=1, description="size of every modality and fused embedding")
    encoder: EncoderConfig = EncoderConfig()
    encoders: dict[str, EncoderConfig] = Field(
        default_factory=dict, description="per-modality overrides of `encoder`")
    fusion: Literal["concat", "linear", "transformer"] = Field(
        "transformer", description="transformer: CoMM's (CLS token over one token per "
        "modality); concat: an MLP (proj_hidden wide) over the concatenated embeddings; "
        "linear: one Linear layer over them (CoMM's ablation)")
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
    views: Literal[1, 2] = Field(
        1, description="augmented views per tuple: 1 contrasts the modalities of one view "
        "(CLIP / CMC, half the encoder work); 2 takes modality a from one view and b from "
        "the other")


class CrossSelfConfig(_Objective):
    name: Literal["cross_self"] = "cross_self"
    self_weight: float = Field(1.0, ge=0, description="weight of the per-modality SimCLR terms")


class SigLIPConfig(Strict):
    # No fixed `temperature`: SigLIP learns its own, from these initial values (the paper's).
    name: Literal["siglip"] = "siglip"
    temperature_init: float = Field(
        10.0, gt=0, le=1e4, description="initial t in the logits t x·y + b (t multiplies the "
        "similarity: 1/tau); learnt as t' = log t")
    bias_init: float = Field(-10.0, ge=-1e4, le=1e4,
                             description="initial b in the logits t x·y + b; learnt")


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
    key_grad: bool = Field(True, description="false: no gradient through the keys (positive "
                           "and disturbed tuples), as TupleInfoNCE's reference code")

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
    # Defaults: 32 sampled negatives (fewer FLOPs than all pairs, docs/performance.md section
    # 2) and critics 256 wide: 64 (bffdeea to issue 33) cost two real-valued views of digits
    # 0.087 of probe accuracy (docs/fidelity.md, "FactorCL regression"; fidelity.digits2_case).
    critic_hidden: int = Field(256, ge=1)
    negatives: int = Field(32, ge=0, description="K: each critic scores every y against its "
                           "positive and K sampled other rows of the global batch (O(N K) "
                           "pairs); 0 = all N (O(N^2))")
    score_chunk: int = Field(0, ge=0, description="all-pairs concat critic scores in chunks of "
                             "this many columns, recomputed in backward (memory); 0 = at once")
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


# The one list of objectives: the config union and OBJECTIVE_NAMES derive from it, and
# mmcl.objectives imports every module of its package, each registering its classes under
# these names (tests/test_config.py checks that both sides name the same objectives).
OBJECTIVE_CONFIGS = (CrossConfig, CrossSelfConfig, TupleConfig, TupleInfoNCEConfig, CommConfig,
                     FactorCLSSLConfig, FactorCLSupConfig, SupConConfig, SigLIPConfig)
ObjectiveConfig = Annotated[Union[OBJECTIVE_CONFIGS], Field(discriminator="name")]
DEFAULT_OBJECTIVE = "tuple_infonce"
OBJECTIVE_NAMES = tuple(c.model_fields["name"].default for c in OBJECTIVE_CONFIGS)


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
    mixed_precision: Literal["auto"] | bool = Field(
        "auto", description="auto: bf16 autocast on CUDA workers, fp32 on CPU; true: bf16 "
        "on CUDA (fp32 on CPU); false: fp32 everywhere")
    compile: bool = Field(False, description="torch.compile the modality encoders (CUDA "
                          "workers; measured in docs/performance.md before you turn it on)")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    max_steps: int | None = Field(
        None, ge=1, description="end the run after this many steps, mid-epoch if need be "
        "(or after train.epochs, whichever comes first); the LR schedule spans the run")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also a checkpoint every this many steps, mid-epoch too (for "
        "long epochs); a run resumed from one goes on as a straight run would")
    nonfinite_loss: Literal["fail", "skip"] = Field(
        "fail", description="a NaN/inf loss stops the run (fail) or skips the batch (skip)")

    @model_validator(mode="after")
    def _step_checkpoints_within_the_run(self) -> "TrainConfig":
        if (self.max_steps and self.checkpoint_every_steps
                and self.checkpoint_every_steps >= self.max_steps):
            raise ValueError(
                f"train.checkpoint_every_steps={self.checkpoint_every_steps} is not below "
                f"train.max_steps={self.max_steps}, so no step checkpoint would be written "
                f"before the run's final one; lower it or leave it unset")
        return self


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
    shared: bool = Field(False, description="a local storage.path that every node of a "
                         "multi-node Ray cluster mounts (NFS, ...); without it such a path is "
                         "refused on more than one node")

    @field_validator("name")
    @classmethod
    def _one_path_segment(cls, v: str | None) -> str | None:
        # The run folder is storage.path/name: a name with '/' or '..' would write elsewhere.
        return None if v is None else _safe_name(v, "one folder inside storage.path")


def _safe_name(value: str, what: str) -> str:
    reason = unsafe_name(value)
    if reason:
        raise ValueError(f"{reason}; it names {what}")
    return value


class TrackingConfig(Strict):
    """Experiment tracking from rank 0 (mmcl.train.tracking): step curves of the loss, lr,
    samples/s, data wait and the objective's own metrics, and the epoch summaries."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "tensorboard", description="tensorboard: event files in the run folder's tensorboard/ "
        "(`tensorboard --logdir RUN`); mlflow / wandb: Ray Train's setup_mlflow / "
        "setup_wandb (optional extras: pip install 'mmcl[mlflow]' / 'mmcl[wandb]')")
    every_n_steps: int = Field(10, ge=1, description="read the step metrics from the device "
                               "and log them (tracker, progress bar) every n steps; in "
                               "between, a step never waits for the device")
    experiment: str | None = Field(None, description="MLflow experiment / W&B project; "
                                   "None = 'mmcl'")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None = a local "
                                     "file store in the run folder's mlruns/")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode; offline writes the run folder's wandb/ only")


class EvalConfig(Strict):
    """The online probe during pretraining (mmcl.evaluate.online): rank 0 embeds a fixed
    slice of the validation split and reports a linear probe of it with the epoch's metrics
    as `probe_<column>` (balanced accuracy / R²; usable as a Tune metric)."""

    every_epochs: int = Field(1, ge=0, description="epochs between online probes; 0 = off")
    rows: int = Field(1024, ge=8, description="validation tuples in the probed slice (fit "
                      "on three quarters at L2 = 1e-2, scored on the last quarter)")
    columns: list[str] | None = Field(None, description="label columns to probe; None = "
                                      "every classification/regression column of role label")


class RunConfig(Strict):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = Field(default_factory=TupleInfoNCEConfig)
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_objective_name(cls, raw: Any) -> Any:
        # `objective: {temperature: 0.2}` means "the default objective, with this field".
        if isinstance(raw, dict) and isinstance(raw.get("objective"), dict):
            raw = {**raw, "objective": {"name": DEFAULT_OBJECTIVE, **raw["objective"]}}
        return raw


# ------------------------------------------------------------------------- loading/errors


MAX_INPUT_REPR = 80  # characters of an offending value quoted in an error


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_INPUT_REPR else text[:MAX_INPUT_REPR - 3] + "..."


def _format_errors(err: ValidationError, source: str,
                   overrides: dict[str, str] | None = None) -> str:
    """One line per error; an error caused by a `--set` value names that `--set` as its
    source instead of the file."""
    lines, sources = [], []
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if not _is_union_tag(p)]
        loc = ".".join(parts)
        origin = override_for(parts, overrides or {})
        sources.append(origin or source)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; `mmcl config` prints every field)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown objective; choose one of: {', '.join(OBJECTIVE_NAMES)}"
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"must be one of {e['ctx']['expected']}"
        elif e["type"] == "value_error" and "error" in e.get("ctx", {}):
            msg = str(e["ctx"]["error"])  # our own validators' messages, without a prefix
        elif e["type"] == "finite_number":
            msg = "must be a finite number (not inf or nan)"
        line = (f"  {loc or '(top level)'}: {msg} (got {short_repr(e.get('input'))})"
                if e["type"] != "missing" else f"  {loc}: required field is missing")
        lines.append(line + (f" [from {origin}]" if origin else ""))
    where = ", ".join(dict.fromkeys(sources))
    return "\n".join([f"invalid configuration in {where}:", *lines])


def override_for(parts: list[str], overrides: dict[str, str]) -> str | None:
    """The `--set KEY=VALUE` whose KEY is the error's field or a section above or below it."""
    for key, assignment in reversed(list(overrides.items())):
        key_parts = key.split(".")
        n = min(len(key_parts), len(parts))
        if n and key_parts[:n] == parts[:n]:
            return f"--set {assignment}"
    return None


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in OBJECTIVE_NAMES


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: 512, 1e-3, true, [a, b], {x: 1}."""
    try:
        return parse_yaml(text, f"--set value {text!r}")
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


def from_dict(raw: dict | None, overrides: list[str] = (), source: str = "config",
              set_by: list[str] = ()) -> RunConfig:
    """Validate a raw config after applying `overrides`; `set_by` lists `--set` assignments
    already applied to `raw` (a tune file's), named as the source of the errors they cause."""
    raw = dict(raw or {})
    for assignment in overrides:
        apply_override(raw, assignment)
    # Errors name the `--set` that caused them (the last one wins, as it does in the config).
    given = {a.split("=", 1)[0].strip(): a for a in [*set_by, *overrides] if "=" in a}
    # Switching objective with --set objective.name=X keeps only fields X knows about is not
    # done silently: an unknown field is an error, so the user sees the mismatch.
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, given)) from None


# YAML anchors and aliases are allowed for sharing a section, but a document's aliases may
# not expand to more than this many nodes: nested aliases ("billion laughs") otherwise
# grow a 1 KB file into gigabytes once it is copied, validated or printed.
MAX_YAML_NODES = 10_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand beyond MAX_YAML_NODES."""

    def construct_document(self, node):
        if expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(f"its aliases (*name) expand to more than {MAX_YAML_NODES} "
                              f"values; write the values out instead")
        return super().construct_document(node)


def expanded_size(node, limit: int) -> int:
    """How many nodes `node` would be with every alias written out, counted up to `limit`
    (shared nodes are counted once per use, without walking them once per use)."""
    sizes: dict[int, int] = {}

    def size(n) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = limit + 1  # a node reached again while it is walked: a cycle
        total = 1
        children = (n.value if isinstance(n, yaml.SequenceNode) else
                    [part for pair in n.value for part in pair]
                    if isinstance(n, yaml.MappingNode) else [])
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(n)] = min(total, limit + 1)
        return sizes[id(n)]

    return size(node)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text to Python objects with mmcl's one loader (safe, alias expansion bounded);
    every config, search space and recorded config.yaml is read through it."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: its values are nested too deeply") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; see configs/ for ready ones")
    try:
        raw = parse_yaml(path.read_text(), f"config file {path}")
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
