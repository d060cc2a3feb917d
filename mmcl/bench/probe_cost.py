"""`mmcl bench perf` section online_probe: what the online probe (`eval.every_epochs`) adds to
a training epoch.

The README demo's run, one worker's share of it (the demo trains on 2 workers: 12 steps of
batch 128 per worker and epoch), in this process on one torch thread as a Ray Train worker
has. Rounds of one training epoch followed by the probe rank 0 runs after it
(`OnlineProbe.at_epoch_end`: embed the held-out slice, fit, score), each timed on its own;
the figure is the probe's time over its epoch's time, median over rounds. On Ray the other
worker waits for rank 0 at the next all-reduce, so the probe's time is added to the epoch
whole; the epoch itself also carries the data stream and the all-reduce there, which this
in-memory epoch does not, so this ratio is an upper bound of the share on Ray.
"""

from __future__ import annotations

import os
import time

import numpy as np

from mmcl.bench.timing import quartiles, torch_threads
from mmcl.markdown import table_lines


def online_probe(quick: bool, workdir: str) -> dict:
    from mmcl.bench.perf import demo_config
    from mmcl.data.shards import read_split
    from mmcl.data.synth import generate
    from mmcl.evaluate.online import OnlineProbe
    from mmcl.train import launcher
    from mmcl.train.engine import Engine
    from mmcl.train.local import memory_batches, steps_per_epoch

    rounds = 2 if quick else 6
    root = os.path.join(workdir, "probe_rus")
    cfg = demo_config([f"data.path={root}",
                        f"storage.path={os.path.join(workdir, 'probe_runs')}"])
    generate(cfg.data.synth.preset, root, n=cfg.data.synth.n, seed=0, overwrite=True)
    root, manifest = launcher.prepare_data(cfg)
    train = read_split(root, cfg.data.train_split, manifest.modality_names)
    workers = cfg.scaling.num_workers
    share = {k: v[: len(v) // workers] for k, v in train.items()}  # one worker's rows
    steps = steps_per_epoch(len(share["id"]), cfg.train.batch_size)
    probe = OnlineProbe.for_worker(cfg, manifest, root, rank=0)
    if not probe.active:
        raise RuntimeError("the demo's data gives no online probe (no label column?)")
    epoch_s, probe_s, figures = [], [], []
    with torch_threads(1):
        engine = Engine(cfg, manifest, steps * (rounds + 1))
        engine.train_epoch(memory_batches(share, cfg.train.batch_size, 0, 0))  # warm-up
        probe.at_epoch_end(engine, 0)
        for epoch in range(1, rounds + 1):
            start = time.perf_counter()
            engine.train_epoch(memory_batches(share, cfg.train.batch_size, 0, epoch))
            middle = time.perf_counter()
            figures.append(probe.at_epoch_end(engine, epoch))
            end = time.perf_counter()
            epoch_s.append(middle - start)
            probe_s.append(end - middle)
    ratios = [p / e for p, e in zip(probe_s, epoch_s)]
    return {
        "settings": {"data": f"{cfg.data.synth.preset}, {cfg.data.synth.n} tuples",
                     "worker_share": f"1 of {workers} workers: {steps} steps of batch "
                                     f"{cfg.train.batch_size} per epoch",
                     "probe": f"every {cfg.eval.every_epochs} epoch(s), at most "
                              f"{cfg.eval.rows} rows of '{cfg.data.val_split}' "
                              f"({len(probe.arrays['id'])} read), "
                              f"{len(probe.specs)} label column(s)",
                     "rounds": rounds, "torch_threads": 1},
        "epoch_s": quartiles(epoch_s),
        "probe_s": quartiles(probe_s),
        "probe_over_epoch": {"median": float(np.median(ratios)), "rounds": ratios},
        "last_figures": figures[-1] if figures else {},
    }


def md_online_probe(s: dict) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += [""] + table_lines(
        ["", "median", "p25-p75"],
        [[label, f"{s[key]['median']:.3f}", f"{s[key]['p25']:.3f}-{s[key]['p75']:.3f}"]
         for key, label in (("epoch_s", "training epoch, s"), ("probe_s", "online probe, s"))])
    ratio = s["probe_over_epoch"]
    lines += ["", f"- online probe / epoch: {ratio['median']:.3f} (per round: "
              + ", ".join(f"{r:.3f}" for r in ratio["rounds"]) + "); goal < 0.05"]
    return lines
