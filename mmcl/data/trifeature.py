"""Bimodal Trifeature (`mmcl data synth --preset trifeature`): CoMM's controlled image benchmark.

Trifeature (Hermann & Lampinen, NeurIPS 2020) draws images of 10 shapes x 10 textures x 10
colours; every render places the shape at a random position with a random rotation and
shifts the texture by a random phase, so no two renders of a triplet are the same picture.
Everything is drawn here, procedurally (numpy + Pillow); nothing is downloaded.

CoMM (Dufumier et al., 2024, section 4.1) turns it into a bimodal benchmark: a tuple is a pair
of images (modalities `image1`, `image2`) with

    redundancy   both images have the same shape           -> label `shape` (10 classes)
    uniqueness   each image has its own texture            -> labels `texture1`, `texture2`
    synergy      10 fixed random (texture, colour) pairs    -> label `synergy` (2 classes):
                 synergy = 1 when (texture of image 1, colour of image 2) is one of them

Colours and the other image's texture are drawn independently. CoMM pretrains on *biased*
pairs (every pair is a correlated one: colour 2 = pairing[texture 1], so the relation is a
dependence between the modalities a self-supervised objective can see) and probes on
*unbiased* pairs (any pair sharing the shape; synergy = 1 in about 1 of 10). Here the
unbiased pairs are correlated in a random half and not in the other half, so synergy is
balanced: mmcl's linear probe is unweighted, and on a 1-in-10 label it predicts the majority
class for every representation (docs/fidelity.md, the trifeature run). One data set holds
both: the `biased` column marks the pretraining pairs of the train split; the
probes fit on the train split's unbiased pairs and score on val/test, which are unbiased.

`write_trifeature(folder, ...)` writes the images as PNG files and a CSV table (the layout a
user's own image data has), plus the `mmcl data import` spec that reads it; `generate`
(mmcl.data.synth) then imports it, so the real-file path is what the benchmark exercises.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "plus", "diamond",
          "crescent", "arrow")
TEXTURES = ("solid", "hstripes", "vstripes", "diagonal", "checker", "dots", "grid", "rings",
            "waves", "noise")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.10), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10), "magenta": (0.90, 0.10, 0.90), "cyan": (0.10, 0.90, 0.90),
    "orange": (1.00, 0.55, 0.00), "purple": (0.50, 0.10, 0.70), "white": (1.00, 1.00, 1.00),
    "brown": (0.55, 0.30, 0.10)}
BACKGROUND = 0.5        # grey, between the dark and the bright texture of every colour
DARK = 0.3              # texture "off" pixels keep the colour at this brightness: the shape's
#                         outline and colour stay visible whatever the texture
MAX_ROTATION = 30.0     # degrees either way (a square does not turn into the diamond)
SUPERSAMPLE = 4         # the shape mask is drawn this much larger, then box-downsampled
LABELS = ("shape", "texture1", "texture2", "color1", "color2", "synergy", "biased")
SPLIT_FRACTIONS = {"train_biased": 0.5, "train_unbiased": 0.25, "val": 0.1, "test": 0.15}


# ------------------------------------------------------------------------------ drawing


def _polygon(kind: str) -> list[tuple[float, float]]:
    """Outline of a shape as points on the unit scale (radius ~1 around 0, y down)."""
    def ring(k: int, radius: float = 1.0, turn: float = -np.pi / 2) -> list:
        return [(radius * np.cos(turn + 2 * np.pi * i / k),
                 radius * np.sin(turn + 2 * np.pi * i / k)) for i in range(k)]

    if kind == "triangle":
        return ring(3)
    if kind == "square":
        return ring(4, turn=np.pi / 4)
    if kind == "pentagon":
        return ring(5)
    if kind == "hexagon":
        return ring(6)
    if kind == "star":
        outer, inner = ring(5), ring(5, 0.45, -np.pi / 2 + np.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "plus":
        a, b = 0.33, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if kind == "diamond":
        return [(0, -1.0), (0.55, 0), (0, 1.0), (-0.55, 0)]
    if kind == "arrow":
        return [(0, -1.0), (0.8, -0.1), (0.3, -0.1), (0.3, 1.0), (-0.3, 1.0), (-0.3, -0.1),
                (-0.8, -0.1)]
    raise ValueError(kind)


def shape_mask(shape: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float mask in [0, 1] of one shape at a random position and rotation."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    radius = 0.3 * big
    cx, cy = rng.uniform(radius + 1, big - radius - 1, size=2)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    kind = SHAPES[shape]
    if kind in ("circle", "crescent"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if kind == "crescent":  # a circle with a smaller one cut out, offset by the rotation
            off = rot @ np.array([0.45 * radius, -0.2 * radius])
            r2 = 0.8 * radius
            draw.ellipse([cx + off[0] - r2, cy + off[1] - r2, cx + off[0] + r2,
                          cy + off[1] + r2], fill=0)
    else:
        points = np.asarray(_polygon(kind)) @ rot.T * radius + (cx, cy)
        draw.polygon([tuple(p) for p in points], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def texture(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) pattern in {0, 1} with a random phase; periods scale with the image."""
    period = max(4, round(size / 8))
    dy, dx = rng.uniform(0, period, size=2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y, x = y + dy, x + dx
    half = period / 2
    name = TEXTURES[kind]
    if name == "solid":
        out = np.ones((size, size))
    elif name == "hstripes":
        out = (y % period) < half
    elif name == "vstripes":
        out = (x % period) < half
    elif name == "diagonal":
        out = ((x + y) % (1.5 * period)) < 0.75 * period
    elif name == "checker":
        out = ((x // half) + (y // half)) % 2 == 0
    elif name == "dots":
        out = ((x % period) - half) ** 2 + ((y % period) - half) ** 2 < (0.3 * period) ** 2
    elif name == "grid":
        out = ((x % period) < 1.2) | ((y % period) < 1.2)
    elif name == "rings":
        cy, cx = rng.uniform(0, size, size=2)
        out = (np.hypot(x - dx - cx, y - dy - cy) % period) < half
    elif name == "waves":
        out = ((y + 0.35 * period * np.sin(2 * np.pi * x / (1.5 * period))) % period) < half
    else:  # noise: random 2x2-pixel blocks, half of them on
        cells = rng.random(((size + 1) // 2, (size + 1) // 2)) < 0.5
        out = np.kron(cells, np.ones((2, 2)))[:size, :size]
    return np.asarray(out, dtype=np.float32)


def render(shape: int, texture_id: int, color: int, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """One render as (size, size, 3) uint8: the textured, coloured shape on grey."""
    mask = shape_mask(shape, size, rng)[..., None]
    tex = texture(texture_id, size, rng)[..., None]
    rgb = np.asarray(list(COLORS.values())[color], dtype=np.float32)
    inside = rgb * (DARK + (1.0 - DARK) * tex)
    img = mask * inside + (1.0 - mask) * BACKGROUND
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------- pairs


def correlated_pairs(seed: int) -> np.ndarray:
    """pairing[t] = the colour that texture t of image 1 is paired with (the 10 fixed random
    (texture, colour) pairs of the synergy label), drawn from the seed."""
    return np.random.default_rng([int(seed), 7]).permutation(len(COLORS))


def split_sizes(n: int) -> dict[str, int]:
    """Pairs per part (train_biased, train_unbiased, val, test) of n pairs in all."""
    sizes = {k: int(round(f * n)) for k, f in SPLIT_FRACTIONS.items()}
    sizes["train_biased"] += n - sum(sizes.values())
    return sizes


@dataclass(frozen=True)
class Pairs:
    """Attribute indices of every pair (each (n,) int64) and the split of each pair."""

    shape: np.ndarray
    texture1: np.ndarray
    texture2: np.ndarray
    color1: np.ndarray
    color2: np.ndarray
    synergy: np.ndarray
    biased: np.ndarray
    split: np.ndarray       # "train" / "val" / "test"

    def labels(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in LABELS}


def draw_pairs(n: int, seed: int) -> Pairs:
    """n pairs split as SPLIT_FRACTIONS: biased train pairs (colour 2 = pairing[texture 1],
    so synergy is 1 in all of them), unbiased train, val and test pairs (shape, textures and
    colour 1 drawn independently; colour 2 = pairing[texture 1] in a random half, another
    colour in the rest: synergy balanced)."""
    if n < len(SPLIT_FRACTIONS):
        raise ValueError(f"trifeature needs at least {len(SPLIT_FRACTIONS)} pairs, got {n}")
    rng = np.random.default_rng([int(seed), 8])
    pairing = correlated_pairs(seed)
    k = len(SHAPES)
    shape, t1, t2, c1 = (rng.integers(0, k, size=n) for _ in range(4))
    sizes = split_sizes(n)
    biased = np.zeros(n, dtype=np.int64)
    biased[:sizes["train_biased"]] = 1
    # Unbiased pairs: half of them correlated, half with any other colour, so that the
    # synergy label is balanced (with colour 2 drawn uniformly it is 1 in 1 of 10 pairs, and
    # an unweighted linear probe then predicts 0 for every representation).
    correlated = (biased == 1) | (rng.random(n) < 0.5)
    other = (pairing[t1] + rng.integers(1, k, size=n)) % k      # any colour but pairing[t1]
    c2 = np.where(correlated, pairing[t1], other)
    split = np.array(["train"] * (sizes["train_biased"] + sizes["train_unbiased"])
                     + ["val"] * sizes["val"] + ["test"] * sizes["test"])
    synergy = (c2 == pairing[t1]).astype(np.int64)
    return Pairs(shape, t1, t2, c1, c2, synergy, biased, split)


# ------------------------------------------------------------------------------- files

IMPORT_SPEC = "import.yaml"
TABLE = "pairs.csv"


def spec_text(size: int) -> str:
    """The `mmcl data import` spec of the table `write_trifeature` writes."""
    lines = ["description: \"bimodal trifeature (CoMM): two images sharing the shape, each "
             "with its own texture; synergy = (texture1, color2) is a correlated pair\"",
             "split_column: split", "id_column: id", "modalities:"]
    for m in ("image1", "image2"):
        lines += [f"  {m}:", f"    column: {m}", "    kind: image", f"    size: [{size}, {size}]",
                  "    resize: resize"]
    lines.append("labels:")
    classes = {"shape": len(SHAPES), "texture1": len(TEXTURES), "texture2": len(TEXTURES),
               "color1": len(COLORS), "color2": len(COLORS), "synergy": 2, "biased": 2}
    for name in LABELS:
        lines += [f"  {name}:", f"    column: {name}", f"    num_classes: {classes[name]}"]
    return "\n".join(lines) + "\n"


def write_trifeature(folder: str, n: int = 6000, seed: int = 0, size: int = 32) -> str:
    """Render n pairs into folder/images/*.png, write folder/pairs.csv (id, image1, image2,
    labels, split) and folder/import.yaml; returns the table's path."""
    from PIL import Image

    if size < 16:
        raise ValueError(f"trifeature images need at least 16 pixels a side, got {size}")
    pairs = draw_pairs(n, seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng([int(seed), 9])
    table = os.path.join(folder, TABLE)
    with open(table, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "image1", "image2", *LABELS, "split"])
        for i in range(n):
            names = []
            for view, (tex, col) in enumerate(((pairs.texture1[i], pairs.color1[i]),
                                               (pairs.texture2[i], pairs.color2[i])), 1):
                name = f"images/{i:06d}_{view}.png"
                Image.fromarray(render(int(pairs.shape[i]), int(tex), int(col), size, rng)
                                ).save(os.path.join(folder, name))
                names.append(name)
            out.writerow([i, *names, *(int(getattr(pairs, k)[i]) for k in LABELS),
                          pairs.split[i]])
    with open(os.path.join(folder, IMPORT_SPEC), "w") as f:
        f.write(spec_text(size))
    return table
