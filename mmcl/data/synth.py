"""Controlled data sets (`mmcl data synth`): vectors whose information structure is known.

Every preset draws latent factors ~ N(0, 1), maps each modality's latents to its features with a
fixed random linear map (drawn from the seed) plus Gaussian noise, and writes the labels and the
true latent factors as columns (role "label" / "factor", `carried_by` naming the modalities
that hold each one), so probes can measure how much of each an embedding keeps.

factorcl   x1 = T1 [w_1, w_s] + noise, x2 = T2 [w_2, w_s] + noise (FactorCL's synthetic set).
           Blocks w_s (shared), w_1, w_2 (unique) have 4 dims; only their first coordinates
           (factors `shared`, `unique1`, `unique2`) decide the labels:
             y         = [shared + unique1 + unique2 > 0]   (the mix: shared and both uniques)
             y_shared  = [shared > 0]     y_unique1 = [unique1 > 0]     y_unique2 = [unique2 > 0]
rus        modalities a, b, c. Factors z_redundancy (in a, b and c), z_unique_a/b/c (each in its
           own modality only), z_synergy_a (in a only), z_synergy_b (in b only), plus 2 private
           nuisance dims per modality. Binary columns:
             redundancy = [z_redundancy > 0]     unique_m = [z_unique_m > 0]
             synergy_a  = [z_synergy_a > 0]      synergy_b = [z_synergy_b > 0]
             synergy    = synergy_a XOR synergy_b   (neither a nor b alone predicts it)
             y          = [redundancy + unique_a + unique_b + unique_c + synergy >= 3]
                          (majority of the five: every kind of information matters)
factorcl_hard  FactorCL's synthetic set made as hard as its paper's: blocks w_s (10 dims), w_1, w_2
           (6 dims each; FactorCL's code) and a private distractor block d_i (16 dims, std 2,
           task-irrelevant) enter each modality through a fixed random non-linear map,
             x_i = tanh(2 [w_i, w_s, d_i] A_i) B_i + noise   (A_i: 32 x 128, B_i: 128 x 100),
           so no block is a linear function of x_i any more (a linear probe on raw x_i reads
           the first coordinates' signs at ~0.85-0.9, not 0.97). Labels as `factorcl`.
many       six views v1..v6 of the same objects (a multi-feature data set: six feature sets of
           one object, standardised). An object's latent z (8 dims) is its class prototype
           (10 classes) plus object-level variation; view m = a linear map of
           [z + s_m e_m, p_m] + noise, with e_m view noise of its own level s_m (0.3 ... 2.4,
           drawn once per object: a clean view and increasingly noisy ones) and p_m 4 private
           nuisance dims of the view (variance 4, class-irrelevant, different in every view).
             y = the class (10 classes)
weak       strong modalities a, b (noise std 0.1) carry z_shared; the weak modality (32
           features, noise std 1.0, signal amplitude 2.5 spread over all features) carries
           z_shared and z_weak, which no other modality holds.
             shared = [z_shared > 0]     weak_factor = [z_weak > 0]
             y      = [z_shared + z_weak > 0]
trifeature CoMM's bimodal Trifeature images (mmcl.data.trifeature): pairs of 32x32 renders
           sharing the shape, each with its own texture; synergy = (texture of image 1, colour
           of image 2) is one of 10 fixed random pairs. Written as PNG files + a CSV table
           and then imported with `mmcl data import` (the real-file path), not from arrays.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from mmcl.data.schema import ID_COLUMN, DataError, LabelSpec, Manifest, ModalitySpec
from mmcl.data.shards import write_dataset

Arrays = dict[str, np.ndarray]
STRONG_NOISE = 0.1   # noise std of ordinary modalities (features have variance ~1)
WEAK_NOISE = 1.0     # noise std of the weak modality's features
WEAK_SIGNAL = 2.5    # norm of the weak modality's signal direction per unit of a factor
# factorcl_hard: FactorCL's block sizes (its synthetic_example: w_s 10, w_1 = w_2 = 6 dims),
# mapped into its 100 features, with distractors and a saturating non-linearity.
HARD_BLOCKS = {"shared": 10, "unique": 6, "distractor": 16}
HARD_DISTRACTOR_STD = 2.0
HARD_GAIN, HARD_HIDDEN, HARD_DIM = 2.0, 128, 100
# many: per-view noise levels (view m's latent noise std), feature sizes and private nuisance.
MANY_NOISE = (0.3, 0.5, 0.8, 1.2, 1.7, 2.4)
MANY_DIMS = (16, 24, 32, 16, 24, 32)
MANY_CLASSES, MANY_LATENT, MANY_PRIVATE, MANY_PRIVATE_STD = 10, 8, 4, 2.0


# ------------------------------------------------------------------------------ helpers


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(generator of the fixed maps, generator of the samples), both derived from `seed`."""
    return np.random.default_rng([int(seed), 0]), np.random.default_rng([int(seed), 1])


def _mix(latent: np.ndarray, dim: int, noise: float, maps: np.random.Generator,
         rng: np.random.Generator) -> np.ndarray:
    """latent (n, k) @ T (k, dim) + noise; T ~ N(0, 1/k) so features have variance ~1."""
    k = latent.shape[1]
    t = maps.normal(0.0, 1.0 / np.sqrt(k), size=(k, dim))
    x = latent @ t + noise * rng.normal(size=(len(latent), dim))
    return x.astype(np.float32)


def _bit(values: np.ndarray) -> np.ndarray:
    return (values > 0).astype(np.int64)


def _cls(name: str, carried_by: Sequence[str], description: str,
         role: str = "label") -> LabelSpec:
    return LabelSpec(name, "classification", 2, role, tuple(carried_by), description)


def _factor(name: str, carried_by: Sequence[str], description: str) -> LabelSpec:
    return LabelSpec(name, "regression", None, "factor", tuple(carried_by), description)


# ------------------------------------------------------------------------------ presets


def _factorcl(n: int, seed: int) -> tuple[Manifest, Arrays]:
    maps, rng = _rngs(seed)
    block, dim = 4, 24
    ws, w1, w2 = (rng.normal(size=(n, block)) for _ in range(3))
    x1 = _mix(np.concatenate([w1, ws], axis=1), dim, STRONG_NOISE, maps, rng)
    x2 = _mix(np.concatenate([w2, ws], axis=1), dim, STRONG_NOISE, maps, rng)
    manifest, arrays = _factorcl_labels(ws[:, 0], w1[:, 0], w2[:, 0], dim)
    arrays.update(x1=x1, x2=x2)
    manifest.description = ("factorcl: shared block w_s and unique blocks w_1, w_2 (4 dims "
                            "each) mapped linearly into x1, x2 (24 features)")
    return manifest, arrays


def _factorcl_labels(s: np.ndarray, u1: np.ndarray, u2: np.ndarray, dim: int
                     ) -> tuple[Manifest, Arrays]:
    """FactorCL's labels from the first coordinates of w_s, w_1, w_2 (x1, x2 still to add)."""
    both = ("x1", "x2")
    labels = [
        _cls("y", both, "[shared + unique1 + unique2 > 0]: needs shared and both unique blocks"),
        _cls("y_shared", both, "[shared > 0]: shared information only"),
        _cls("y_unique1", ("x1",), "[unique1 > 0]: information unique to x1"),
        _cls("y_unique2", ("x2",), "[unique2 > 0]: information unique to x2"),
        _factor("shared", both, "first coordinate of the shared block w_s"),
        _factor("unique1", ("x1",), "first coordinate of x1's unique block w_1"),
        _factor("unique2", ("x2",), "first coordinate of x2's unique block w_2"),
    ]
    arrays = {"y": _bit(s + u1 + u2), "y_shared": _bit(s),
              "y_unique1": _bit(u1), "y_unique2": _bit(u2), "shared": s, "unique1": u1,
              "unique2": u2}
    mods = [ModalitySpec("x1", (dim,)), ModalitySpec("x2", (dim,))]
    return Manifest(mods, labels), arrays


def _rus(n: int, seed: int) -> tuple[Manifest, Arrays]:
    maps, rng = _rngs(seed)
    dim, nuisance = 16, 2
    z = {k: rng.normal(size=n) for k in ("redundancy", "unique_a", "unique_b", "unique_c",
                                          "synergy_a", "synergy_b")}
    own = {"a": ["unique_a", "synergy_a"], "b": ["unique_b", "synergy_b"], "c": ["unique_c"]}
    arrays: Arrays = {}
    for m, names in own.items():
        latent = np.stack([z["redundancy"], *[z[k] for k in names]], axis=1)
        latent = np.concatenate([latent, rng.normal(size=(n, nuisance))], axis=1)
        arrays[m] = _mix(latent, dim, STRONG_NOISE, maps, rng)
    bits = {k: _bit(v) for k, v in z.items()}
    synergy = bits["synergy_a"] ^ bits["synergy_b"]
    votes = (bits["redundancy"] + bits["unique_a"] + bits["unique_b"] + bits["unique_c"]
             + synergy)
    arrays.update(y=(votes >= 3).astype(np.int64), redundancy=bits["redundancy"],
                  unique_a=bits["unique_a"], unique_b=bits["unique_b"],
                  unique_c=bits["unique_c"], synergy=synergy, synergy_a=bits["synergy_a"],
                  synergy_b=bits["synergy_b"])
    arrays.update({f"z_{k}": v for k, v in z.items()})
    labels = [
        _cls("y", "abc", "[redundancy + unique_a + unique_b + unique_c + synergy >= 3]"),
        _cls("redundancy", "abc", "[z_redundancy > 0]: carried by every modality"),
        *[_cls(f"unique_{m}", m, f"[z_unique_{m} > 0]: carried by {m} only") for m in "abc"],
        _cls("synergy", "ab", "synergy_a XOR synergy_b: needs a and b together"),
        _cls("synergy_a", "a", "[z_synergy_a > 0]", role="factor"),
        _cls("synergy_b", "b", "[z_synergy_b > 0]", role="factor"),
        _factor("z_redundancy", "abc", "latent shared by every modality"),
        *[_factor(f"z_unique_{m}", m, f"latent of {m} only") for m in "abc"],
        _factor("z_synergy_a", "a", "latent of a whose sign enters the synergy"),
        _factor("z_synergy_b", "b", "latent of b whose sign enters the synergy"),
    ]
    mods = [ModalitySpec(m, (dim,)) for m in "abc"]
    return Manifest(mods, labels, description="rus: redundancy (a, b, c), uniqueness (one "
                    "factor per modality), synergy (XOR of a bit of a and a bit of b)"), arrays


def _weak(n: int, seed: int) -> tuple[Manifest, Arrays]:
    maps, rng = _rngs(seed)
    dim, weak_dim, nuisance = 16, 32, 3
    zs, zw = rng.normal(size=n), rng.normal(size=n)
    arrays: Arrays = {}
    for m in ("a", "b"):
        latent = np.concatenate([zs[:, None], rng.normal(size=(n, nuisance))], axis=1)
        arrays[m] = _mix(latent, dim, STRONG_NOISE, maps, rng)
    directions, _ = np.linalg.qr(maps.normal(size=(weak_dim, 2)))  # orthonormal columns
    signal = WEAK_SIGNAL * np.stack([zw, zs], axis=1) @ directions.T
    arrays["weak"] = (signal + WEAK_NOISE * rng.normal(size=(n, weak_dim))).astype(np.float32)
    arrays.update(y=_bit(zs + zw), shared=_bit(zs), weak_factor=_bit(zw), z_shared=zs,
                  z_weak=zw)
    everyone = ("a", "b", "weak")
    labels = [
        _cls("y", everyone, "[z_shared + z_weak > 0]: needs the weak modality"),
        _cls("shared", everyone, "[z_shared > 0]: carried by every modality"),
        _cls("weak_factor", ("weak",), "[z_weak > 0]: carried by the weak modality only"),
        _factor("z_shared", everyone, "latent shared by every modality"),
        _factor("z_weak", ("weak",), "latent of the weak modality only"),
    ]
    mods = [ModalitySpec("a", (dim,)), ModalitySpec("b", (dim,)),
            ModalitySpec("weak", (weak_dim,))]
    return Manifest(mods, labels, description=(
        f"weak: strong modalities a, b (noise {STRONG_NOISE}) and a weak one (noise "
        f"{WEAK_NOISE}, signal {WEAK_SIGNAL} over {weak_dim} features) that alone carries "
        "z_weak")), arrays


def _nonlinear_mix(latent: np.ndarray, maps: np.random.Generator, rng: np.random.Generator
                   ) -> np.ndarray:
    """tanh(HARD_GAIN * latent @ A) @ B + noise: a fixed random one-hidden-layer network
    (A ~ N(0, 1/k), B ~ N(0, 1/hidden)) whose tanh saturates, into HARD_DIM features."""
    k = latent.shape[1]
    a = maps.normal(0.0, 1.0 / np.sqrt(k), size=(k, HARD_HIDDEN))
    b = maps.normal(0.0, 1.0 / np.sqrt(HARD_HIDDEN), size=(HARD_HIDDEN, HARD_DIM))
    x = np.tanh(HARD_GAIN * latent @ a) @ b
    return (x + STRONG_NOISE * rng.normal(size=x.shape)).astype(np.float32)


def _factorcl_hard(n: int, seed: int) -> tuple[Manifest, Arrays]:
    maps, rng = _rngs(seed)
    sizes = HARD_BLOCKS
    ws = rng.normal(size=(n, sizes["shared"]))
    w1, w2 = (rng.normal(size=(n, sizes["unique"])) for _ in range(2))
    d1, d2 = (HARD_DISTRACTOR_STD * rng.normal(size=(n, sizes["distractor"]))
              for _ in range(2))
    x1 = _nonlinear_mix(np.concatenate([w1, ws, d1], axis=1), maps, rng)
    x2 = _nonlinear_mix(np.concatenate([w2, ws, d2], axis=1), maps, rng)
    manifest, arrays = _factorcl_labels(ws[:, 0], w1[:, 0], w2[:, 0], HARD_DIM)
    arrays.update(x1=x1, x2=x2)
    manifest.description = (
        f"factorcl_hard: shared block w_s ({sizes['shared']} dims), unique blocks w_1, w_2 "
        f"({sizes['unique']} dims) and private distractors ({sizes['distractor']} dims, std "
        f"{HARD_DISTRACTOR_STD}) through a fixed random tanh network into x1, x2 "
        f"({HARD_DIM} features)")
    return manifest, arrays


def _many(n: int, seed: int) -> tuple[Manifest, Arrays]:
    maps, rng = _rngs(seed)
    prototypes = maps.normal(size=(MANY_CLASSES, MANY_LATENT))
    y = rng.integers(0, MANY_CLASSES, size=n)
    z = prototypes[y] + 0.5 * rng.normal(size=(n, MANY_LATENT))
    views = [f"v{i + 1}" for i in range(len(MANY_NOISE))]
    arrays: Arrays = {"y": y.astype(np.int64), "z_0": z[:, 0]}
    for view, noise, dim in zip(views, MANY_NOISE, MANY_DIMS):
        private = MANY_PRIVATE_STD * rng.normal(size=(n, MANY_PRIVATE))
        latent = np.concatenate([z + noise * rng.normal(size=z.shape), private], axis=1)
        arrays[view] = _mix(latent, dim, STRONG_NOISE, maps, rng)
    labels = [
        LabelSpec("y", "classification", MANY_CLASSES, "label", tuple(views),
                  "the object's class: carried by every view, with view noise "
                  + ", ".join(f"{v} {s}" for v, s in zip(views, MANY_NOISE))),
        _factor("z_0", views, "first coordinate of the object's latent (shared by every view)"),
    ]
    mods = [ModalitySpec(v, (d,)) for v, d in zip(views, MANY_DIMS)]
    return Manifest(mods, labels, description=(
        f"many: {len(views)} views of the same objects ({MANY_CLASSES} classes), view noise "
        f"{MANY_NOISE}, {MANY_PRIVATE} private nuisance dims (std {MANY_PRIVATE_STD}) per view")
    ), arrays


PRESETS: dict[str, Callable[[int, int], tuple[Manifest, Arrays]]] = {
    "factorcl": _factorcl, "rus": _rus, "weak": _weak}
PRESETS.update(factorcl_hard=_factorcl_hard, many=_many)


# ------------------------------------------------------------------------------- public


def make_arrays(preset: str, n: int, seed: int = 0) -> tuple[Manifest, Arrays]:
    """(manifest without split counts, all n rows as {column: array}) of a preset: `id`
    0..n-1, modalities float32, classification columns int64, factors float32."""
    if preset not in PRESETS:
        raise DataError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    manifest, arrays = PRESETS[preset](int(n), int(seed))
    out = {ID_COLUMN: np.arange(n, dtype=np.int64)}
    for m in manifest.modalities:
        out[m.name] = np.ascontiguousarray(arrays[m.name], dtype=np.float32)
    for lab in manifest.labels:
        dtype = np.int64 if lab.task == "classification" else np.float32
        out[lab.name] = arrays[lab.name].astype(dtype)
    return manifest, out


def generate(preset: str, out: str, n: int = 4096, seed: int = 0, overwrite: bool = False,
             split: Sequence[float] = (0.8, 0.1, 0.1), endpoint_url: str | None = None,
             region: str | None = None, image_size: int = 32,
             source: str | None = None) -> Manifest:
    """Write preset `preset` (n tuples, seeded) as a data set at `out` with a seeded random
    train/val/test split; returns the manifest with row counts. `trifeature` has its own
    split (mmcl.data.trifeature.SPLIT_FRACTIONS) and goes through files: see
    `generate_trifeature`."""
    from mmcl.data.convert import split_indices

    if preset == "trifeature":
        return generate_trifeature(out, n, seed, overwrite, image_size, source,
                                   endpoint_url, region)
    manifest, arrays = make_arrays(preset, n, seed)
    manifest.description += f" (n={n}, seed={seed})"
    splits = {name: {k: v[idx] for k, v in arrays.items()}
              for name, idx in split_indices(n, split, seed).items()}
    return write_dataset(out, manifest, splits, overwrite=overwrite, endpoint_url=endpoint_url,
                         region=region)


def trifeature_source(out: str) -> str:
    """Where `generate_trifeature` puts the PNG files and the table by default: next to a
    local output (`<out>-source`), in a temporary folder for a remote one."""
    from mmcl import storage

    return "" if storage.is_remote(out) else out.rstrip("/") + "-source"


def generate_trifeature(out: str, n: int = 6000, seed: int = 0, overwrite: bool = False,
                        image_size: int = 32, source: str | None = None,
                        endpoint_url: str | None = None, region: str | None = None,
                        address: str | None = None) -> Manifest:
    """Render the bimodal Trifeature pairs as PNG files + a CSV table in `source` (default
    `trifeature_source(out)`), then build the data set at `out` with `mmcl data import`
    (mmcl.data.ingest.import_table on Ray: the path a user's own image files take)."""
    import shutil
    import tempfile

    from mmcl.data.ingest import load_spec, import_table
    from mmcl.data.trifeature import IMPORT_SPEC, write_trifeature

    if image_size < 16:
        raise DataError(f"--image-size must be at least 16 for trifeature, got {image_size}")
    if n < 64:
        raise DataError(f"trifeature needs at least 64 pairs, got {n}")
    folder = source or trifeature_source(out)
    temporary = not folder
    if temporary:
        folder = tempfile.mkdtemp(prefix="mmcl-trifeature-")
    elif os.path.isdir(folder) and os.listdir(folder):
        if not overwrite:
            raise DataError(f"{folder} (the trifeature image files) already exists and is not "
                            "empty; pass --overwrite to replace it")
        shutil.rmtree(folder)
    try:
        table = write_trifeature(folder, n, seed, image_size)
        spec = load_spec(os.path.join(folder, IMPORT_SPEC))
        spec = spec.model_copy(update={"description": f"{spec.description} (n={n}, "
                                       f"seed={seed}, {image_size}x{image_size})"})
        return import_table(table, out, spec, overwrite=overwrite, endpoint_url=endpoint_url,
                            region=region, address=address).manifest
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
