"""`mmcl bench fidelity`: does each objective learn what its paper says it learns?

    mmcl bench fidelity [--preset trifeature] [--seeds 3] [--quick] [--out DIR]
        -> DIR/fidelity.json, DIR/fidelity.md, DIR/fidelity.png (matplotlib optional),
           DIR/runs.jsonl (one line per finished run, written as the bench goes)

For every objective (cross, cross_self, tuple, tuple_infonce, comm, factorcl_ssl; supcon as a
supervised reference; comm with mmcl's concat fusion and with a linear fusion, CoMM's fusion
ablation) the bench pretrains on the controlled data sets of `mmcl data synth` (`rus`,
`factorcl`, `weak`, `factorcl_hard`, `many`) with the same encoders, data, augmentations,
epochs, batch size and optimiser, then probes every factor of the table with mmcl's own
evaluation code (`mmcl.evaluate.diagnostics.probe_columns` -> `linear_probe`: L2 chosen on
val, refit on train+val, balanced accuracy on test) on the representation each objective hands
downstream (`objective.embed`, the same call `mmcl embed` makes); FactorCL's sub-representations
(`objective.sub_embeddings`: Z_S, Z_U1, Z_U2) and, on `many`, every modality's own embedding
are probed alone as well. Two references share the probe: the raw features of all modalities
(`raw:all`, via `diagnostics.raw_feature_probes`) and a randomly initialised encoder (the
tuple/CoMM architecture, untrained). Each cell is the mean ± sample std over seeds; seed s
draws the data set (seed s: new latents and new random mixing maps) and
the model (init, augmentations, batch order).

Two protocol choices follow the papers' own controlled experiments (see `pretraining_rows` and
PRESET_OVERRIDES): on `rus` the objectives are pretrained on biased tuples whose synergy bits
agree, as CoMM's code pretrains its synergy experiment on biased pairs, and probed on the
unbiased splits; on `weak` the weak modality is augmented with noise at its own data-noise
level, so that its per-tuple noise is not an instance fingerprint (TupleInfoNCE's setting: a
modality the contrastive objective can afford to ignore).

Training runs in this process with `mmcl.train.local.fit_in_memory`: the same `Engine` (the
same augmentations, objective, optimiser, schedule and clipping) that the Ray Train workers
drive, on in-memory tensors, one torch thread. On a small machine this is much faster than
starting Ray per run and measures the same objectives; it is written into every output.

`--preset trifeature` runs CoMM's bimodal Trifeature table instead (Settings.trifeature,
TRIFEATURE_*): pairs of rendered images built on disk through `mmcl data import`
(`trifeature_data`), the built-in CNN per image, pretraining on the biased pairs, probes of
shape, texture1, texture2 and synergy beside CoMM's numbers (COMM_PAPER), its own targets
(`trifeature_targets`).

The targets of the fidelity issue (what the papers' controlled experiments show,
docs/methods.md) are checked automatically with the thresholds in TARGET_THRESHOLDS; a
target that is not met is reported as not met.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from mmcl.plotting import agg_pyplot
from mmcl.bench.env import json_default
from mmcl.bench.timing import torch_threads
from mmcl.markdown import table_lines

CHANCE = 0.5   # every probed column is a balanced binary label; balanced accuracy of a guess

# Columns of the table: (preset, label column, short name, what it measures).
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("rus", "redundancy", "R", "redundancy: a bit carried by a, b and c"),
    ("rus", "unique_a", "U_a", "uniqueness: a bit carried by a only"),
    ("rus", "unique_b", "U_b", "uniqueness: a bit carried by b only"),
    ("rus", "unique_c", "U_c", "uniqueness: a bit carried by c only"),
    ("rus", "synergy", "S", "synergy: XOR of a bit of a and a bit of b"),
    ("factorcl", "y_shared", "shared", "FactorCL's shared block (x1 and x2)"),
    ("factorcl", "y_unique1", "U_1", "FactorCL's block unique to x1"),
    ("factorcl", "y_unique2", "U_2", "FactorCL's block unique to x2"),
    ("weak", "shared", "shared", "a bit carried by the strong modalities and the weak one"),
    ("weak", "weak_factor", "weak", "a bit carried by the low-SNR modality only"),
) + (
    # CoMM's bimodal Trifeature (mmcl.data.trifeature): 10-class columns, chance 0.1
    ("trifeature", "shape", "R: shape", "redundancy: the shape both images share (10 classes)"),
    ("trifeature", "texture1", "U: texture1", "uniqueness: image 1's own texture (10 classes)"),
    ("trifeature", "texture2", "U: texture2", "uniqueness: image 2's own texture (10 classes)"),
    ("trifeature", "synergy", "S", "synergy: (texture of image 1, colour of image 2) is one of "
     "the 10 correlated pairs"),
)
# FactorCL's benchmark made hard (non-linear mixing, distractors) and many modalities.
COLUMNS += (
    ("factorcl_hard", "y_shared", "shared", "shared block, through a non-linear map"),
    ("factorcl_hard", "y_unique1", "U_1", "block unique to x1, through a non-linear map"),
    ("factorcl_hard", "y_unique2", "U_2", "block unique to x2, through a non-linear map"),
    ("many", "y", "class", "10-class label carried by six views with different noise "
     "(chance 0.1)"),
)
PRESETS = ("rus", "factorcl", "weak", "factorcl_hard", "many")
IMAGE_PRESETS = ("trifeature",)   # run on their own: `mmcl bench fidelity --preset trifeature`
# Presets whose objectives are also probed per modality embedding (emb:m): does the fused
# embedding keep what its best single modality holds?
MODALITY_PROBE_PRESETS = ("many",)
# Columns probed on a subset of the pairs only: {(preset, column): (label, value)} keeps the
# rows where `label == value`. Trifeature's textures: the probe pairs are correlated
# (colour 2 = pairing[texture 1], synergy 1) in a random half to balance synergy, and in that
# half image 2's colour names texture 1, so a probe read texture 1 off colour 2 (an untrained
# CNN's image-2 embedding: 0.37 on all test pairs, 0.09 on the synergy-0 ones; chance 0.10).
# On the synergy-0 pairs colour 2 is any colour but pairing[texture 1]: the textures are
# probed there (CoMM's unbiased pairs: colour 2 uniform, correlated in 1 of 10).
PROBE_ROWS: dict[tuple[str, str], tuple[str, int]] = {
    ("trifeature", "texture1"): ("synergy", 0),
    ("trifeature", "texture2"): ("synergy", 0),
}
# Few-label probe (k labelled rows per class) of the fused and raw features, per preset.
FEW_LABEL_K: dict[str, tuple[int, ...]] = {"many": (10,)}


def column_key(preset: str, column: str) -> str:
    return f"{preset}:{column}"


@dataclass(frozen=True)
class Method:
    """One row: an objective and the config overrides that make it this row."""

    name: str
    objective: str
    overrides: tuple[str, ...] = ()
    presets: tuple[str, ...] | None = None   # None = every preset
    kind: str = "self-supervised"
    note: str = ""


METHODS: tuple[Method, ...] = (
    Method("cross", "cross"),
    Method("cross_self", "cross_self"),
    Method("tuple", "tuple"),
    Method("tuple_infonce", "tuple_infonce", note="alpha_k = 1 for every modality"),
    Method("comm", "comm", note="transformer fusion (CoMM's)"),
    Method("comm_concat", "comm", ("model.fusion=concat",),
           note="model.fusion=concat: mmcl's concat fusion, an MLP (Linear-GELU-Linear) over "
                "the concatenated modality embeddings, instead of the transformer; still "
                "non-linear"),
    Method("comm_linear", "comm", ("model.fusion=linear",),
           note="model.fusion=linear, CoMM's fusion ablation: one Linear layer over the "
                "concatenated modality embeddings instead of the transformer"),
    Method("factorcl_ssl", "factorcl_ssl", presets=("factorcl", "factorcl_hard", "trifeature"),
           note="FactorCL is defined for exactly two modalities: run on `factorcl`, "
                "`factorcl_hard` and `trifeature` only"),
    Method("supcon", "supcon", ("objective.label_column=y",), kind="supervised",
           note="supervised reference: SupCon on the task label y of each data set"),
)
RAW = "raw features"
RANDOM = "random init"
REFERENCES = (RAW, RANDOM)
REFERENCE_NOTES = {
    RAW: "linear probe on every modality's raw features concatenated (raw:all)",
    RANDOM: "the tuple/CoMM architecture (the bench's encoders + transformer fusion) at its "
            "random initialisation, fused embedding, not trained",
}

# Overrides per objective: one temperature for every InfoNCE-type loss (TupleInfoNCE's code
# default is 0.07, the others' 0.1; with one value tuple vs tuple_infonce differ only by the
# disturbed negatives). FactorCL's critics keep their own scale (temperature 1) and a smaller
# critic (hidden 64 instead of 256, cheaper per step on CPU). cross contrasts two views, the
# form the published tables were measured with (its default became one view afterwards).
OBJECTIVE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "cross": ("objective.temperature=0.1", "objective.views=2"),
    "cross_self": ("objective.temperature=0.1",),
    "tuple": ("objective.temperature=0.1",),
    "tuple_infonce": ("objective.temperature=0.1",),
    "comm": ("objective.temperature=0.1",),
    "supcon": ("objective.temperature=0.1",),
    "factorcl_ssl": ("objective.critic_hidden=64",),
}

# Overrides of one data set, for every row alike. On `weak` the weak modality's own noise (std
# WEAK_NOISE = 1.0 per feature, drawn once per tuple) is an instance fingerprint that the
# default augmentation (noise 0.1) keeps: for a contrastive objective the "weak" modality is
# then the *most* identifying one, not one it can afford to ignore. Augmenting it with noise of
# its own data noise level (TupleInfoNCE's per-modality augmentation strength beta) makes it
# weak for the objective as well as for the factor, which is TupleInfoNCE's setting.
PRESET_OVERRIDES: dict[str, tuple[str, ...]] = {
    "weak": ("augment.per_modality={weak: {noise: 1.0}}",),
}

# Trifeature: the rows of CoMM's table (and the rest of mmcl's self-supervised objectives),
# the budget and the model every row shares (Settings.trifeature).
TRIFEATURE_METHODS = ("cross", "cross_self", "comm", "comm_linear", "tuple", "tuple_infonce",
                      "factorcl_ssl")
TRIFEATURE_N = 6000          # pairs: 3000 biased pretraining, 1500 unbiased probe-train,
#                              600 val, 900 test (mmcl.data.trifeature.SPLIT_FRACTIONS)
# 64x64 renders, 24 epochs = 1104 steps a row, two torch threads: 65 min for 7 rows x 3 seeds
# on an otherwise idle 2-core machine (run E in docs/fidelity.md). At 32x32 and 12 epochs (run D in docs/fidelity.md) no row learnt the shapes
# (R <= 0.67) nor cross_self / comm texture 2; resolution x steps moved both, the probe's
# convergence, colour jitter, a stronger crop, a wider CNN and the temperature did not.
# CoMM: 224x224, AlexNet, 100 epochs.
TRIFEATURE_IMAGE_SIZE = 64
TRIFEATURE_EPOCHS = 24
TRIFEATURE_THREADS = 2
TRIFEATURE_BATCH = 64
TRIFEATURE_DATA_SEED = 0     # one data set for every seed (as CoMM's): seeds vary the model
TRIFEATURE_MODEL = ("model.embed_dim=64", "model.encoder.kind=cnn", "model.encoder.hidden=32",
                    "model.encoder.layers=3", "model.proj_hidden=128", "model.proj_dim=64")
# The geometric half of SimCLR's image set (random resized crop keeping >= 50% of the area:
# SimCLR keeps 8% of 224x224 photos; horizontal flip). Left out, with reasons: colour jitter
# and grayscale (kornia's jitter costs more than the model's whole step on this CPU, and
# colour is half of the synergy label), blur (a 3-pixel kernel wipes out 4-pixel textures),
# feature noise and dropout.
TRIFEATURE_AUGMENT = ("augment.default={crop: 0.5, flip: 0.5, color_jitter: 0.0, "
                      "grayscale: 0.0, blur: 0.0, noise: 0.0, dropout: 0.0}",)
# CoMM's Table (linear probe accuracy %, Dufumier et al. 2024, bimodal Trifeature).
COMM_PAPER = {"cross": {"R": 100.0, "U": 11.6, "S": 50.0},
              "cross_self": {"R": 99.7, "U": 86.9, "S": 50.0},
              "comm": {"R": 99.9, "U": 87.8, "S": 71.9},
              "comm_linear": {"S": 50.0}}
TRIFEATURE_THRESHOLDS = {
    "cross_max_uniqueness": 0.25,   # cross keeps little of the unique textures (chance 0.10)
    "min_uniqueness": 0.70,         # cross_self and comm keep them
    "comm_min_synergy": 0.65,       # comm (transformer fusion) learns the synergy
    "linear_max_synergy": 0.55,     # a linear fusion does not (chance 0.5)
    "min_redundancy": 0.90,         # every objective keeps the shared shape
}

# What "high", "near chance", ... mean in the targets check (balanced accuracy, chance 0.5).
TARGET_THRESHOLDS = {
    "high": 0.90,             # redundancy "high"
    "recovered": 0.80,        # a factor "recovered"
    "above_chance": 0.65,     # "clearly above chance"
    "near_chance": 0.60,      # "near chance" (at most)
    "margin": 0.05,           # "drops" / "clearly above another row": at least this much
    "weak_margin": 0.02,      # tuple_infonce vs tuple on the weak factor: mean gain at least
    "keeps": 0.02,            # a fused embedding "keeps" its best modality: at most this below
}
# Rows whose fused embedding must keep what its best single modality embedding holds (many).
MANY_ROWS = ("cross", "tuple", "tuple_infonce", "comm")


@dataclass
class Settings:
    """Everything that decides the numbers; written into every output."""

    mode: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    presets: tuple[str, ...] = PRESETS
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)
    n: int = 4096                    # tuples per data set (80/10/10 train/val/test)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    model: tuple[str, ...] = ()      # model.* overrides (default: mmcl's defaults)
    augment: tuple[str, ...] = ()    # augment.* overrides (default: mmcl's defaults)
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    probe_max_iter: int = 100
    threads: int = 1
    rus_pretrain: str = "biased"     # "biased" (CoMM's protocol) or "unbiased"
    trifeature_pretrain: str = "biased"  # "biased" (CoMM's protocol) or "unbiased"
    image_size: int = TRIFEATURE_IMAGE_SIZE  # trifeature renders (CoMM: 224)
    raw_per_modality: bool = True    # also probe each modality's raw features (JSON only)
    preset_overrides: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {p: tuple(v) for p, v in PRESET_OVERRIDES.items()})

    @classmethod
    def quick(cls, seeds: int = 1) -> "Settings":
        """Every row and column of the first three data sets, tiny: 1 seed, 384 tuples, 2
        epochs, a small model, one L2 strength (a smoke test: the numbers are not
        meaningful). factorcl_hard and many stay out: their 100-feature and six-modality,
        10-class probes would double the smoke's time; tests probe their parts directly."""
        return cls(mode="quick", seeds=tuple(range(seeds)), n=384, epochs=2, batch_size=64,
                   presets=("rus", "factorcl", "weak"),
                   model=("model.embed_dim=32", "model.encoder.hidden=64",
                          "model.proj_hidden=64", "model.proj_dim=32"),
                   l2_grid=(1e-3,), probe_max_iter=30, raw_per_modality=False)

    @classmethod
    def trifeature(cls, quick: bool = False) -> "Settings":
        """CoMM's bimodal Trifeature table on 2 CPU cores: 64x64 renders, the built-in CNN
        (3 stride-2 conv blocks of 32 channels; CoMM: AlexNet on 224x224, 100 epochs), the
        geometric SimCLR augmentations (see TRIFEATURE_AUGMENT). quick: a smoke
        test of every row and column (a few hundred pairs, 1 epoch, a tiny CNN)."""
        common = dict(presets=IMAGE_PRESETS, methods=TRIFEATURE_METHODS,
                      augment=TRIFEATURE_AUGMENT, raw_per_modality=False, preset_overrides={})
        if quick:
            return cls(mode="quick", seeds=(0,), n=192, epochs=1, batch_size=32,
                       model=("model.embed_dim=16", "model.encoder.kind=cnn",
                              "model.encoder.hidden=8", "model.encoder.layers=2",
                              "model.proj_hidden=32", "model.proj_dim=16"),
                       l2_grid=(1e-3,), probe_max_iter=20, image_size=16, **common)
        return cls(mode="full", n=TRIFEATURE_N, epochs=TRIFEATURE_EPOCHS,
                   batch_size=TRIFEATURE_BATCH, model=TRIFEATURE_MODEL,
                   threads=TRIFEATURE_THREADS, **common)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objective_overrides"] = {k: list(v) for k, v in OBJECTIVE_OVERRIDES.items()}
        d["split"] = [0.8, 0.1, 0.1]
        d["rus_pretrain_note"] = (
            "biased: on rus the objectives are pretrained on the train tuples whose synergy "
            "bits agree (synergy == 0, about half of them), as CoMM's controlled experiment "
            "pretrains on biased pairs; every probe uses the unbiased train/val/test splits"
            if self.rus_pretrain == "biased" else
            "unbiased: on rus the objectives are pretrained on the whole train split")
        d["trifeature_pretrain_note"] = (
            "biased: on trifeature the objectives are pretrained on the train split's biased "
            "pairs (colour of image 2 = pairing[texture of image 1], CoMM's synergy protocol); "
            "the probes fit on the train split's unbiased pairs and score on the unbiased test "
            "pairs" if self.trifeature_pretrain == "biased" else
            "unbiased: on trifeature the objectives are pretrained on the train split's "
            "unbiased pairs (also the probes' train rows)")
        d["training"] = ("in process (mmcl.train.local.fit_in_memory: the Engine the Ray Train "
                         "workers run, on in-memory tensors), no Ray, one worker")
        d["probe"] = ("mmcl.evaluate.diagnostics.probe_columns on objective.embed (the "
                      "representation mmcl embed writes): logistic regression, L2 from l2_grid "
                      "chosen on val by balanced accuracy, refit on train+val, balanced "
                      "accuracy on test")
        d["probe_rows"] = {column_key(p, c): f"only the rows where {label} == {value}"
                           for (p, c), (label, value) in PROBE_ROWS.items()
                           if p in self.presets}
        return d


# ------------------------------------------------------------------------------ helpers


def pretraining_rows(preset: str, train: dict, settings: "Settings") -> dict:
    """The training split the objectives are pretrained on. `rus` with rus_pretrain="biased"
    follows CoMM's controlled experiment (Duplums/CoMM main_trifeatures.py: pretraining data
    `biased`, probes `biased=False`): only tuples whose two synergy bits agree
    (synergy_a == synergy_b, i.e. synergy == 0) are pretrained on, so that the synergistic
    relation is a dependence between modalities a and b that a self-supervised objective can
    see; the probes use the unbiased splits, where synergy is balanced. With independent bits
    (unbiased) the XOR label is not a property of the input distribution at all."""
    if preset == "rus" and settings.rus_pretrain == "biased":
        keep = np.asarray(train["synergy"]) == 0
        return {k: np.asarray(v)[keep] for k, v in train.items()}
    return train


def method(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}; choose from {[m.name for m in METHODS]}")


def columns_of(preset: str) -> list[tuple[str, str, str, str]]:
    return [c for c in COLUMNS if c[0] == preset]


def runs_on(m: Method, preset: str) -> bool:
    return m.presets is None or preset in m.presets


def run_config(m: Method | None, preset: str, seed: int, settings: Settings):
    """The RunConfig of one row on one preset and seed (m=None: the random-init reference)."""
    from mmcl import config

    objective = m.objective if m else "tuple"
    overrides = [
        f"objective.name={objective}", *OBJECTIVE_OVERRIDES.get(objective, ()),
        # image presets are built on disk (trifeature_data), not by data.synth
        *((f"data.synth.preset={preset}",) if preset in PRESETS else ()),
        f"data.synth.n={settings.n}", f"data.synth.seed={seed}", f"train.seed={seed}", f"train.epochs={settings.epochs}",
        f"train.batch_size={settings.batch_size}", f"train.lr={settings.lr}",
        f"train.optimizer={settings.optimizer}",
        f"train.weight_decay={settings.weight_decay}", "scaling.num_workers=1",
        *settings.model, *settings.augment,
        *settings.preset_overrides.get(preset, ()),
        *((m.overrides if m else ())),
    ]
    return config.load(None, overrides)


def make_splits(preset: str, n: int, seed: int):
    """(manifest, {split: {column: array}}) of a controlled data set, split 80/10/10 with the
    same seeded split `mmcl data synth` writes."""
    from mmcl.data.convert import split_arrays
    from mmcl.data.synth import make_arrays

    manifest, arrays = make_arrays(preset, n, seed)
    return manifest, split_arrays(arrays, manifest, (0.8, 0.1, 0.1), seed)


def prepared_batches(cols: dict, modalities: Sequence[str], prepare, batch_size: int):
    """The stored columns of one split in batches, through the data layer's Preparer as in
    training (uint8 images -> [0, 1]): every embedding the bench probes reads them so."""
    import torch

    n = len(cols[modalities[0]])
    for start in range(0, n, batch_size):
        yield prepare({m: torch.from_numpy(np.ascontiguousarray(
            cols[m][start:start + batch_size])) for m in modalities})


def embed_splits(objective, splits: dict, modalities: Sequence[str], manifest,
                 batch_size: int = 1024) -> dict[str, dict[str, np.ndarray]]:
    """{split: {kind: features}} with kind "fused" = objective.embed (what `mmcl embed` writes
    as its `embedding` column), in eval mode, no augmentation; the stored columns go through
    the data layer's Preparer first, as in training (uint8 images -> [0, 1])."""
    import torch

    from mmcl.data.prepare import Preparer
    from mmcl.evaluate import diagnostics as diag
    from mmcl.evaluate.embed import FUSED

    prepare = Preparer(manifest)
    objective.eval()
    out = {}
    for split, cols in splits.items():
        parts = []
        with torch.no_grad():
            for batch in prepared_batches(cols, modalities, prepare, batch_size):
                parts.append(objective.embed(batch).float().cpu().numpy())
        out[split] = diag.feature_kinds({FUSED: np.concatenate(parts)}, [], [])
    return out


def probe(preset: str, label_splits: dict, specs, features: dict, probes) -> dict:
    """diag.probe_columns of every column of `specs`, the PROBE_ROWS columns on their own
    subset of the rows (same features, same probe settings)."""
    from mmcl.evaluate import diagnostics as diag

    groups: dict[tuple[str, int] | None, list] = {}
    for spec in specs:
        groups.setdefault(PROBE_ROWS.get((preset, spec.name)), []).append(spec)
    out: dict[str, dict] = {}
    for rows, group in groups.items():
        labels, x = label_splits, features
        if rows is not None:
            keep = {s: np.asarray(cols[rows[0]]) == rows[1] for s, cols in label_splits.items()}
            labels = {s: {c: np.asarray(v)[keep[s]] for c, v in cols.items()}
                      for s, cols in label_splits.items()}
            x = {s: {kind: f[keep[s]] for kind, f in kinds.items()}
                 for s, kinds in features.items()}
        out.update(diag.probe_columns(labels, group, x, probes))
    return {spec.name: out[spec.name] for spec in specs}


def probe_settings(settings: Settings, preset: str | None = None):
    from mmcl.evaluate.diagnostics import ProbeSettings

    return ProbeSettings(l2_grid=settings.l2_grid, max_iter=settings.probe_max_iter,
                         few_label_k=FEW_LABEL_K.get(preset, ()), max_rows=None)


def embed_parts(objective, splits: dict, modalities: Sequence[str], manifest,
                batch_size: int = 1024,
                per_modality: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{split: {kind: features}} of the objective's sub-representations
    (`objective.sub_embeddings`, kind "sub:NAME") and, with per_modality, of every modality's
    own embedding (`modality_embeddings`, kind "emb:m"); empty dicts when it has neither."""
    import torch

    from mmcl.data.prepare import Preparer
    from mmcl.evaluate import diagnostics as diag

    prepare = Preparer(manifest)
    objective.eval()
    out = {}
    for split, cols in splits.items():
        parts: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for batch in prepared_batches(cols, modalities, prepare, batch_size):
                found = {f"sub:{k}": v for k, v in objective.sub_embeddings(batch).items()}
                if per_modality:
                    found.update({diag.emb_kind(k): v for k, v in
                                  objective.modality_embeddings(batch).items()})
                for kind, v in found.items():
                    parts.setdefault(kind, []).append(v.float().cpu().numpy())
        out[split] = {kind: np.concatenate(v) for kind, v in parts.items()}
    return out


def few_label_scores(results: dict, preset: str, kind: str) -> dict[str, dict]:
    """{column key: {k: balanced accuracy mean}} of the few-label probes of one kind."""
    out = {}
    for _, col, _, _ in columns_of(preset):
        few = results[col].get("few_label", {}).get(kind)
        if few:
            out[column_key(preset, col)] = {str(k): v["balanced_accuracy"]["mean"]
                                            for k, v in few.items()}
    return out


def _specs(manifest, preset: str):
    names = [c[1] for c in columns_of(preset)]
    return [manifest.label(n) for n in names]


def _scores(results: dict, preset: str, kind: str) -> dict[str, dict]:
    """{column key: {"balanced_accuracy", "accuracy", "l2"}} of one representation kind."""
    out = {}
    for _, col, _, _ in columns_of(preset):
        probe = results[col]["probes"][kind]
        out[column_key(preset, col)] = {k: probe[k] for k in ("balanced_accuracy",
                                                              "accuracy", "l2")}
    return out


def raw_features(values: np.ndarray, spec) -> np.ndarray:
    """One modality's stored values as (N, features) float32 for the raw-feature probe
    (uint8 images in [0, 1], as the encoders see them)."""
    x = np.asarray(values).reshape(len(values), -1)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


def trifeature_data(seed: int, settings: Settings, data_dir: str | None,
                    log: Callable[[str], None]):
    """(manifest, probe splits, pretraining rows) of the bimodal Trifeature set (one data set,
    TRIFEATURE_DATA_SEED, for every training seed), built as a user's image files are: PNG files + a table, `mmcl data import` (Ray Data),
    then read back from the shards. CoMM's protocol: pretraining on the biased train pairs
    (colour 2 = pairing[texture 1]); the probes fit on the unbiased train pairs and score on
    the unbiased val/test splits. trifeature_pretrain="unbiased" pretrains on the unbiased
    train pairs instead (an experiment: is texture 1 still unique when the pairing is off?)."""
    import tempfile

    from mmcl.data.shards import read_manifest, read_split
    from mmcl.data.synth import generate_trifeature

    root = data_dir or tempfile.mkdtemp(prefix="mmcl-fidelity-")
    data_seed = TRIFEATURE_DATA_SEED
    out = os.path.join(root, f"trifeature-n{settings.n}-{settings.image_size}px-seed{data_seed}")
    start = time.perf_counter()
    if not os.path.exists(os.path.join(out, "manifest.json")):  # the first seed builds it
        # The import starts local Ray through mmcl.cluster, which retries a timed-out start.
        generate_trifeature(out, settings.n, data_seed, overwrite=True,
                            image_size=settings.image_size)
        log(f"[fidelity] trifeature: {settings.n} pairs rendered, written as PNG and imported "
            f"in {time.perf_counter() - start:.1f}s -> {out}")
    manifest = read_manifest(out)
    splits = {s: read_split(out, s) for s in ("train", "val", "test")}
    train = splits["train"]
    biased = np.asarray(train["biased"]) == 1
    pick = biased if settings.trifeature_pretrain == "biased" else ~biased
    pretrain = {k: v[pick] for k, v in train.items()}
    splits["train"] = {k: v[~biased] for k, v in train.items()}
    return manifest, splits, pretrain


# ---------------------------------------------------------------------------- one seed


def run_preset(preset: str, seed: int, settings: Settings, log: Callable[[str], None],
               record: Callable[[dict], None], data_dir: str | None = None) -> None:
    """The references and every method on one preset and seed; each finished run goes to
    `record` as {"row", "preset", "seed", "scores", ...}. Image presets build their data set
    on disk under `data_dir` (a temporary folder when None)."""
    import torch

    from mmcl.evaluate import diagnostics as diag
    from mmcl.objectives import build_objective
    from mmcl.train.local import fit_in_memory

    if preset in IMAGE_PRESETS:
        manifest, splits, pretrain = trifeature_data(seed, settings, data_dir, log)
    else:
        manifest, splits = make_splits(preset, settings.n, seed)
        pretrain = pretraining_rows(preset, splits["train"], settings)
    modalities = manifest.modality_names
    specs = _specs(manifest, preset)
    probes = probe_settings(settings, preset)
    label_splits = {s: {k: v for k, v in cols.items() if k not in modalities}
                    for s, cols in splits.items()}

    def done(row: str, results: dict, kind: str, **extra) -> None:
        scores = _scores(results, preset, kind)
        record({"row": row, "preset": preset, "seed": seed, "scores": scores, **extra})
        cells = " ".join(f"{k.split(':', 1)[1]}={v['balanced_accuracy']:.3f}"
                         for k, v in scores.items())
        log(f"[fidelity] seed {seed} {preset:8s} {row:14s} {cells} "
            f"({extra.get('train_s', 0):.1f}s train, {extra.get('probe_s', 0):.1f}s probe)")

    # references (an image preset's data set is the same for every seed: its raw-pixel probe,
    # minutes on 6144 features, runs for the first seed only)
    start = time.perf_counter()
    raw_needed = preset not in IMAGE_PRESETS or seed == settings.seeds[0]
    kind = diag.RAW_ALL if len(modalities) > 1 else diag.raw_kind(modalities[0])
    if not raw_needed:
        raw = None
    elif settings.raw_per_modality:
        raw = diag.raw_feature_probes(splits, specs, modalities, probes)
        per_modality = {m: {c: raw[c]["probes"][diag.raw_kind(m)]["balanced_accuracy"]
                            for c in raw} for m in modalities}
    else:  # only the reference the table shows: every modality's raw features together
        features = {s: {kind: np.concatenate([raw_features(cols[m], manifest.modality(m))
                                              for m in modalities], axis=1)}
                    for s, cols in splits.items()}
        raw, per_modality = probe(preset, label_splits, specs, features, probes), None
    if raw is not None:
        done(RAW, raw, kind, probe_s=time.perf_counter() - start,
             raw_per_modality=per_modality, few_label=few_label_scores(raw, preset, kind))
    cfg = run_config(None, preset, seed, settings)
    torch.manual_seed(cfg.train.seed)
    start = time.perf_counter()
    random_model = build_objective(cfg, manifest)
    results = probe(preset, label_splits, specs,
                    embed_splits(random_model, splits, modalities, manifest), probes)
    done(RANDOM, results, diag.FUSED_KIND, probe_s=time.perf_counter() - start)

    for name in settings.methods:
        m = method(name)
        if not runs_on(m, preset):
            continue
        cfg = run_config(m, preset, seed, settings)
        start = time.perf_counter()
        try:
            engine = fit_in_memory(cfg, manifest, pretrain)
        except Exception as err:  # noqa: BLE001 - recorded in the table, the bench goes on
            record({"row": m.name, "preset": preset, "seed": seed,
                    "error": f"{type(err).__name__}: {err}"})
            log(f"[fidelity] seed {seed} {preset} {m.name}: FAILED {type(err).__name__}: "
                f"{err}")
            continue
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        features = embed_splits(engine.objective, splits, modalities, manifest)
        results = probe(preset, label_splits, specs, features, probes)
        parts = part_scores(engine.objective, splits, label_splits, specs, modalities,
                            preset, settings, manifest)
        last = engine.history[-1] if engine.history else {}
        done(m.name, results, diag.FUSED_KIND, train_s=train_s, **parts,
             few_label=few_label_scores(results, preset, diag.FUSED_KIND),
             probe_s=time.perf_counter() - start, steps=engine.step,
             final_loss=last.get("loss"), skipped_batches=engine.skipped_batches,
             embed_dim=int(features["train"][diag.FUSED_KIND].shape[1]))


def part_scores(objective, splits: dict, label_splits: dict, specs, modalities,
                preset: str, settings: Settings, manifest) -> dict:
    """{"sub_scores": {sub name: scores}} for an objective with sub-representations and
    {"modality_scores": {modality: scores}} on MODALITY_PROBE_PRESETS (empty when neither)."""
    features = embed_parts(objective, splits, modalities, manifest,
                           per_modality=preset in MODALITY_PROBE_PRESETS)
    if not features["train"]:
        return {}
    results = probe(preset, label_splits, specs, features, probe_settings(settings))
    out: dict[str, dict] = {}
    for kind in features["train"]:
        group = "sub_scores" if kind.startswith("sub:") else "modality_scores"
        out.setdefault(group, {})[kind.split(":", 1)[1]] = _scores(results, preset, kind)
    return out


# --------------------------------------------------------------------------- aggregate


def row_names(settings: Settings) -> list[str]:
    return [*settings.methods, *REFERENCES]


def column_keys(settings: Settings) -> list[str]:
    return [column_key(p, c) for p, c, _, _ in COLUMNS if p in settings.presets]


def aggregate(runs: Sequence[dict], settings: Settings) -> dict[str, dict[str, dict]]:
    """{row: {column key: {"mean", "std", "n"} | {"na": why} | {"error": ...}}}."""
    from mmcl.evaluate.probe import mean_std

    table: dict[str, dict[str, dict]] = {}
    for row in row_names(settings):
        cells = {}
        for key in column_keys(settings):
            preset = key.split(":", 1)[0]
            if row not in REFERENCES and not runs_on(method(row), preset):
                cells[key] = {"na": method(row).note}
                continue
            mine = [r for r in runs if r["row"] == row and r["preset"] == preset]
            values = [r["scores"][key]["balanced_accuracy"] for r in mine if "scores" in r]
            errors = [r["error"] for r in mine if "error" in r]
            cell = mean_std(values)
            if errors:
                cell["errors"] = errors
            cells[key] = cell
        table[row] = cells
    return table


def aggregate_parts(runs: Sequence[dict], group: str) -> dict[str, dict[str, dict]]:
    """{row: {part: {column key: {"mean", "std", "n"}}}} of the runs' `group` scores
    ("sub_scores": sub-representations; "modality_scores": per-modality embeddings)."""
    from mmcl.evaluate.probe import mean_std

    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        for part, scores in r.get(group, {}).items():
            for key, v in scores.items():
                values.setdefault(r["row"], {}).setdefault(part, {}).setdefault(
                    key, []).append(v["balanced_accuracy"])
    return {row: {part: {key: mean_std(v) for key, v in cols.items()}
                  for part, cols in parts.items()} for row, parts in values.items()}


def aggregate_few_label(runs: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{row: {"column key@k": {"mean", "std", "n"}}} of the few-label probes."""
    from mmcl.evaluate.probe import mean_std

    values: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for key, by_k in r.get("few_label", {}).items():
            for k, v in by_k.items():
                values.setdefault(r["row"], {}).setdefault(f"{key}@{k}", []).append(v)
    return {row: {key: mean_std(v) for key, v in cells.items()}
            for row, cells in values.items()}


def _part_mean(parts: dict, row: str, part: str, key: str) -> float:
    v = parts.get(row, {}).get(part, {}).get(key, {}).get("mean")
    return float(v) if v is not None else float("nan")


def _mean(table, row: str, key: str) -> float:
    cell = table.get(row, {}).get(key, {})
    v = cell.get("mean")
    return float(v) if v is not None else float("nan")


def _std(table, row: str, key: str) -> float:
    v = table.get(row, {}).get(key, {}).get("std")
    return float(v) if v is not None and np.isfinite(v) else 0.0


# -- issue 33: the FactorCL regression case. FactorCL-SSL on two real-valued views of
# scikit-learn's digits (1,797 rows, 10 classes): view a = a fixed random tanh projection of the
# left four pixel columns to 216 features, view b of the right four to 240, noise 0.3 per
# feature, z-scored. mmcl's defaults in one process (batch 128), 20 epochs, probe of the fused
# embedding on test. With 32 sampled negatives (the default from bffdeea to issue 33) it fell
# below DIGITS2_TARGET (docs/fidelity.md, "FactorCL regression").
DIGITS2 = "digits2"
DIGITS2_EPOCHS = 20
DIGITS2_TARGET = 0.80
DIGITS2_VIEWS = (("a", slice(0, 4), 216), ("b", slice(4, 8), 240))


def digits2_arrays(n: int | None = None) -> dict[str, np.ndarray]:
    """{"a", "b", "label"} of the digits2 case (fixed: projections drawn from seed 0); n: the
    first n rows only (the quick smoke)."""
    try:
        from sklearn.datasets import load_digits  # its data ship with the package
    except ImportError as err:
        raise ImportError("the digits2 case needs scikit-learn (pip install 'mmcl[test]')"
                          ) from err
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8) / 16.0
    rng = np.random.default_rng(0)
    out = {}
    for name, cols, dim in DIGITS2_VIEWS:
        px = x[:, :, cols].reshape(len(x), -1)
        w = rng.normal(size=(px.shape[1], dim)) / np.sqrt(px.shape[1])
        b = rng.normal(size=dim) * 0.5
        v = np.tanh(2 * (px @ w) + b) + 0.3 * rng.normal(size=(len(px), dim))
        out[name] = ((v - v.mean(0)) / v.std(0)).astype(np.float32)
    out["label"] = y.astype(np.int64)
    return {k: v[:n] for k, v in out.items()}


def digits2_case(settings: Settings, log: Callable[[str], None]) -> dict:
    """FactorCL-SSL at mmcl's defaults on digits2, per seed: {"scores", "mean", "target",
    "met"} (met None in quick mode: 384 rows, 1 epoch, the quick model, numbers not judged)."""
    from mmcl import config
    from mmcl.data.convert import infer_manifest, split_arrays
    from mmcl.evaluate import diagnostics as diag
    from mmcl.train.local import fit_in_memory

    quick = settings.mode == "quick"
    arrays = digits2_arrays(384 if quick else None)
    manifest = infer_manifest(arrays)
    splits = split_arrays(arrays, manifest, (0.8, 0.1, 0.1), 0)
    labels = {s: {"label": cols["label"]} for s, cols in splits.items()}
    scores = []
    for seed in settings.seeds:
        cfg = config.load(None, ["objective.name=factorcl_ssl", "scaling.num_workers=1",
                                 f"train.seed={seed}",
                                 f"train.epochs={1 if quick else DIGITS2_EPOCHS}",
                                 *(settings.model if quick else ())])
        start = time.perf_counter()
        engine = fit_in_memory(cfg, manifest, splits["train"])
        features = embed_splits(engine.objective, splits, ("a", "b"), manifest)
        result = probe(DIGITS2, labels, [manifest.label("label")], features,
                       probe_settings(settings))
        scores.append(result["label"]["probes"][diag.FUSED_KIND]["balanced_accuracy"])
        log(f"[fidelity] seed {seed} {DIGITS2} factorcl_ssl label={scores[-1]:.3f} "
            f"({time.perf_counter() - start:.1f}s)")
    mean = float(np.mean(scores))
    return {"scores": scores, "mean": mean, "target": DIGITS2_TARGET,
            "met": None if quick else bool(mean >= DIGITS2_TARGET)}


def check_targets(table: dict, settings: Settings, sub: dict | None = None,
                  per_modality: dict | None = None) -> list[dict]:
    """The fidelity issues' targets of the data sets this bench ran, each {"target", "met"
    (True/False/None: not run), "detail"} with the numbers it was decided on. `sub`: the
    sub-representation table (FactorCL's Z_S, Z_U1, Z_U2); `per_modality`: each modality's own
    embedding's scores."""
    out: list[dict] = []
    if set(settings.presets) & set(PRESETS):
        out += vector_targets(table, settings, sub or {}, per_modality or {})
    if "trifeature" in settings.presets:
        out += trifeature_targets(table)
    return out


def _target_adder(table: dict, out: list[dict]):
    """add(target, checks, needs): append one target decided on `checks`, a list of
    (description, value, op, threshold) with op in >=, <=; "not run" when a row in `needs`
    or a value is missing."""
    def add(target: str, checks: list[tuple[str, float, str, float]], needs: list[str]):
        if any(r not in table for r in needs) or any(math.isnan(v) for _, v, _, _ in checks):
            out.append({"target": target, "met": None, "detail": "not run (row or column "
                        "missing in this bench's settings)"})
            return
        parts, ok = [], True
        for desc, value, op, thr in checks:
            good = value >= thr if op == ">=" else value <= thr
            ok &= good
            parts.append(f"{desc} = {value:.3f} {op} {thr:.2f} {'ok' if good else 'NO'}")
        out.append({"target": target, "met": bool(ok), "detail": "; ".join(parts)})

    return add


def trifeature_targets(table: dict) -> list[dict]:
    """Issue 18's targets on CoMM's bimodal Trifeature (TRIFEATURE_THRESHOLDS; uniqueness =
    the mean of the texture1 and texture2 probes, both shown)."""
    t = TRIFEATURE_THRESHOLDS
    out: list[dict] = []
    add = _target_adder(table, out)

    def cell(row: str, col: str) -> float:
        return _mean(table, row, column_key("trifeature", col))

    def uniqueness(row: str) -> tuple[str, float, str]:
        u1, u2 = cell(row, "texture1"), cell(row, "texture2")
        return f"U({row}) (texture1 {u1:.3f}, texture2 {u2:.3f})", (u1 + u2) / 2, row

    desc, value, _ = uniqueness("cross")
    add("trifeature: cross keeps little uniqueness", [
        (desc, value, "<=", t["cross_max_uniqueness"])], ["cross"])
    for row in ("cross_self", "comm"):
        desc, value, _ = uniqueness(row)
        add(f"trifeature: {row} keeps uniqueness", [
            (desc, value, ">=", t["min_uniqueness"])], [row])
    add("trifeature: comm (transformer fusion) learns synergy", [
        ("S(comm)", cell("comm", "synergy"), ">=", t["comm_min_synergy"])], ["comm"])
    add("trifeature: comm with a linear fusion does not", [
        ("S(comm_linear)", cell("comm_linear", "synergy"), "<=", t["linear_max_synergy"])],
        ["comm_linear"])
    rows = [r for r in TRIFEATURE_METHODS if r in table]
    add("trifeature: every objective keeps the redundant shape", [
        (f"R({r})", cell(r, "shape"), ">=", t["min_redundancy"]) for r in rows], rows or ["-"])
    return out


def vector_targets(table: dict, settings: Settings, sub: dict,
                   per_modality: dict) -> list[dict]:
    """The first fidelity issue's targets on the vector presets (TARGET_THRESHOLDS)."""
    t = TARGET_THRESHOLDS
    k = column_key
    out: list[dict] = []
    add = _target_adder(table, out)

    def u_mean(row: str) -> float:
        return float(np.mean([_mean(table, row, k("rus", f"unique_{m}")) for m in "abc"]))

    def u_max(row: str) -> float:
        return float(np.max([_mean(table, row, k("rus", f"unique_{m}")) for m in "abc"]))

    def u_min(row: str) -> float:
        return float(np.min([_mean(table, row, k("rus", f"unique_{m}")) for m in "abc"]))

    add("cross: redundancy high, uniqueness and synergy near chance", [
        ("R", _mean(table, "cross", k("rus", "redundancy")), ">=", t["high"]),
        ("max U", u_max("cross"), "<=", t["near_chance"]),
        ("S", _mean(table, "cross", k("rus", "synergy")), "<=", t["near_chance"]),
    ], ["cross"])
    add("cross_self: uniqueness recovered, synergy near chance", [
        ("min U", u_min("cross_self"), ">=", t["recovered"]),
        ("S", _mean(table, "cross_self", k("rus", "synergy")), "<=", t["near_chance"]),
    ], ["cross_self"])
    add("comm (transformer fusion): redundancy, uniqueness and synergy clearly above chance", [
        ("R", _mean(table, "comm", k("rus", "redundancy")), ">=", t["above_chance"]),
        ("min U", u_min("comm"), ">=", t["above_chance"]),
        ("S", _mean(table, "comm", k("rus", "synergy")), ">=", t["above_chance"]),
    ], ["comm"])
    s_comm = _mean(table, "comm", k("rus", "synergy"))
    for row, what in (("comm_linear", "linear fusion (CoMM's ablation)"),
                      ("comm_concat", "mmcl's concat fusion (an MLP)")):
        add(f"comm with {what}: synergy drops", [
            (f"S(comm) - S({row})", s_comm - _mean(table, row, k("rus", "synergy")), ">=",
             t["margin"]),
        ], ["comm", row])
    fs, fu1, fu2 = (_mean(table, "factorcl_ssl", k("factorcl", c))
                    for c in ("y_shared", "y_unique1", "y_unique2"))
    cu = np.mean([_mean(table, "cross", k("factorcl", c)) for c in ("y_unique1", "y_unique2")])
    add("factorcl_ssl on factorcl: shared and unique recovered, unique clearly above cross", [
        ("shared", fs, ">=", t["recovered"]),
        ("min(U_1, U_2)", min(fu1, fu2), ">=", t["recovered"]),
        ("mean U - cross mean U", (fu1 + fu2) / 2 - cu, ">=", t["margin"]),
    ], ["factorcl_ssl", "cross"])
    if "factorcl_hard" in settings.presets:
        z1, z2 = (_part_mean(sub, "factorcl_ssl", z, k("factorcl_hard", c))
                  for z, c in (("Z_U1", "y_unique1"), ("Z_U2", "y_unique2")))
        cross_hard = np.mean([_mean(table, "cross", k("factorcl_hard", c))
                              for c in ("y_unique1", "y_unique2")])
        add("factorcl_ssl on factorcl_hard: Z_U1, Z_U2 hold their unique blocks clearly above "
            "cross", [
                ("mean(Z_U1 on U_1, Z_U2 on U_2) - cross mean U", (z1 + z2) / 2 - cross_hard,
                 ">=", t["margin"]),
            ], ["factorcl_ssl", "cross"])
    if "many" in settings.presets:
        key = k("many", "y")
        for row in MANY_ROWS:
            best = max((c[key]["mean"] for c in per_modality.get(row, {}).values()),
                       default=float("nan"))
            add(f"{row} on many: the fused embedding keeps its best modality's class "
                "information", [
                    ("fused - best emb:m", _mean(table, row, key) - best, ">=", -t["keeps"]),
                ], [row])
    key = k("weak", "weak_factor")
    gain = _mean(table, "tuple_infonce", key) - _mean(table, "tuple", key)
    spread = max(_std(table, "tuple_infonce", key), _std(table, "tuple", key))
    add("tuple_infonce vs tuple on weak: higher accuracy on the weak factor, equal budget", [
        ("weak(tuple_infonce) - weak(tuple)", gain, ">=", max(t["weak_margin"], spread)),
    ], ["tuple_infonce", "tuple"])
    return out


# ---------------------------------------------------------------------------- outputs


def cell_text(cell: dict) -> str:
    if "na" in cell:
        return "n/a"
    if cell.get("n", 0) == 0:
        return "error" if cell.get("errors") else "–"
    text = f"{cell['mean']:.3f}"
    if cell["n"] > 1:
        text += f" ± {cell['std']:.3f}"
    if cell.get("errors"):
        text += f" ({len(cell['errors'])} failed)"
    return text


def _short_names() -> dict[str, str]:
    return {column_key(p, c): f"{p}: {s}" for p, c, s, _ in COLUMNS}


def to_markdown(report: dict) -> str:
    from mmcl.bench.env import describe

    settings = report["settings"]
    table = report["table"]
    keys = report["columns"]
    names = _short_names()
    lines = ["# mmcl bench fidelity: what each objective learns", ""]
    if report["mode"] == "quick":
        lines += [f"**Quick mode: a smoke test** ({settings['n']} tuples, {settings['epochs']} "
                  f"epochs, a small model, one L2 strength): every row and column, but the "
                  f"numbers are not meaningful; run `mmcl bench fidelity` for them.", ""]
    lines.append(f"Command: `{report['command']}`  ")
    lines.append(f"Machine: {describe(report['machine'])}  ")
    lines.append(f"Wall time: {report['elapsed_s'] / 60:.1f} min ({report['mode']}; "
                 f"{len(settings['seeds'])} seed(s) {settings['seeds']}; load average "
                 f"{report['machine']['load_average']} at start, "
                 f"{report.get('machine_end', {}).get('load_average')} at the end)  ")
    lines.append(f"Training: {settings['training']}; {settings['threads']} torch thread(s).  ")
    lines.append(f"Budget (every row): n={settings['n']} tuples per data set (80/10/10), "
                 f"{settings['epochs']} epochs, batch {settings['batch_size']}, "
                 f"{settings['optimizer']} lr {settings['lr']} wd {settings['weight_decay']}; "
                 f"model overrides {settings['model'] or 'none (mmcl defaults)'}; augment "
                 f"overrides {settings['augment'] or 'none (mmcl defaults)'}; per data set "
                 f"{settings['preset_overrides']}; per objective "
                 f"{settings['objective_overrides']}.  ")
    if any(k.startswith("rus:") for k in keys):
        lines.append(f"rus pretraining: {settings['rus_pretrain_note']}.  ")
    if any(k.startswith("trifeature:") for k in keys):
        lines.append(f"trifeature: {settings['image_size']}x{settings['image_size']} renders; "
                     f"pretraining {settings['trifeature_pretrain_note']}.  ")
    lines.append(f"Probe: {settings['probe']}; L2 grid {settings['l2_grid']}.  ")
    for key, rows in settings.get("probe_rows", {}).items():   # absent in older reports
        lines.append(f"{key} probed on {rows} (PROBE_ROWS).  ")
    chance = ("chance 0.5; trifeature's shape and textures: 10 classes, chance 0.1"
              if any(k.startswith("trifeature:") for k in keys) else "chance 0.5")
    seeds = ("seed s: training seed s on one data set, data seed "
             f"{TRIFEATURE_DATA_SEED}" if any(k.startswith("trifeature:") for k in keys) else
             "seed s: data set seed s and training seed s")
    lines.append(f"Cells: balanced accuracy on the test split ({chance}), mean ± sample std "
                 f"over seeds ({seeds}).")
    lines.append("")
    lines += table_lines(["row", *[names[k] for k in keys]],
                         [[f"*{row}*" if row in REFERENCES else row,
                           *[cell_text(cells[k]) for k in keys]] for row, cells in table.items()],
                         align="l" + "r" * len(keys))
    lines += comm_comparison(table)
    lines.append("")
    lines.append("## Targets")
    lines.append("")
    marks = {True: "met", False: "NOT MET", None: "not run"}
    lines += table_lines(["target", "met", "numbers"],
                         [[t["target"], marks[t["met"]], t["detail"]] for t in report["targets"]],
                         align="lc")
    lines.append("")
    lines.append(f"Thresholds (balanced accuracy): {report['thresholds']}")
    lines.append("")
    lines.append("## Rows and columns")
    lines.append("")
    for m in METHODS:
        if m.name in table:
            extra = f" {m.note}." if m.note else ""
            over = " ".join(m.overrides)
            lines.append(f"- **{m.name}**: objective `{m.objective}`"
                         f"{f' with `{over}`' if over else ''} ({m.kind}).{extra}")
    for ref, note in REFERENCE_NOTES.items():
        lines.append(f"- *{ref}*: {note}.")
    for p, c, s, d in COLUMNS:
        if column_key(p, c) in keys:
            lines.append(f"- `{p}: {s}` = column `{c}` of `mmcl data synth --preset {p}`: {d}.")
    lines.append("")
    lines.append("Representation probed: `objective.embed` (the fused pre-projection embedding "
                 "for tuple/tuple_infonce/comm/supcon; the concatenated modality embeddings for "
                 "cross/cross_self; the concatenated head outputs for FactorCL).")
    lines += part_tables_markdown(report)
    if report.get("plot"):
        lines.append("")
        lines.append(f"Plot: {report['plot']}")
    elif report.get("plot_skipped"):
        lines.append("")
        lines.append(f"Plot: {report['plot_skipped']}")
    failed = [r for r in report["runs"] if "error" in r]
    if failed:
        lines.append("")
        lines.append("Failed runs: " + "; ".join(
            f"{r['row']} on {r['preset']} seed {r['seed']}: {r['error']}" for r in failed))
    return "\n".join(lines) + "\n"


def comm_comparison(table: dict) -> list[str]:
    """Markdown lines: the trifeature rows beside CoMM's own table (accuracy %; U = mean of
    the two texture probes); nothing when trifeature did not run."""
    key = column_key
    if not any(key("trifeature", "shape") in cells for cells in table.values()):
        return []

    def pct(row: str, cols: Sequence[str]) -> str:
        cells = [table.get(row, {}).get(key("trifeature", c), {}) for c in cols]
        if not cells or any(c.get("mean") is None for c in cells):
            return "–"
        mean = 100 * float(np.mean([c["mean"] for c in cells]))
        std = 100 * float(np.mean([c.get("std") or 0.0 for c in cells]))
        return f"{mean:.1f} ± {std:.1f}" if len(cells) and cells[0].get("n", 0) > 1 \
            else f"{mean:.1f}"

    rows = []
    for row in ("cross", "cross_self", "comm", "comm_linear", "tuple", "tuple_infonce",
                "factorcl_ssl"):
        if row not in table:
            continue
        paper = COMM_PAPER.get(row, {})
        ours = [pct(row, ["shape"]), pct(row, ["texture1", "texture2"]), pct(row, ["synergy"])]
        theirs = [f"{paper[c]:.1f}" if c in paper else "–" for c in "RUS"]
        rows.append([row, ours[0], theirs[0], ours[1], theirs[1], ours[2], theirs[2]])
    lines = ["", "### Beside CoMM's table (bimodal Trifeature, linear probe accuracy %)", ""]
    lines += table_lines(["row", "R (mmcl)", "R (CoMM)", "U (mmcl)", "U (CoMM)", "S (mmcl)",
                          "S (CoMM)"], rows, align="lrrrrrr")
    lines.append("")
    lines.append("mmcl: balanced accuracy % on the test pairs (U: mean of the texture1 and "
                 "texture2 probes, ± the mean of their stds). CoMM: Dufumier et al. 2024, "
                 "AlexNet encoders on 224x224 renders, 100 epochs; CoMM's own rows are Cross "
                 "(CLIP-style cross-modal), Cross+Self and CoMM, and its linear-fusion "
                 "ablation.")
    return lines


def part_tables_markdown(report: dict) -> list[str]:
    """The sub-representation table (FactorCL's Z_S, Z_U1, Z_U2 probed alone), the
    per-modality embedding table and the few-label table, where the run has them."""
    names = _short_names()
    lines: list[str] = []
    for title, group in (("Sub-representations (each probed alone)", "sub_table"),
                         ("Each modality's own embedding (emb:m)", "modality_table")):
        parts = report.get(group) or {}
        if not parts:
            continue
        keys = sorted({k for p in parts.values() for c in p.values() for k in c},
                      key=report["columns"].index)
        lines += ["", f"## {title}", ""] + table_lines(
            ["row", "part", *[names[k] for k in keys]],
            [[row, part, *[cell_text(cells[k]) if k in cells else "–" for k in keys]]
             for row, by_part in parts.items() for part, cells in by_part.items()],
            align="ll" + "r" * len(keys))
    few = report.get("few_label_table") or {}
    if few:
        keys = sorted({k for cells in few.values() for k in cells})
        lines += ["", "## Few-label probes (k labelled rows per class; fused / raw:all)", ""]
        lines += table_lines(["row", *keys],
                             [[row, *[cell_text(cells[k]) if k in cells else "–" for k in keys]]
                              for row, cells in few.items()], align="l" + "r" * len(keys))
    return lines


def plot(report: dict, path: str) -> str | None:
    """Grouped bars (x: columns, bars: rows, error bars: std over seeds) with the machine,
    versions, settings and wall time written under the axes."""
    plt = agg_pyplot()

    from mmcl.bench.env import describe

    table, keys = report["table"], report["columns"]
    rows = list(table)
    names = _short_names()
    fig, ax = plt.subplots(figsize=(max(10.0, 1.3 * len(keys) + 3), 6.2))
    x = np.arange(len(keys))
    width = 0.85 / max(1, len(rows))
    cmap = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        means = [table[row][k].get("mean", np.nan) if "na" not in table[row][k] else np.nan
                 for k in keys]
        means = [np.nan if v is None else v for v in means]
        errs = [table[row][k].get("std") or 0.0 for k in keys]
        style = {"hatch": "//", "edgecolor": "black", "linewidth": 0.3} \
            if row in REFERENCES else {}
        color = "lightgrey" if row == RAW else "dimgrey" if row == RANDOM else cmap(i % 10)
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=errs, capsize=1.5,
               label=row, color=color, error_kw={"linewidth": 0.6}, **style)
    ax.axhline(CHANCE, color="black", lw=0.7, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([names[k] for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0.0 if any(k.startswith("trifeature:") for k in keys) else 0.3, 1.02)
    ax.set_ylabel("balanced accuracy (test), chance 0.5")
    fig.suptitle(f"mmcl bench fidelity ({report['mode']}): linear probe of each factor, "
                 f"mean ± std over {len(report['settings']['seeds'])} seed(s)", fontsize=10,
                 y=0.99)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=len(rows), loc="upper center",
               bbox_to_anchor=(0.5, 0.945), frameon=False, handlelength=1.2,
               columnspacing=0.9)
    s = report["settings"]
    footer = (f"{describe(report['machine'])}\n"
              f"wall {report['elapsed_s'] / 60:.1f} min; n={s['n']}, epochs={s['epochs']}, "
              f"batch={s['batch_size']}, {s['optimizer']} lr={s['lr']}, seeds={s['seeds']}, "
              f"{s['threads']} torch thread(s); training in process (mmcl.train.local, same "
              f"Engine as the Ray workers, no Ray)")
    fig.text(0.01, 0.005, footer, fontsize=6.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.07, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- main


def run_fidelity(quick: bool = False, seeds: int | None = None, out: str | None = None,
                 settings: Settings | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                 preset: str | None = None) -> dict:
    """Run the bench; write OUT/fidelity.json, OUT/fidelity.md, OUT/fidelity.png and
    OUT/runs.jsonl; return the report (with "_out"). preset="trifeature": CoMM's bimodal
    Trifeature table (Settings.trifeature) instead of the vector presets."""
    from mmcl.bench.env import load_average, machine

    if preset not in (None, *IMAGE_PRESETS):
        raise ValueError(f"unknown --preset {preset!r}; choose from {list(IMAGE_PRESETS)} "
                         "(without --preset: the vector presets)")
    if settings is None and preset == "trifeature":
        settings = Settings.trifeature(quick)
    if settings is None:
        settings = Settings.quick() if quick else Settings()
    if seeds is not None:
        if seeds < 1:
            raise ValueError("--seeds must be >= 1")
        settings = replace(settings, seeds=tuple(range(int(seeds))))
    unknown = sorted(set(settings.presets) - set(PRESETS) - set(IMAGE_PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from "
                         f"{[*PRESETS, *IMAGE_PRESETS]}")
    for name in settings.methods:
        method(name)
    name = "fidelity" + (f"-{preset}" if preset else "") + ("-quick" if quick else "")
    out = out or os.path.join("runs", "bench", name)
    os.makedirs(out, exist_ok=True)
    command = "mmcl bench fidelity" + (f" --preset {preset}" if preset else "") + \
        (" --quick" if quick else "") + \
        (f" --seeds {len(settings.seeds)}" if seeds is not None else "")
    start = time.perf_counter()
    report: dict = {"mode": settings.mode, "command": command, "machine": machine(),
                    "settings": settings.to_dict(),
                    "thresholds": dict(TRIFEATURE_THRESHOLDS) if preset else
                    dict(TARGET_THRESHOLDS)}
    runs: list[dict] = []
    jsonl = os.path.join(out, "runs.jsonl")
    with open(jsonl, "w") as sink, torch_threads(settings.threads):
        def record(entry: dict) -> None:
            runs.append(entry)
            sink.write(json.dumps(entry, default=json_default) + "\n")
            sink.flush()

        log(f"[fidelity] {settings.mode}: {len(settings.seeds)} seed(s) x "
            f"{len(settings.presets)} data sets x {len(settings.methods)} objectives + "
            f"{len(REFERENCES)} references; training in process (no Ray) -> {out}")
        for seed in settings.seeds:
            for data in settings.presets:
                run_preset(data, seed, settings, log, record,
                           data_dir=os.path.join(out, "data"))
    report["machine_end"] = {"load_average": load_average()}
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    report["columns"] = column_keys(settings)
    report["column_names"] = _short_names()
    report["table"] = aggregate(runs, settings)
    report["sub_table"] = aggregate_parts(runs, "sub_scores")
    report["modality_table"] = aggregate_parts(runs, "modality_scores")
    report["few_label_table"] = aggregate_few_label(runs)
    report["targets"] = check_targets(report["table"], settings, report["sub_table"],
                                      report["modality_table"])
    if preset is None:  # the vector bench also runs issue 33's regression case
        with torch_threads(settings.threads):
            case = digits2_case(settings, log)
        report["cases"] = {DIGITS2: case}
        if case["met"] is not None:
            report["targets"].append({
                "target": f"factorcl_ssl at mmcl's defaults on {DIGITS2} (two real-valued "
                          f"views, issue 33): label >= {DIGITS2_TARGET}",
                "met": case["met"], "detail": f"label {case['mean']:.3f} "
                f"(seeds {', '.join(f'{v:.3f}' for v in case['scores'])})"})
    report["runs"] = runs
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report["plot"] = None
        report["plot_skipped"] = ("matplotlib is not installed, so no PNG was made (pip "
                                  "install 'mmcl[plot]'); the table is in fidelity.md")
    else:
        try:
            report["plot"] = plot(report, os.path.join(out, "fidelity.png"))
        except Exception as err:  # noqa: BLE001 - the table matters more than the figure
            report["plot"] = None
            report["plot_skipped"] = f"the PNG failed ({type(err).__name__}: {err})"
    with open(os.path.join(out, "fidelity.json"), "w") as f:
        json.dump(report, f, indent=2, default=json_default)
    with open(os.path.join(out, "fidelity.md"), "w") as f:
        f.write(to_markdown(report))
    report["_out"] = out
    return report


def render(out: str) -> dict:
    """Rewrite OUT/fidelity.md (and the PNG) from OUT/fidelity.json, e.g. after the report
    format changed; the numbers are not recomputed."""
    with open(os.path.join(out, "fidelity.json")) as f:
        report = json.load(f)
    try:
        report["plot"] = plot(report, os.path.join(out, "fidelity.png"))
    except ImportError:
        pass
    with open(os.path.join(out, "fidelity.md"), "w") as f:
        f.write(to_markdown(report))
    return report


__all__ = ["run_fidelity", "render", "Settings", "METHODS", "COLUMNS", "check_targets", "aggregate"]
