"""Captioned shapes: an image+text data set made from real files, and the whole CLIP-style
run on it, in one command (nothing is downloaded):

    python configs/recipes/captioned_shapes.py [--out runs/captioned_shapes] [--epochs 15]

1. Renders 32x32 Trifeature images (mmcl/data/trifeature.py: 10 shapes x 10 textures x
   10 colours, random position, rotation and texture phase) as PNG files, with a caption per
   image naming its attributes ("a red horizontally striped triangle") and the three
   attributes as labels, in OUT/source/captions.csv; builds a WordLevel tokenizer over the
   captions' words and saves it with save_pretrained to OUT/source/tokenizer.
2. `mmcl data import` -> OUT/data (the spec is OUT/source/import.yaml).
3. `mmcl pretrain -c configs/captioned_shapes.yaml` (objective cross, built-in cnn + text
   encoders) -> OUT/runs/captioned_shapes.
4. `mmcl eval --retrieval image:caption`: recall@1/5/10 and median rank both ways on test,
   beside the linear and kNN probes of shape, texture and colour.

The test split holds every (shape, texture, colour) triplet exactly once (1,000 tuples), so no
two test captions are the same: a query's match is the only correct answer in the gallery,
and recall@k has no ties to define. Train and val draw triplets at random (each triplet is
seen about train/1000 times in training, every time as a new render): test measures retrieval
of new renders of known attribute combinations, not generalisation to unseen combinations.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from mmcl.data.trifeature import COLORS, SHAPES, TEXTURES, render

# Caption words for each texture (mmcl/data/trifeature.py's names are identifiers).
TEXTURE_WORDS = {"solid": "plain", "hstripes": "horizontally striped",
                 "vstripes": "vertically striped", "diagonal": "diagonally striped",
                 "checker": "checkered", "dots": "dotted", "grid": "gridded",
                 "rings": "ringed", "waves": "wavy", "noise": "speckled"}
SPECIAL = ("[PAD]", "[UNK]", "[MASK]")
MAX_LEN = 8
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                      "captioned_shapes.yaml")


def caption(shape: int, texture: int, colour: int) -> str:
    return f"a {list(COLORS)[colour]} {TEXTURE_WORDS[TEXTURES[texture]]} {SHAPES[shape]}"


def triplets(n_train: int, n_val: int, seed: int) -> list[tuple[str, tuple[int, int, int]]]:
    """(split, (shape, texture, colour)) per row: train and val at random, test every
    triplet once (distinct captions)."""
    rng = np.random.default_rng([seed, 1])
    k = (len(SHAPES), len(TEXTURES), len(COLORS))
    drawn = [tuple(int(v) for v in row)
             for row in np.stack([rng.integers(0, m, n_train + n_val) for m in k], axis=1)]
    every = list(itertools.product(*(range(m) for m in k)))
    order = rng.permutation(len(every))
    return ([("train", t) for t in drawn[:n_train]] + [("val", t) for t in drawn[n_train:]]
            + [("test", every[i]) for i in order])


def write_tokenizer(folder: str) -> str:
    """A WordLevel tokenizer over every caption word ([PAD] = 0), saved as a transformers
    folder that AutoTokenizer (and so `mmcl data import`) loads by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in range(len(SHAPES)) for t in range(len(TEXTURES))
                    for c in range(len(COLORS)) for w in caption(s, t, c).split()})
    vocab = {w: i for i, w in enumerate((*SPECIAL, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            mask_token="[MASK]").save_pretrained(folder)
    return folder


def spec_text(tokenizer: str) -> str:
    def classes(names) -> str:
        return "[" + ", ".join(names) + "]"

    return "\n".join([
        "description: \"captioned shapes: 32x32 Trifeature renders, a caption naming shape, "
        "texture and colour (test: every triplet once)\"",
        "split_column: split", "id_column: id", "modalities:",
        "  image: {column: file, kind: image, size: [32, 32], resize: resize}",
        f"  caption: {{column: caption, holds: text, kind: text, tokenizer: {tokenizer}, "
        f"max_len: {MAX_LEN}}}",
        "labels:",
        f"  shape: {{column: shape, classes: {classes(SHAPES)}}}",
        f"  texture: {{column: texture, classes: {classes(TEXTURES)}}}",
        f"  colour: {{column: colour, classes: {classes(COLORS)}}}", ""])


def write_source(folder: str, n_train: int, n_val: int, seed: int = 0) -> tuple[str, str]:
    """PNG files, captions.csv, the tokenizer and import.yaml under folder; returns (table,
    spec)."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    table = os.path.join(folder, "captions.csv")
    with open(table, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "file", "caption", "shape", "texture", "colour", "split"])
        for i, (split, (s, t, c)) in enumerate(triplets(n_train, n_val, seed)):
            name = f"images/{i:06d}.png"
            Image.fromarray(render(s, t, c, 32, rng)).save(os.path.join(folder, name))
            out.writerow([i, name, caption(s, t, c), SHAPES[s], TEXTURES[t], list(COLORS)[c],
                          split])
    tokenizer = write_tokenizer(os.path.abspath(os.path.join(folder, "tokenizer")))
    spec = os.path.join(folder, "import.yaml")
    with open(spec, "w") as f:
        f.write(spec_text(tokenizer))
    return table, spec


def mmcl(*args: str) -> None:
    """One mmcl command, printed as a user would type it, in this Python."""
    print("$ mmcl " + " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([sys.executable, "-m", "mmcl.cli", *args], check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/captioned_shapes", help="folder for everything")
    p.add_argument("--train", type=int, default=6000, help="training tuples")
    p.add_argument("--val", type=int, default=500, help="validation tuples")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="remove OUT first")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        if not args.overwrite:
            p.error(f"{args.out} exists (--overwrite removes it)")
        shutil.rmtree(args.out)
    start = time.time()
    table, spec = write_source(os.path.join(args.out, "source"), args.train, args.val,
                               args.seed)
    print(f"wrote {args.train} + {args.val} + 1000 images and captions in "
          f"{time.time() - start:.0f}s", flush=True)
    data, runs = os.path.join(args.out, "data"), os.path.join(args.out, "runs")
    mmcl("data", "import", table, "--out", data, "--spec", spec)
    mmcl("pretrain", "-c", os.path.normpath(CONFIG), "--set", f"data.path={data}",
         "--set", f"storage.path={runs}", "--set", f"train.epochs={args.epochs}",
         "--set", f"train.seed={args.seed}")
    mmcl("eval", "--run", os.path.join(runs, "captioned_shapes"), "--retrieval",
         "image:caption", "--few-label-k")
    print(f"recipe finished in {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
