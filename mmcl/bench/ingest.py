"""`mmcl bench perf` section "import": `mmcl data import` throughput on images, and the data
wait of training on the imported image modality.

- Import throughput per CPU against the limit: the same JPEG files decoded by Pillow alone in
  a tight loop in one process, with the very decode the import does (draft decoding, centre
  crop, resize, to uint8 (C, H, W)). The import adds reading the table, Ray Data's tasks,
  writing Parquet and the manifest. Ratio = (imported images/s / decode actors) / (Pillow
  images/s on one CPU); goal >= 0.8.
- Data wait: a short Ray pretraining run (2 workers, the built-in CNN) on the imported data
  set; the fraction of the training loop spent waiting for batches (goal < 5%).
"""

from __future__ import annotations

import os
import time

import numpy as np

GOAL_RATIO = 0.8
GOAL_WAIT = 0.05


def _write_images(folder: str, n: int, size: int) -> str:
    """`n` JPEG photos-like images (smooth colour fields + noise) and a CSV table of them."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    # A second modality (8 inline numbers, the image's mean colour and position) because
    # every contrastive objective needs at least two; the image is what is measured.
    lines = ["file,feat,label"]
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = rng.uniform(0, 255, 3)
        field = base + 80 * np.stack([np.sin(6 * xx + i), np.cos(5 * yy), xx * yy], -1)
        pixels = np.clip(field + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, "img", f"{i}.jpg"), quality=90)
        feat = [*(pixels.reshape(-1, 3).mean(0) / 255), i % 4, *rng.normal(0, 1, 4)]
        lines.append(f"img/{i}.jpg,{' '.join(f'{v:.4f}' for v in feat)},{i % 4}")
    table = os.path.join(folder, "images.csv")
    with open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    return table


def _pillow_alone(folder: str, n: int, spec) -> float:
    """Images/s of the import's own image decode on one CPU, files read from disk."""
    from mmcl.data.ingest import Decoder, build_manifest

    decoder = Decoder(spec, build_manifest(spec), folder, None, None)
    start = time.perf_counter()
    for i in range(n):
        decoder.decode("image", f"img/{i}.jpg", i)
    return n / (time.perf_counter() - start)


def import_throughput(quick: bool, workdir: str) -> dict:
    import ray

    from mmcl.data.ingest import ImportSpec, import_table

    n, size, target = (256, 256, 64) if quick else (2048, 384, 96)
    folder = os.path.join(workdir, "import_src")
    table = _write_images(folder, n, size)
    spec = ImportSpec.model_validate({
        "modalities": {"image": {"column": "file", "kind": "image", "size": [target, target]},
                       "feat": {"column": "feat", "holds": "numbers", "kind": "vector",
                                "shape": [8]}},
        "labels": {"label": {"column": "label", "num_classes": 4}}, "rows_per_task": 128})
    _pillow_alone(folder, min(32, n), spec)  # warm the page cache and imports
    pillow = _pillow_alone(folder, n, spec)
    actors = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    out = os.path.join(workdir, "import_ds")
    start = time.perf_counter()
    import_table(table, out, spec, overwrite=True, concurrency=actors)
    imported = n / (time.perf_counter() - start)
    ratio = imported / actors / pillow
    result = {
        "settings": {"images": n, "source": f"{size}x{size} JPEG", "stored": f"3x{target}x"
                     f"{target} uint8", "decode_actors": actors},
        "pillow_images_per_s_1cpu": pillow, "import_images_per_s": imported,
        "import_images_per_s_per_cpu": imported / actors, "ratio_per_cpu": ratio,
        "goals": {"import_vs_pillow": {"goal": f">= {GOAL_RATIO}", "measured": ratio,
                                       "met": ratio >= GOAL_RATIO}}}
    try:
        result["train"] = _data_wait(out, workdir, quick)
    except Exception as err:  # noqa: BLE001 - keep the throughput figures measured above
        result["train_error"] = f"{type(err).__name__}: {err}"
        return result
    wait = result["train"]["data_wait_fraction"]
    result["goals"]["data_wait"] = {"goal": f"< {GOAL_WAIT}", "measured": wait,
                                    "met": wait < GOAL_WAIT}
    return result


def _data_wait(root: str, workdir: str, quick: bool) -> dict:
    """Data wait of a short 2-worker pretraining run on the imported images (the last
    epoch: the first one also pays for starting the read tasks)."""
    from mmcl import config
    from mmcl.train import launcher

    epochs = 2 if quick else 3
    cfg = config.load(None, [f"data.path={root}", f"storage.path={workdir}/import_runs",
                             "train.batch_size=32", f"train.epochs={epochs}",
                             "train.warmup_epochs=0", "scaling.num_workers=2",
                             f"train.checkpoint_every={epochs}"])
    history = launcher.pretrain(cfg).history
    last = history[-1]
    return {"epochs": epochs, "batch_size": 32, "workers": 2,
            "data_wait_fraction": last["data_wait_fraction"],
            "samples_per_s_total": last.get("samples_per_s_total"),
            "per_epoch_data_wait": [h["data_wait_fraction"] for h in history]}


def md_import(s: dict, fmt) -> list[str]:
    """The section's markdown lines; `fmt` formats numbers (perf's `_f`)."""
    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += ["", "| Pillow alone, 1 CPU (images/s) | import (images/s) | import per decode "
              "actor | ratio |", "|---|---|---|---|",
              f"| {fmt(s['pillow_images_per_s_1cpu'])} | {fmt(s['import_images_per_s'])} | "
              f"{fmt(s['import_images_per_s_per_cpu'])} | {fmt(s['ratio_per_cpu'])} |", ""]
    if "train" not in s:
        return lines + [f"- training on the imported images failed: `{s['train_error']}`"]
    t = s["train"]
    lines.append(f"- training on the imported images ({t['workers']} workers, batch "
                 f"{t['batch_size']}, {t['epochs']} epochs): data wait per epoch "
                 + ", ".join(f"{100 * w:.1f}%" for w in t["per_epoch_data_wait"]))
    lines += [f"- goal {k}: {g['goal']}, measured {fmt(g['measured'])}: "
              f"**{'met' if g['met'] else 'not met'}**" for k, g in s["goals"].items()]
    return lines
