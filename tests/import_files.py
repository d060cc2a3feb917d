"""Small real source files for the import tests: images (Pillow), WAV clips (soundfile),
.npy arrays, tables (CSV / JSONL / Parquet), a webdataset tar and a local WordLevel
tokenizer saved as a transformers folder. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

COLOURS = ("red", "green", "blue", "white")
RGB = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200),
       "white": (220, 220, 220)}
WORDS = ["a", "small", "big", "square", "photo", "of", *COLOURS]


def make_tokenizer(folder: Path) -> str:
    """A WordLevel tokenizer over WORDS with [PAD]=0, [UNK]=1, [MASK]=2, saved with
    save_pretrained so that AutoTokenizer loads it by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   mask_token="[MASK]")
    fast.save_pretrained(str(folder))
    return str(folder)


def image(colour: str, size=(20, 24), mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.array(RGB[colour], np.float64)
    pixels = np.clip(base + rng.normal(0, 20, (size[0], size[1], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def write_wav(path: Path, freq: float, rate: int = 16000, seconds: float = 0.25) -> None:
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def write_table(rows: list[dict], path: Path) -> str:
    if path.suffix == ".csv":
        names = list(rows[0])
        lines = [",".join(names)]
        lines += [",".join("" if r[n] is None else str(r[n]) for n in names) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def write_spec(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def image_text_table(folder: Path, n: int = 64, fmt: str = ".csv") -> tuple[str, dict]:
    """Image files (PNG, every 4th JPEG) + captions + a class label + multi-label tags."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        colour = COLOURS[i % 4]
        ext = "jpg" if i % 4 == 3 else "png"
        image(colour, seed=i).save(folder / "img" / f"{i}.{ext}")
        size = "big" if i % 2 else "small"
        rows.append({"file": f"img/{i}.{ext}", "caption": f"a {size} {colour} square",
                     "colour": colour, "tags": "|".join(t for t in (size, "bright" if colour
                                                                    == "white" else "") if t)})
    table = write_table(rows, folder / f"table{fmt}")
    spec = {"modalities": {
        "image": {"column": "file", "kind": "image", "size": [16, 16]},
        "caption": {"column": "caption", "holds": "text", "kind": "text",
                    "tokenizer": make_tokenizer(folder / "tok"), "max_len": 8}},
        "labels": {"colour": {"column": "colour", "classes": list(COLOURS)},
                   "tags": {"column": "tags", "task": "multilabel",
                            "classes": ["small", "big", "bright"]}}}
    return table, spec
