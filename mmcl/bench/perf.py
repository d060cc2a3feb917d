"""`mmcl bench perf`: how fast mmcl turns tuples into a trained encoder, side by side.

Sections (each a dict in perf.json and a part of perf.md):

    objective_step  TupleInfoNCE's training step (encoders once per view, per disturbed tuple
                    only what its swapped token changes) against the reference code's
                    re-encoding step and a plain tuple-contrast step, M = 2, 3, 4 modalities;
                    at the default model sizes and with encoders that dominate the cost; time,
                    FLOPs and the FLOP floor of the disturbed negatives
    efficiency      every objective at its default config: step time, FLOPs, GFLOP/s and FLOP
                    efficiency against the machine's matmul rate measured in the same rounds
    critics         FactorCL's concat critic: separable-first-layer pair scores against N^2
                    tiled concatenations, N = 128, 256, 512 (values, time, peak memory)
    loss_memory     peak memory of the TupleInfoNCE loss against the global batch: local loss
                    (n_local x N_global logits per worker) against every worker scoring N x N
    hf_encoders     an image+text step with Hugging Face backbones (ViT + BERT from configs),
                    trainable against frozen, the encoders' share of the step, TupleInfoNCE
                    against a plain tuple step, bf16 on GPU (mmcl.bench.encoders_perf)
    online_probe    the online probe (eval.every_epochs) against the training epoch it
                    follows, the README demo, one worker's share (mmcl.bench.probe_cost)
    read            raw read throughput of the shard format against the same data stored as
                    list<float> columns (pyarrow, and Ray Data)
    data_plane      Ray path (Ray Data from Parquet shards -> DDP workers) against the same
                    loop on in-memory tensors, same model, batch and workers, epochs of each
                    source interleaved in one fit (mmcl.bench.plane); data wait; Ray Data's V2
                    Parquet reader against mmcl's choice (full); scaling from 1 to 2 workers at
                    a fixed per-worker batch (full)
    startup         the README demo from command to finished run, phase by phase
    clip_step       every objective's step against a hand-written CLIP loop on the same
                    Hugging Face towers (ViT-B/16 + BERT-base on a GPU): samples/s, FLOPs
                    per sample, FLOP/s over the matmul rate, peak memory (mmcl.bench.clip_step)
    ray_images      the Ray path on uint8 images from Parquet shards (224x224 on a GPU):
                    samples/s and data wait of every epoch (mmcl.bench.clip_step)

Timing: things compared are run interleaved in rounds and compared by same-round ratios
(mmcl.bench.timing), because the machine may be shared. Every section records the load average
before and after it; the report carries the machine and versions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from mmcl.bench.env import describe, json_default, load_average, machine
from mmcl.bench.timing import interleaved, paired_ratio, peak_memory, quartiles, torch_threads
from mmcl.bench.clip_step import (clip_step, compile_step, md_clip_step, md_compile_step,
                                  md_ray_images, ray_images)
from mmcl.bench.encoders_perf import encoders, hf_encoders, md_encoders, md_hf_encoders
from mmcl.bench.probe_cost import md_online_probe
from mmcl.markdown import table_lines

SECTIONS = ("objective_step", "efficiency", "critics", "loss_memory", "hf_encoders", "encoders",
            "clip_step", "online_probe", "read", "data_plane", "ray_images", "startup")
# Run only when asked for (`--only import`): `mmcl data import` throughput (mmcl.bench.ingest);
# `--only compile`: train.compile against eager on the clip_step towers (mmcl.bench.clip_step).
OPTIONAL_SECTIONS = ("import", "compile")
MB = 1e6

# The goals of the performance issue, checked in the report.
GOALS = {
    "tuple_infonce_vs_floor_max": 1.15,     # step FLOPs / (floor + plain step), M = 3
    "reencode_vs_tuple_infonce_min": 2.0,
    "ray_vs_memory_min": 0.9,
    "data_wait_max": 0.05,
    "factorcl_ssl_vs_cross_max": 5.0,       # default FactorCL-SSL step / cross step, same batch
    "eval_vs_training_max": 1.0,            # `mmcl eval` of the demo run / its pretrain, wall
}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def demo_config_path() -> Path | None:
    """configs/default.yaml of this checkout (the README's demo), if it is there."""
    path = _repo_root() / "configs" / "default.yaml"
    return path if path.exists() else None


def demo_config(overrides: list[str]):
    """The README demo's config with `overrides` (the built-in defaults equal it except for
    what configs/default.yaml names, which is repeated here when the file is missing)."""
    from mmcl import config

    path = demo_config_path()
    if path is None:
        overrides = ["data.synth.preset=rus", "data.synth.n=4096", "objective.temperature=0.1",
                     "train.epochs=5", "train.batch_size=128", "scaling.num_workers=2",
                     *overrides]
    return config.load(str(path) if path else None, overrides)


def _section(name: str, fn: Callable[[], dict], log: Callable[[str], None]) -> dict:
    log(f"[bench] {name} ...")
    before, start = load_average(), time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - one failed section must not lose the others
        import traceback

        out = {"error": f"{type(err).__name__}: {err}",
               "traceback": traceback.format_exc(limit=8)}
        log(f"[bench] {name} failed: {out['error']}")
    out["elapsed_s"] = round(time.perf_counter() - start, 2)
    out["load_average"] = {"before": before, "after": load_average()}
    log(f"[bench] {name} done in {out['elapsed_s']:.1f}s (load {out['load_average']['after']})")
    return out


# ----------------------------------------------------------------------- objective step


def _vector_manifest(m: int, dim: int):
    from mmcl.data.schema import Manifest, ModalitySpec

    return Manifest([ModalitySpec(f"m{k}", (dim,)) for k in range(m)], [])


def objective_step(quick: bool) -> dict:
    """Engine.train_step (augment two views, loss, backward, clip, optimiser step) with the
    plain tuple objective, mmcl's TupleInfoNCE, and the re-encoding TupleInfoNCE on the same
    weights, for M modalities; FLOPs counted, and the FLOP floor of the disturbed negatives."""
    import torch

    from mmcl import config
    from mmcl.bench.reencode import ReencodingTupleInfoNCE
    from mmcl.train.engine import Engine

    batch_size, threads = 128, 1
    settings = [
        {"name": "default", "dim": 16, "encoder_hidden": 128,
         "what": "default model (MLP encoders 16->128->128->64, transformer fusion 1 layer "
                 "4 heads, head 64->128->64) on 16-feature vectors, as the demo"},
        {"name": "concat_fusion", "dim": 16, "encoder_hidden": 128,
         "extra": ["model.fusion=concat"],
         "what": "default, but model.fusion=concat (an MLP 64M->128->64 instead of the "
                 "transformer)"},
        {"name": "heavy_encoders", "dim": 256, "encoder_hidden": 512,
         "what": "encoders that dominate the cost: 256-feature vectors, MLP encoders "
                 "256->512->512->64; fusion and head as default"},
    ]
    # Quick: the default model only (the smoke test); full: every model.
    ms = {"default": (2, 3, 4), "concat_fusion": () if quick else (3,),
          "heavy_encoders": () if quick else (3,)}
    rounds, inner, warmup = (2, 1, 1) if quick else (8, 2, 2)
    rows = []
    with torch_threads(threads):
        for s in settings:
            for m in ms[s["name"]]:
                manifest = _vector_manifest(m, s["dim"])
                common = [f"train.batch_size={batch_size}",
                          f"model.encoder.hidden={s['encoder_hidden']}", "train.seed=0",
                          *s.get("extra", [])]
                gen = torch.Generator().manual_seed(m)
                batch = {f"m{k}": torch.randn(batch_size, s["dim"], generator=gen)
                         for k in range(m)}
                engines = {
                    "tuple": Engine(config.load(None, [*common, "objective.name=tuple"]),
                                    manifest, 10**6),
                    "tuple_infonce": Engine(config.load(None, [*common,
                                                               "objective.name=tuple_infonce"]),
                                            manifest, 10**6),
                }
                reencode = Engine(config.load(None, [*common, "objective.name=tuple_infonce"]),
                                  manifest, 10**6)
                reencode.model = ReencodingTupleInfoNCE(reencode.objective)
                engines["reencode"] = reencode
                loss_diff = _reencode_loss_difference(engines["tuple_infonce"], reencode, batch)
                flops = {k: _step_flops(e, batch) for k, e in engines.items()}
                floor = disturbed_floor_mflop(engines["tuple_infonce"].cfg, m, batch_size)
                times = interleaved({k: (lambda e=e: e.train_step(batch))
                                     for k, e in engines.items()},
                                    rounds=rounds, warmup=warmup, inner=inner)
                rows.append({
                    "setting": s["name"], "modalities": m,
                    "step_ms": {k: {q: (v * 1e3 if q != "n" else v)
                                    for q, v in quartiles(t).items()}
                                for k, t in times.items()},
                    "tuple_infonce_over_tuple": paired_ratio(times["tuple_infonce"],
                                                             times["tuple"]),
                    "reencode_over_tuple_infonce": paired_ratio(times["reencode"],
                                                                times["tuple_infonce"]),
                    "passes_per_step": {
                        "tuple": {"encoders": 2, "fusion_head": 2},
                        "tuple_infonce": {"encoders": 2, "fusion_head": 2,
                                          "disturbed_fusion_head": 2 * m},
                        "reencode": {"encoders": 2 + 2 * m, "fusion_head": 2 + 2 * m}},
                    "mflop_per_step": flops,
                    "floor_mflop": floor,
                    "flop_ratios": {
                        "tuple_infonce_over_tuple": flops["tuple_infonce"] / flops["tuple"],
                        "reencode_over_tuple_infonce": flops["reencode"]
                        / flops["tuple_infonce"],
                        "tuple_infonce_over_floor_plus_tuple": None if floor is None
                        else flops["tuple_infonce"] / (floor["total"] + flops["tuple"])},
                    "loss_abs_difference_reencode_vs_mmcl": loss_diff,
                })
    at3 = next(r for r in rows if r["setting"] == "default" and r["modalities"] == 3)
    over_floor = at3["flop_ratios"]["tuple_infonce_over_floor_plus_tuple"]
    return {
        "settings": {"batch_size": batch_size, "torch_threads": threads, "rounds": rounds,
                     "steps_per_round": inner, "symmetric": True, "negative_weights": "1 each",
                     "augment": "default (mixup off, dropout 0.1, noise 0.1)",
                     "models": settings,
                     "floor": "FLOPs a disturbed negative inherently needs, forward + "
                              "backward (x3), summed over the 2 directions x M sets x B rows: "
                              "its CLS query's attention over the M+1 cached keys and values, "
                              "output projection, feed-forward and head, plus its column of "
                              "logits against the B anchors (transformer fusion, 1 layer)",
                     "step": "Engine.train_step: 2 augmented views, loss, backward, grad clip "
                             "1.0, AdamW step, scheduler step"},
        "rows": rows,
        "goals": {
            "tuple_infonce_flops_vs_floor_plus_tuple_at_M3": {
                "goal": f"<= {GOALS['tuple_infonce_vs_floor_max']}",
                "measured": over_floor,
                "met": over_floor <= GOALS["tuple_infonce_vs_floor_max"]},
            "reencode_vs_tuple_infonce_at_M3": {
                "goal": f">= {GOALS['reencode_vs_tuple_infonce_min']}",
                "measured": at3["reencode_over_tuple_infonce"]["median"],
                "met": at3["reencode_over_tuple_infonce"]["median"]
                >= GOALS["reencode_vs_tuple_infonce_min"]},
        },
    }


def efficiency(quick: bool) -> dict:
    """Every objective at its default config (batch 128, one thread): Engine.train_step time,
    FLOPs (torch.utils.flop_counter) and FLOP efficiency = achieved FLOP/s over the machine's
    float32 matmul FLOP/s, the matmul timed in the same interleaved rounds (same-round
    ratios). Data: `rus` (3 modalities), FactorCL on `factorcl` (2), with a cross step on that
    batch as FactorCL's denominator."""
    import torch

    from mmcl import config
    from mmcl.data.synth import make_arrays
    from mmcl.objectives import OBJECTIVES
    from mmcl.train.engine import Engine

    batch_size, threads, size = 128, 1, 256
    rounds, warmup = (2, 1) if quick else (6, 2)
    data = {p: make_arrays(p, batch_size, seed=0) for p in ("rus", "factorcl")}
    batches = {p: {k: torch.as_tensor(v) for k, v in arrays.items()}
               for p, (_, arrays) in data.items()}
    runs = {name: "factorcl" if name.startswith("factorcl") else "rus"
            for name in sorted(OBJECTIVES)}
    runs["cross@factorcl"] = "factorcl"
    a, b = torch.randn(size, size), torch.randn(size, size)
    matmul_flop = 2 * size ** 3 * 8

    def matmuls():
        for _ in range(8):
            a @ b

    with torch_threads(threads):
        engines = {run: Engine(config.load(None, [f"objective.name={run.split('@')[0]}",
                                                  f"train.batch_size={batch_size}",
                                                  "train.seed=0"]),
                               data[preset][0], 10**6)
                   for run, preset in runs.items()}
        flops = {run: _step_flops(e, batches[runs[run]]) * 1e6 for run, e in engines.items()}
        fns = {run: (lambda e=e, r=run: e.train_step(batches[runs[r]]))
               for run, e in engines.items()}
        times = interleaved({"matmul": matmuls, **fns}, rounds=rounds, warmup=warmup)
    rate = [matmul_flop / t for t in times["matmul"]]
    rows = []
    for run in engines:
        per_round = [flops[run] / t / r for t, r in zip(times[run], rate)]
        rows.append({"objective": run, "data": runs[run],
                     "step_ms": {q: (v * 1e3 if q != "n" else v)
                                 for q, v in quartiles(times[run]).items()},
                     "mflop_per_step": flops[run] / 1e6,
                     "gflop_per_s": flops[run] / quartiles(times[run])["median"] / 1e9,
                     "flop_efficiency": quartiles(per_round)["median"]})
    fcl = paired_ratio(times["factorcl_ssl"], times["cross@factorcl"])
    return {
        "settings": {"batch_size": batch_size, "torch_threads": threads, "rounds": rounds,
                     "config": "each objective's defaults (mmcl's default model)",
                     "matmul": f"{size}x{size} @ {size}x{size} float32, 8 per call"},
        "matmul_gflop_per_s": quartiles(rate)["median"] / 1e9,
        "rows": rows,
        "factorcl_ssl_over_cross": fcl,
        "factorcl_ssl_over_cross_flops": flops["factorcl_ssl"] / flops["cross@factorcl"],
        "goals": {"factorcl_ssl_vs_cross": {
            "goal": f"<= {GOALS['factorcl_ssl_vs_cross_max']}", "measured": fcl["median"],
            "met": fcl["median"] <= GOALS["factorcl_ssl_vs_cross_max"]}},
    }


def disturbed_floor_mflop(cfg, m: int, batch: int) -> dict | None:
    """The floor of TupleInfoNCE's disturbed negatives in MFLOP per train step (see the
    section's settings), counted analytically; None unless the fusion is a 1-layer
    transformer (the reuse that reaches it is specific to the first layer)."""
    model = cfg.model
    if model.fusion != "transformer" or model.fusion_layers != 1:
        return None
    d, tokens = model.embed_dim, m + 1
    macs = {"cls_attention": 2 * tokens * d, "out_proj": d * d, "feed_forward": 8 * d * d,
            "head": d * model.proj_hidden + model.proj_hidden * model.proj_dim,
            "logits": batch * model.proj_dim}
    tuples = (2 if cfg.objective.symmetric else 1) * m * batch
    out = {k: 3 * 2 * v * tuples / 1e6 for k, v in macs.items()}  # MAC -> FLOP, fwd + bwd
    out["total"] = sum(out.values())
    return out


def _step_flops(engine, batch) -> float:
    """MFLOP of one Engine.train_step (forward + backward of every matmul/conv, counted by
    torch.utils.flop_counter): a load-independent measure of the same comparison."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        engine.train_step(batch)
    return counter.get_total_flops() / 1e6


def _reencode_loss_difference(mmcl_engine, reencode_engine, batch) -> float:
    """|loss(mmcl) - loss(re-encoding)| on the same batch, views and generator state (same
    initial weights: both engines were built from the same seed)."""
    import torch

    obj, ref = mmcl_engine.objective, reencode_engine.model
    for a, b in zip(obj.state_dict().values(), ref.objective.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError("the engines do not start from the same weights")
    gen = torch.Generator().manual_seed(1)
    views = [mmcl_engine.augmenter(batch, gen) for _ in range(2)]
    state = gen.get_state()
    with torch.no_grad():
        a = obj(views, batch, generator=gen).loss
        gen.set_state(state)
        b = ref(views, batch, generator=gen).loss
    return float((a - b).abs())


# ------------------------------------------------------------------------------- critics


def tiled_pair_scores(critic, x, y):
    """The baseline for `ConcatCritic.pair_scores`, as FactorCL's code scores all pairs: tile
    all Nx * Ny pairs and call critic(x, y); s[i, j] = f(x_i, y_j). tests/test_critics.py
    checks it against scoring each pair on its own."""
    nx, ny = len(x), len(y)
    x_tiled = x.repeat_interleave(ny, dim=0)  # x_0 x_0 ... x_1 x_1 ...
    y_tiled = y.repeat(nx, 1)  # y_0 y_1 ... y_0 y_1 ...
    return critic(x_tiled, y_tiled).reshape(nx, ny)


def critics(quick: bool) -> dict:
    """ConcatCritic.pair_scores (first layer evaluated on N rows of each side) against
    tiled_pair_scores (FactorCL's code: N^2 concatenations), forward + backward of the
    I_NCE bound as in training."""
    import torch

    from mmcl.objectives.critics import ConcatCritic
    from mmcl.objectives.functional import nce_lower_bound

    # Quick (the smoke test) uses a 4x narrower critic: the tiled N = 512 pass of the default
    # critic is ~26 GMAC forward, seconds per call on one thread.
    dim, threads = 64, 1
    hidden = 64 if quick else 256
    ns = (128, 256, 512)
    rounds = 1 if quick else 4
    rows = []
    with torch_threads(threads):
        torch.manual_seed(0)
        critic = ConcatCritic(dim, dim, hidden)
        for n in ns:
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, dim, generator=gen, requires_grad=True)
            y = torch.randn(n, dim, generator=gen, requires_grad=True)
            with torch.no_grad():
                fast, tiled = critic.pair_scores(x, y), tiled_pair_scores(critic, x, y)
            diff = float((fast - tiled).abs().max())
            del fast, tiled

            def step(score_fn):
                critic.zero_grad(set_to_none=True)
                x.grad = y.grad = None
                nce_lower_bound(score_fn()).backward()

            fns = {"pair_scores": lambda: step(lambda: critic.pair_scores(x, y)),
                   "tiled": lambda: step(lambda: tiled_pair_scores(critic, x, y))}
            peaks = {k: peak_memory(f) for k, f in fns.items()}  # also the warm-up
            times = interleaved(fns, rounds=rounds, warmup=0)
            rows.append({
                "n": n, "max_abs_difference": diff, "equal_to_1e-5": diff <= 1e-5,
                "ms": {k: quartiles([t * 1e3 for t in v]) for k, v in times.items()},
                "speedup": paired_ratio(times["tiled"], times["pair_scores"]),
                "peak_mb": {k: v / MB for k, v in peaks.items()},
                "memory_ratio": peaks["tiled"] / max(peaks["pair_scores"], 1),
            })
    return {"settings": {"critic": f"ConcatCritic({dim}, {dim}, hidden={hidden}, layers=2): "
                                   f"Linear({2 * dim},{hidden})-ReLU-Linear({hidden},{hidden})"
                                   f"-ReLU-Linear({hidden},1)"
                                   + ("" if quick else " (objective.critic_hidden default)"),
                         "work": "scores (N x N) -> I_NCE bound -> backward",
                         "torch_threads": threads, "rounds": rounds,
                         "peak_memory": "torch CPU allocations during one forward+backward "
                                        "(profiler memory events)"},
            "rows": rows}


# --------------------------------------------------------------------------- loss memory


def loss_memory(quick: bool) -> dict:
    """Peak memory of one worker's TupleInfoNCE loss (forward + backward, one direction,
    M = 3 disturbed sets) against the global batch N = W x n at a fixed local batch n: the local
    loss (n anchors against the N gathered candidates, what mmcl does) against every worker
    scoring all N anchors (N x N logits)."""
    import torch
    import torch.nn.functional as F

    from mmcl.objectives.functional import tuple_info_nce

    n_local, m, d, tau = 128, 3, 64, 0.1
    worlds = (1, 2, 4, 8) if quick else (1, 2, 4, 8, 16, 32)
    rows = []
    with torch_threads(1):
        for w in worlds:
            big_n = w * n_local
            gen = torch.Generator().manual_seed(w)
            leaves = [torch.randn(big_n, d, generator=gen, requires_grad=True)
                      for _ in range(2 + m)]

            def run(anchors: int):
                z = [F.normalize(t, dim=-1) for t in leaves]
                loss = tuple_info_nce(z[0][:anchors], z[1], z[2:], [0.0] * m, tau,
                                      distributed=False)
                loss.backward()
                for t in leaves:
                    t.grad = None

            local, full = peak_memory(lambda: run(n_local)), peak_memory(lambda: run(big_n))
            rows.append({"workers": w, "global_batch": big_n, "local_batch": n_local,
                         "local_loss_mb": local / MB, "all_pairs_mb": full / MB,
                         "local_logits": [n_local, (1 + m) * big_n],
                         "all_pairs_logits": [big_n, (1 + m) * big_n]})
    first = rows[0]
    for r in rows:
        r["local_growth"] = r["local_loss_mb"] / first["local_loss_mb"]
        r["all_pairs_growth"] = r["all_pairs_mb"] / first["all_pairs_mb"]
    return {"settings": {"local_batch": n_local, "modalities": m, "proj_dim": d,
                         "what": "one worker's loss: normalised embeddings of the gathered "
                                 "global batch (positives and M disturbed sets) -> logits -> "
                                 "cross-entropy -> backward; peak torch CPU allocations"},
            "rows": rows}


# ---------------------------------------------------------------------------------- read


def _write_list_copy(root: str, out: str, mods: list[str]) -> list[str]:
    """The train shards of `root` rewritten with every modality as list<float> (one shard per
    shard, same rows). Returns the new paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmcl.data.shards import list_shards

    os.makedirs(out, exist_ok=True)
    paths = []
    for i, path in enumerate(list_shards(root, "train")):
        table = pq.read_table(path)
        for name in mods:
            col = table.column(name).combine_chunks()
            storage = col.storage if isinstance(col, pa.ExtensionArray) else col
            width = storage.type.list_size
            offsets = pa.array(np.arange(0, (len(storage) + 1) * width, width, dtype=np.int32))
            lists = pa.ListArray.from_arrays(offsets, storage.flatten())
            table = table.set_column(table.schema.get_field_index(name),
                                     pa.field(name, pa.list_(pa.float32())), lists)
        target = os.path.join(out, f"part-{i:05d}.parquet")
        pq.write_table(table, target)
        paths.append(target)
    return paths


def _decode_fixed(path: str, mods: list[str], shapes: dict) -> int:
    import pyarrow.parquet as pq

    from mmcl.data.shards import tensor_to_numpy

    table = pq.read_table(path, columns=mods)
    for name in mods:
        values, _ = tensor_to_numpy(table.column(name), shapes[name])
        assert values.dtype == np.float32
    return table.num_rows


def _decode_list(path: str, mods: list[str], shapes: dict) -> int:
    """The best case for list<float>: flatten the child values and reshape (after checking
    every row has the expected length, which a list column does not promise)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=mods)
    for name in mods:
        width = int(np.prod(shapes[name]))
        col = table.column(name)
        if pc.min(pc.list_value_length(col)).as_py() != width or \
                pc.max(pc.list_value_length(col)).as_py() != width:
            raise ValueError("ragged rows")
        values = np.concatenate([c.flatten().to_numpy() for c in col.chunks])
        values.reshape(table.num_rows, *shapes[name])
    return table.num_rows


def read_throughput(quick: bool, workdir: str, ray_ready: bool) -> dict:
    """Rows/s and MB/s of reading the train shards into (N, *shape) float32 arrays, fixed-shape
    tensor columns against list<float> columns; pyarrow directly, and Ray Data iter_batches."""
    from mmcl.data.shards import list_shards
    from mmcl.data.synth import generate

    n = 40_000 if quick else 200_000
    root = os.path.join(workdir, "read_rus")
    manifest = generate("rus", root, n=n, seed=0, overwrite=True, split=(1.0, 0.0, 0.0))
    mods = manifest.modality_names
    shapes = {m.name: m.shape for m in manifest.modalities}
    fixed = list_shards(root, "train")
    lists = _write_list_copy(root, os.path.join(workdir, "read_rus_list"), mods)
    rows = manifest.splits["train"]
    payload = rows * sum(int(np.prod(s)) * 4 for s in shapes.values())
    file_bytes = {"fixed_shape_tensor": sum(os.path.getsize(p) for p in fixed),
                  "list_float": sum(os.path.getsize(p) for p in lists)}
    fns = {"fixed_shape_tensor": lambda: sum(_decode_fixed(p, mods, shapes) for p in fixed),
           "list_float": lambda: sum(_decode_list(p, mods, shapes) for p in lists)}
    rounds = 2 if quick else 6
    times = interleaved(fns, rounds=rounds, warmup=1)
    result = {"pyarrow": _read_rows(times, rows, payload, file_bytes)}
    result["pyarrow"]["list_over_fixed_time"] = paired_ratio(times["list_float"],
                                                             times["fixed_shape_tensor"])
    if ray_ready:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False

        from mmcl.data.pipeline import parquet_reader

        def ray_pass(paths):
            def go():
                with parquet_reader(len(paths)):  # the reader mmcl's pipeline uses
                    ds = ray.data.read_parquet(paths, partitioning=None).select_columns(mods)
                count = 0
                for batch in ds.iter_batches(batch_size=4096, batch_format="numpy",
                                             prefetch_batches=2):
                    for name in mods:
                        arr = batch[name]
                        if arr.dtype == object:  # list<float> arrives as an array of arrays
                            arr = np.stack(arr)
                        assert arr.dtype == np.float32 and arr.ndim == 2
                    count += len(batch[mods[0]])
                assert count == rows, count
            return go

        ray_times = interleaved({"fixed_shape_tensor": ray_pass(fixed),
                                 "list_float": ray_pass(lists)},
                                rounds=1 if quick else 3, warmup=0 if quick else 1)
        result["ray_data"] = _read_rows(ray_times, rows, payload, file_bytes)
        result["ray_data"]["list_over_fixed_time"] = paired_ratio(
            ray_times["list_float"], ray_times["fixed_shape_tensor"])
    return {"settings": {"data": f"rus, {rows} rows, modalities {mods} x 16 float32 + "
                                 "labels/factors on disk (only modalities read)",
                         "shards": len(fixed), "payload_mb": payload / MB,
                         "file_mb": {k: v / MB for k, v in file_bytes.items()},
                         "pyarrow": "pq.read_table(modality columns) -> (N, 16) float32 "
                                    "arrays per modality (fixed: mmcl.data.shards."
                                    "tensor_to_numpy; list: length check, flatten, reshape)",
                         "ray_data": "read_parquet (the reader mmcl.data.pipeline uses) -> "
                                     "select_columns -> iter_batches(4096, numpy) -> (B, 16) "
                                     "float32 per modality (np.stack for list<float>, which "
                                     "Ray hands over as an object array); one execution per "
                                     "pass, its start-up included",
                         "cache": "warm page cache (one warm-up pass)"},
            **result}


def _read_rows(times: dict, rows: int, payload: int, file_bytes: dict) -> dict:
    out = {}
    for k, t in times.items():
        med = quartiles(t)["median"]
        out[k] = {"s_per_pass": quartiles(t), "rows_per_s": rows / med,
                  "payload_mb_per_s": payload / MB / med,
                  "file_mb_per_s": file_bytes[k] / MB / med}
    return out


# ---------------------------------------------------------------------------- data plane


class _Loop:
    """Picklable train_loop_per_worker with the benchmark's extra settings."""

    def __init__(self, extra: dict):
        self.extra = extra

    def __call__(self, loop_config: dict):
        from mmcl.bench.plane import plane_loop

        return plane_loop({**loop_config, **self.extra})


READER_VARIANTS = {
    # name: environment for the read_parquet call (mmcl.data.pipeline.parquet_reader reads it)
    "mmcl": {},  # as shipped: Ray Data's V1 Parquet datasource
    "mmcl_per_epoch": {},  # the same, each epoch started only when it begins (before the stream)
    "v2_defaults": {"RAY_DATA_USE_DATASOURCE_V2": "1", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32"},
    "v2_one_actor": {"RAY_DATA_USE_DATASOURCE_V2": "1", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"},
}


@contextmanager
def _variant(name: str):
    """How the Ray path reads Parquet (mmcl.data.pipeline.parquet_reader): "mmcl" as shipped
    (V1 datasource); "v2_defaults" with Ray Data's default V2 reader and its 32 FooterReader
    actors per execution (what mmcl did before); "v2_one_actor" with V2 and one footer actor.
    Set through the environment variables that mmcl leaves to the user."""
    import ray.data

    env = READER_VARIANTS[name]
    before = {k: os.environ.get(k) for k in env}
    ctx = ray.data.DataContext.get_current()
    v2_before = ctx.use_datasource_v2
    os.environ.update(env)
    if env:
        ctx.use_datasource_v2 = True
    try:
        yield
    finally:
        ctx.use_datasource_v2 = v2_before
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _schedule(sources: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, source) per epoch: round 0 is the warm-up (every source once), then `rounds`
    rounds with the order rotated each round."""
    out = [(0, s) for s in sources]
    for r in range(rounds):
        k = r % len(sources)
        out += [(r + 1, s) for s in sources[k:] + sources[:k]]
    return out


def _interleaved_fit(cfg, root, manifest, sources: list[str], rounds: int, workers: int,
                     workdir: str, tag: str) -> dict:
    """One TorchTrainer fit whose epochs cycle through `sources` ("memory" or a reader
    variant); returns the per-epoch entries with their round."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmcl.data.pipeline import build_dataset, train_data_config
    from mmcl.train import launcher

    schedule = _schedule(sources, rounds)
    cfg = cfg.model_copy(update={
        "scaling": cfg.scaling.model_copy(update={"num_workers": workers}),
        "train": cfg.train.model_copy(update={"epochs": len(schedule)})})
    steps = launcher.train_steps(cfg, manifest, workers)
    datasets = {}
    for variant in sources:
        if variant != "memory":
            with _variant(variant):
                datasets[variant] = build_dataset(
                    root, cfg.data.train_split, manifest, launcher.training_columns(manifest),
                    seed=cfg.train.seed, nonfinite=cfg.data.nonfinite)
    out = os.path.join(workdir, f"{tag}.json")
    loop = _Loop({"schedule": [s for _, s in schedule], "out": out, "root": root,
                  "columns": launcher.training_columns(manifest)})
    trainer = TorchTrainer(
        loop,
        train_loop_config={"run": cfg.model_dump(mode="json"), "manifest": manifest.to_json(),
                           "steps_per_epoch": steps},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=tag, storage_path=launcher.storage_root(cfg)),
        datasets=datasets, dataset_config=train_data_config())
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    with open(out) as f:
        history = json.load(f)
    for entry, (r, _) in zip(history, schedule):
        entry["round"] = r
    return {"workers": workers, "steps_per_epoch": steps, "fit_wall_s": wall,
            "schedule": [f"{r}:{s}" for r, s in schedule], "epochs": history}


def _source_rows(fit: dict) -> list[dict]:
    """One row per source of a fit: steady (rounds >= 1) means and the warm-up epoch."""
    rows = []
    for source in dict.fromkeys(e["source"] for e in fit["epochs"]):
        eps = [e for e in fit["epochs"] if e["source"] == source]
        steady = [e for e in eps if e["round"] >= 1] or eps
        mean = lambda key, es=steady: float(np.mean([e[key] for e in es]))  # noqa: E731
        rows.append({
            "source": "memory" if source == "memory" else "ray",
            "variant": source, "workers": fit["workers"],
            "steps_per_epoch": fit["steps_per_epoch"], "fit_wall_s": fit["fit_wall_s"],
            "samples_per_s_total": {"steady": mean("samples_per_s_total"),
                                    "first_epoch": eps[0]["samples_per_s_total"]},
            "data_wait_fraction": {"steady": mean("data_wait_fraction"),
                                   "first_epoch": eps[0]["data_wait_fraction"]},
            "first_batch_s": {"steady": mean("first_batch_s"),
                              "first_epoch": eps[0]["first_batch_s"]}})
    return rows


def _paired(fit: dict, num: str, den: str, key: str = "samples_per_s_total") -> list[float]:
    """Per-round ratios num / den of a fit (rounds >= 1)."""
    by = {}
    for e in fit["epochs"]:
        if e["round"] >= 1:
            by.setdefault(e["round"], {})[e["source"]] = e[key]
    return [v[num] / v[den] for _, v in sorted(by.items()) if num in v and den in v]


def data_plane(quick: bool, workdir: str) -> dict:
    """The Ray path (Ray Data from Parquet shards -> DDP workers, mmcl's reader and Ray Data's
    V2 defaults) against the same loop on in-memory tensors: epochs interleaved inside one
    fit per worker count (same model, batch, workers, warm processes); 1 and 2 workers at
    the same per-worker batch."""
    from mmcl.data.synth import generate
    from mmcl.train import launcher

    n, rounds, rounds_1w = (2048, 1, 1) if quick else (16384, 3, 2)
    # MMCL_BENCH_PLANE=demo: the README demo's size (12 steps per worker and epoch), the
    # stream against per-epoch iteration against in-memory, 3 rounds, 2 workers only.
    demo = os.environ.get("MMCL_BENCH_PLANE") == "demo"
    if demo:
        n, rounds = 4096, 3
    root = os.path.join(workdir, "plane_rus")
    generate("rus", root, n=n, seed=0, overwrite=True)
    cfg = demo_config([f"data.path={root}",
                        f"storage.path={os.path.join(workdir, 'plane_runs')}"])
    root, manifest = launcher.prepare_data(cfg)
    sources_2w = ["mmcl", "memory"] + ([] if quick else ["v2_defaults", "v2_one_actor"])
    if demo:
        sources_2w = ["mmcl", "memory", "mmcl_per_epoch"]
    fits = [_interleaved_fit(cfg, root, manifest, sources_2w, rounds, 2, workdir, "plane-2w")]
    if not (quick or demo):  # quick: one fit (each fit starts a Ray Train worker group)
        fits.append(_interleaved_fit(cfg, root, manifest, ["mmcl", "memory"], rounds_1w, 1,
                                     workdir, "plane-1w"))
    runs = [row for fit in fits for row in _source_rows(fit)]
    two = fits[0]

    def steady(fit_rows, variant, key="samples_per_s_total"):
        return next(r[key]["steady"] for r in fit_rows if r["variant"] == variant)

    rows2 = _source_rows(two)
    pairs = _paired(two, "mmcl", "memory")
    ratio = float(np.median(pairs))
    wait = steady(rows2, "mmcl", "data_wait_fraction")
    scaling = {}
    if len(fits) > 1:
        rows1 = _source_rows(fits[1])
        scaling = {src: steady(rows2, v) / steady(rows1, v)
                   for src, v in (("ray", "mmcl"), ("memory", "memory"))}
    before = {}
    for variant in sources_2w[2:]:
        vp = _paired(two, variant, "memory")
        before[variant] = {"samples_per_s_total": steady(rows2, variant),
                           "over_memory": float(np.median(vp)), "pairs": vp,
                           "over_mmcl": float(np.median(_paired(two, variant, "mmcl"))),
                           "data_wait_fraction": steady(rows2, variant, "data_wait_fraction"),
                           "first_batch_s": steady(rows2, variant, "first_batch_s")}
    import ray

    return {
        "settings": {"data": f"rus, {n} tuples ({manifest.splits['train']} train rows), "
                             "Parquet shards on local disk",
                     "config": "configs/default.yaml (tuple_infonce, default model, batch "
                               f"{cfg.train.batch_size} per worker, shuffle buffer "
                               f"{cfg.data.shuffle_buffer})",
                     "ray_cpus": ray.cluster_resources().get("CPU"),
                     "cpus_per_worker": cfg.scaling.cpus_per_worker,
                     "method": "one TorchTrainer fit per worker count; its epochs cycle "
                               "through the sources: a warm-up round (each source once, "
                               f"reported as 'epoch 1'), then {rounds} round(s) (2 workers) / "
                               f"{rounds_1w} (1 worker), order rotated each round; ratios "
                               "are per-round ratios (median)",
                     "schedule_2_workers": two["schedule"],
                     "variants": "mmcl: the Ray path as shipped (Ray Data's V1 Parquet reader, "
                                 "mmcl.data.pipeline.parquet_reader, one EpochStream per worker "
                                 "running ahead across epochs); mmcl_per_epoch: the same reader, "
                                 "each epoch iterated only when it begins (before the stream); "
                                 "v2_defaults: Ray Data's "
                                 "default V2 reader with 32 FooterReader actors per epoch (mmcl "
                                 "before this change); v2_one_actor: V2 with 1 footer actor",
                     "throughput": "sum over workers of rows / loop time of the epoch "
                                   "(Engine.train_epoch); data wait: time waiting for the next "
                                   "batch / loop time, mean over workers"},
        "fits": fits,
        "runs": runs,
        "ray_over_memory": {"steady": ratio, "pairs": pairs},
        "ray_data_wait_fraction": {"steady": wait,
                                   "first_epoch": next(r["data_wait_fraction"]["first_epoch"]
                                                       for r in rows2
                                                       if r["variant"] == "mmcl")},
        "scaling_2_over_1_workers": scaling,
        "before": before,
        "goals": {
            "ray_vs_memory": {"goal": f">= {GOALS['ray_vs_memory_min']}", "measured": ratio,
                              "met": ratio >= GOALS["ray_vs_memory_min"]},
            "data_wait": {"goal": f"< {GOALS['data_wait_max']}", "measured": wait,
                          "met": wait < GOALS["data_wait_max"]},
        },
    }


# ------------------------------------------------------------------------------- startup


_EPOCH_LINE = re.compile(r"\[mmcl\] epoch 1/\d+\s+step (\d+)\s.*?([0-9.]+) samples/s")


def _run_demo(cmd: list[str], env: dict, cwd: str
              ) -> tuple[float, float | None, str | None, str, int]:
    """(wall s, s until the first epoch line, that line, output, return code) of a command."""
    start = time.perf_counter()
    first, first_line = None, None
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=cwd) as proc:
        for line in proc.stdout:
            lines.append(line)
            if first is None and "[mmcl] epoch 1/" in line:
                first, first_line = time.perf_counter() - start, line
        code = proc.wait()
    return time.perf_counter() - start, first, first_line, "".join(lines), code


def _epoch_1_seconds(line: str | None, batch_size: int, workers: int) -> float | None:
    """How long epoch 1 took, from its line: steps x batch x workers rows at the printed
    samples/s (the sum of the workers' rates)."""
    match = _EPOCH_LINE.search(line or "")
    if not match or float(match.group(2)) <= 0:
        return None
    return int(match.group(1)) * batch_size * workers / float(match.group(2))


def startup(quick: bool, workdir: str) -> dict:
    """The README demo (`mmcl pretrain --config configs/default.yaml`) on a fresh storage
    folder (so it generates its data, as a first run does), in a fresh process with its own
    local Ray: wall time from command to exit, and its phases (mmcl.bench.startup).

    Ray's start-up is ray.init (start_ray) plus Ray Train's worker group start (worker
    processes, torch.distributed, dataset split: the part of fit before epoch 1 begins, i.e.
    the first epoch line's time minus epoch 1's own duration) plus ray.shutdown. Full mode also
    runs the same demo with `--no-ray` (the same Engine in one process on in-memory tensors)."""
    cfg = demo_config([])
    config_path = demo_config_path()
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base_env.pop("RAY_ADDRESS", None)
    cwd = str(_repo_root())
    results = {}
    base = ["pretrain", *(["--config", str(config_path)] if config_path else [])]
    epochs = 1 if quick else cfg.train.epochs  # quick: a smoke test of the same command
    if quick:
        base += ["--set", "train.epochs=1"]
    runs = [("instrumented", True, {}, [])]
    if not quick:
        # (Ray Data's V2 reader defaults against mmcl's V1 reader: see the data_plane section)
        runs += [("no_ray", True, {}, ["--no-ray"])]
    for name, instrumented, extra_env, extra_args in runs:
        env = {**base_env, **extra_env}
        storage = os.path.join(workdir, f"startup-{name}")
        args = [*base, *extra_args, "--set", f"storage.path={storage}",
                "--set", "storage.name=demo"]
        timings = os.path.join(workdir, f"startup-{name}.json")
        if instrumented:
            cmd = [sys.executable, "-m", "mmcl.bench.startup", "--timings", timings, "--", *args]
            env["MMCL_BENCH_T0"] = repr(time.time())
        else:
            script = shutil.which("mmcl", path=str(Path(sys.executable).parent))
            cmd = [script, *args] if script else [sys.executable, "-m", "mmcl.cli", *args]
        wall, first, first_line, output, code = _run_demo(cmd, env, cwd)
        row = {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
               "env": extra_env, "wall_s": wall, "first_epoch_line_s": first,
               "returncode": code}
        if code != 0:
            row["output_tail"] = output[-3000:]
        if instrumented and os.path.exists(timings):
            with open(timings) as f:
                phases = json.load(f)
            fit_start = phases.pop("_fit_start_since_launch_s", None)
            phases["exit_after_main"] = wall - phases.pop("_main_end_since_launch_s")
            epoch_1 = _epoch_1_seconds(first_line, cfg.train.batch_size,
                                       cfg.scaling.num_workers)
            if first is not None and fit_start is not None and "fit" in phases:
                # The first epoch line arrives when epoch 1 is done: what comes before it in
                # fit is the worker group's start plus epoch 1.
                until = first - fit_start
                fit = phases.pop("fit")
                if epoch_1 is not None and epoch_1 < until:
                    phases["fit_worker_group_start"] = until - epoch_1
                    phases["fit_epoch_1"] = epoch_1
                else:
                    phases["fit_until_epoch_1_line"] = until
                phases["fit_after_epoch_1_line"] = fit - until
            row["phases_s"] = phases
            ray_parts = {k: phases[k] for k in ("start_ray", "fit_worker_group_start",
                                                "ray_shutdown") if k in phases}
            if "start_ray" in phases:
                row["ray_start_s"] = ray_parts
                row["ray_init_share"] = phases["start_ray"] / wall
                row["ray_start_share"] = sum(ray_parts.values()) / wall
        results[name] = row
    if "no_ray" in results and results["instrumented"]["returncode"] == 0:
        results["ray_over_no_ray_wall"] = (results["instrumented"]["wall_s"]
                                           / results["no_ray"]["wall_s"])
    goals = {}
    if results["instrumented"]["returncode"] == 0:
        goals = _eval_of_demo(results, os.path.join(workdir, "startup-instrumented", "demo"),
                              base_env, cwd, quick)
    return {"goals": goals, "settings": {"command": "mmcl pretrain --config configs/default.yaml "
                                    "(storage.path set to a fresh folder)"
                                    + (" --set train.epochs=1" if quick else ""),
                         "demo": f"tuple_infonce on rus, {cfg.data.synth.n} tuples, {epochs} "
                                 f"epoch(s), {cfg.scaling.num_workers} workers, batch "
                                 f"{cfg.train.batch_size}",
                         "phases": "interpreter: launch -> wrapper running; imports; "
                                   "prepare_data (generates the data set); start_ray "
                                   "(ray.init of local Ray); fit_worker_group_start (Ray "
                                   "Train: worker processes, DDP, dataset split; the epoch-1 "
                                   "line's time minus epoch 1's duration from its samples/s); "
                                   "fit_epoch_1; fit_after_epoch_1_line (other epochs, "
                                   "checkpoints, shutdown of the worker group); finish_run "
                                   "(export model/); ray_shutdown; exit",
                         "ray_start_share": "(start_ray + fit_worker_group_start + "
                                            "ray_shutdown) / wall"},
            **results}


def _eval_of_demo(results: dict, run: str, env: dict, cwd: str, quick: bool) -> dict:
    """`mmcl eval --run RUN` of the demo run just trained, right after it on the same machine:
    its wall time over the training's (a same-run ratio: both under the same load). Goal
    (full mode, the README's 5 epochs): at most 1. Quick mode trains 1 epoch: reported,
    not judged."""
    script = shutil.which("mmcl", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "mmcl.cli"]
    wall, _, _, output, code = _run_demo([*cmd, "eval", "--run", run], env, cwd)
    row = {"command": f"mmcl eval --run {run}", "eval_wall_s": wall, "returncode": code}
    if code != 0:
        row["output_tail"] = output[-3000:]
    results["eval"] = row
    if code != 0:
        return {}
    ratio = wall / results["instrumented"]["wall_s"]
    results["eval_over_training_wall"] = ratio
    if quick:
        return {}
    return {"eval_over_training_wall": {"goal": f"<= {GOALS['eval_vs_training_max']}",
                                        "measured": ratio,
                                        "met": ratio <= GOALS["eval_vs_training_max"]}}


# -------------------------------------------------------------------------------- main


def run_perf(quick: bool = False, out: str | None = None,
             sections: list[str] | None = None,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
             ) -> dict:
    """Run the benchmark; write OUT/perf.json and OUT/perf.md; return the report."""
    chosen = list(sections or SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from "
                         f"{list(SECTIONS + OPTIONAL_SECTIONS)}")
    out = out or os.path.join("runs", "bench", "quick" if quick else "full")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    report = {"mode": "quick" if quick else "full", "machine": machine(), "sections": {}}
    report["command"] = "mmcl bench perf" + (" --quick" if quick else "")
    workdir = tempfile.mkdtemp(prefix="mmcl-bench-")
    started_ray = False

    def write():
        # After every section, so a long run that is stopped keeps what it measured.
        report["machine_end"] = {"load_average": load_average()}
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        with open(os.path.join(out, "perf.json"), "w") as f:
            json.dump(report, f, indent=2, default=json_default)
        with open(os.path.join(out, "perf.md"), "w") as f:
            f.write(to_markdown(report))

    try:
        sec = report["sections"]
        for name, section in IN_PROCESS_SECTIONS.items():
            if name in chosen:
                sec[name] = _section(name, lambda fn=section: fn(quick), log)
                write()
        if "online_probe" in chosen:
            from mmcl.bench.probe_cost import online_probe

            sec["online_probe"] = _section("online_probe",
                                           lambda: online_probe(quick, workdir), log)
            write()
        needs_ray = {"read", "data_plane", "ray_images", "import"} & set(chosen)
        if needs_ray:
            started_ray = _ensure_ray(log)
        if "read" in chosen:
            sec["read"] = _section("read", lambda: read_throughput(quick, workdir, True), log)
            write()
        if "data_plane" in chosen:
            sec["data_plane"] = _section("data_plane", lambda: data_plane(quick, workdir), log)
            write()
        if "ray_images" in chosen:
            sec["ray_images"] = _section("ray_images", lambda: ray_images(quick, workdir), log)
            write()
        if "import" in chosen:  # mmcl.bench.ingest: `mmcl data import` on images
            from mmcl.bench.ingest import import_throughput

            sec["import"] = _section("import", lambda: import_throughput(quick, workdir), log)
            write()
        if started_ray:
            import ray

            ray.shutdown()
            started_ray = False
        if "startup" in chosen:
            sec["startup"] = _section("startup", lambda: startup(quick, workdir), log)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    write()
    report["_out"] = out
    return report


def _ensure_ray(log) -> bool:
    """Start local Ray the way `mmcl pretrain` does (CPUs: at least workers + 1 for Ray Data).
    Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    from mmcl.train import launcher

    cfg = demo_config([])
    log(f"[bench] starting local Ray ({max(os.cpu_count() or 1, launcher.cpus_needed(cfg))} "
        "CPUs)")
    launcher.start_ray(cfg, None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    return True


# ------------------------------------------------------------------------------ markdown


def _f(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _iqr(q: dict, digits=2) -> str:
    return f"{_f(q['median'], digits)} ({_f(q['p25'], digits)}-{_f(q['p75'], digits)})"


def _load(sec: dict) -> str:
    la = sec.get("load_average", {})
    b, a = la.get("before"), la.get("after")
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v) if v else "n/a"  # noqa: E731
    return f"load average (1/5/15 min) before {fmt(b)}, after {fmt(a)}; {sec.get('elapsed_s')}s"


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# mmcl bench perf ({report['mode']})", "",
             f"- command: `{report['command']}`",
             f"- machine: {describe(m)}",
             f"- started {m['time']}; load average at start {m['load_average']}, at end "
             f"{report.get('machine_end', {}).get('load_average')}; total {report['elapsed_s']}s",
             "- timings: medians over interleaved rounds (interquartile range in brackets); "
             "ratios are same-round ratios", ""]
    sec = report["sections"]
    for name in SECTIONS + OPTIONAL_SECTIONS:
        if name not in sec:
            continue
        s = sec[name]
        lines.append(f"## {name}")
        lines.append("")
        if "error" in s:
            lines += [f"failed: `{s['error']}`", ""]
            continue
        lines += SECTION_MARKDOWN[name](s)
        lines += ["", f"_{_load(s)}_", ""]
    return "\n".join(lines) + "\n"


def _md_settings(s: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in s["settings"].items() if k != "models"]


def _md_goals(goals: dict) -> list[str]:
    return [f"- goal {k}: {g['goal']}, measured {_f(g['measured'])}: "
            f"**{'met' if g['met'] else 'not met'}**" for k, g in goals.items()]


def _md_objective_step(s: dict) -> list[str]:
    out = _md_settings(s) + [f"- model `{x['name']}`: {x['what']}" for x in s["settings"]["models"]]
    out += [""] + table_lines(
        ["model", "M", "tuple ms", "tuple_infonce ms", "re-encoding ms", "tuple_infonce / tuple",
         "re-encoding / tuple_infonce", "loss diff re-enc vs mmcl"],
        [[r["setting"], r["modalities"], _iqr(r["step_ms"]["tuple"], 1),
          _iqr(r["step_ms"]["tuple_infonce"], 1), _iqr(r["step_ms"]["reencode"], 1),
          f"**{_f(r['tuple_infonce_over_tuple']['median'])}**",
          f"**{_f(r['reencode_over_tuple_infonce']['median'])}**",
          f"{r['loss_abs_difference_reencode_vs_mmcl']:.1e}"] for r in s["rows"]])
    out += ["", "Load-independent: MFLOP per step (torch.utils.flop_counter, matmuls forward + "
            "backward), the floor of the disturbed negatives (analytic) and the ratios", ""]
    rows = []
    for r in s["rows"]:
        f, q, floor = r["mflop_per_step"], r["flop_ratios"], r.get("floor_mflop")
        rows.append([r["setting"], r["modalities"], _f(f["tuple"], 0), _f(f["tuple_infonce"], 0),
                     _f(f["reencode"], 0), _f(floor["total"], 0) if floor else "-",
                     f"**{_f(q['tuple_infonce_over_floor_plus_tuple'])}**",
                     _f(q["tuple_infonce_over_tuple"]), _f(q["reencode_over_tuple_infonce"])])
    out += table_lines(["model", "M", "tuple", "tuple_infonce", "re-encoding", "floor",
                        "tuple_infonce / (floor + tuple)", "tuple_infonce / tuple",
                        "re-encoding / tuple_infonce"], rows)
    return out + [""] + _md_goals(s["goals"])


def _md_efficiency(s: dict) -> list[str]:
    out = _md_settings(s) + [
        f"- machine matmul rate (same rounds): **{_f(s['matmul_gflop_per_s'])} GFLOP/s**", ""]
    out += table_lines(
        ["objective", "data", "step ms", "MFLOP per step", "GFLOP/s", "FLOP efficiency"],
        [[r["objective"], r["data"], _iqr(r["step_ms"], 1), _f(r["mflop_per_step"], 0),
          _f(r["gflop_per_s"]), f"**{r['flop_efficiency']:.1%}**"] for r in s["rows"]])
    out += ["", f"- factorcl_ssl / cross on the same `factorcl` batch: time "
            f"{_f(s['factorcl_ssl_over_cross']['median'])}x (same-round median), FLOPs "
            f"{_f(s['factorcl_ssl_over_cross_flops'])}x"]
    return out + [""] + _md_goals(s["goals"])


def _md_critics(s: dict) -> list[str]:
    return _md_settings(s) + [""] + table_lines(
        ["N", "max abs diff", "equal to 1e-5", "pair_scores ms", "tiled ms", "speed-up",
         "peak MB pair_scores", "peak MB tiled", "memory ratio"],
        [[r["n"], f"{r['max_abs_difference']:.1e}", _f(r["equal_to_1e-5"]),
          _iqr(r["ms"]["pair_scores"], 1), _iqr(r["ms"]["tiled"], 1),
          f"**{_f(r['speedup']['median'])}x**", _f(r["peak_mb"]["pair_scores"], 1),
          _f(r["peak_mb"]["tiled"], 1), f"{_f(r['memory_ratio'])}x"] for r in s["rows"]])


def _md_loss_memory(s: dict) -> list[str]:
    return _md_settings(s) + [""] + table_lines(
        ["workers", "global batch", "local-loss logits", "local loss MB (growth)",
         "all-pairs logits", "all-pairs MB (growth)"],
        [[r["workers"], r["global_batch"], f"{r['local_logits'][0]} x {r['local_logits'][1]}",
          f"{_f(r['local_loss_mb'], 1)} ({_f(r['local_growth'], 1)}x)",
          f"{r['all_pairs_logits'][0]} x {r['all_pairs_logits'][1]}",
          f"{_f(r['all_pairs_mb'], 1)} ({_f(r['all_pairs_growth'], 1)}x)"] for r in s["rows"]])


def _md_import(s: dict) -> list[str]:
    from mmcl.bench.ingest import md_import

    return md_import(s, _f)


def _md_read(s: dict) -> list[str]:
    rows = []
    for reader in ("pyarrow", "ray_data"):
        if reader not in s:
            continue
        r = s[reader]
        for fmt in ("fixed_shape_tensor", "list_float"):
            x = r[fmt]
            ratio = f"**{_f(r['list_over_fixed_time']['median'])}**" \
                if fmt == "list_float" else ""
            rows.append([reader, fmt, _iqr(x["s_per_pass"], 3), _f(x["rows_per_s"]),
                         _f(x["payload_mb_per_s"], 1), _f(x["file_mb_per_s"], 1), ratio])
    return _md_settings(s) + [""] + table_lines(
        ["reader", "format", "s per pass", "rows/s", "payload MB/s", "file MB/s",
         "list / fixed time"], rows)


def _md_data_plane(s: dict) -> list[str]:
    out = _md_settings(s) + [""] + table_lines(
        ["source", "reader", "workers", "steps/epoch/worker", "samples/s (steady)",
         "samples/s (epoch 1)", "data wait (steady)", "data wait (epoch 1)",
         "first batch s (steady / epoch 1)", "fit wall s"],
        [[r["source"], r["variant"] if r["source"] == "ray" else "-", r["workers"],
          r["steps_per_epoch"], _f(r["samples_per_s_total"]["steady"], 0),
          _f(r["samples_per_s_total"]["first_epoch"], 0),
          f"{r['data_wait_fraction']['steady']:.1%}",
          f"{r['data_wait_fraction']['first_epoch']:.1%}",
          f"{_f(r['first_batch_s']['steady'])} / {_f(r['first_batch_s']['first_epoch'])}",
          _f(r["fit_wall_s"], 1)] for r in s["runs"]])
    ro = s["ray_over_memory"]
    out += ["", f"- Ray path / in-memory, 2 workers: **{_f(ro['steady'])}** (median of per-round "
                f"ratios {[round(x, 3) for x in ro['pairs']]})",
            f"- Ray path data wait: **{s['ray_data_wait_fraction']['steady']:.1%}** steady "
            f"({s['ray_data_wait_fraction']['first_epoch']:.1%} in the warm-up epoch)",
            "- scaling 1 -> 2 workers (fixed per-worker batch): "
            + (", ".join(f"{k} **{_f(v)}x**" for k, v in s["scaling_2_over_1_workers"].items())
               or "not measured (quick)")]
    for variant, b in s.get("before", {}).items():
        out.append(f"- before ({variant}): {_f(b['samples_per_s_total'], 0)} samples/s = "
                   f"{_f(b['over_memory'])} of in-memory ({_f(b['over_mmcl'])} of mmcl's V1 "
                   f"path), data wait {b['data_wait_fraction']:.1%}, first batch "
                   f"{_f(b['first_batch_s'])} s")
    return out + _md_goals(s["goals"])


def _md_startup(s: dict) -> list[str]:
    runs = {k: r for k, r in s.items() if isinstance(r, dict) and "wall_s" in r}
    rows = []
    for name, r in runs.items():
        env = " ".join(f"{k}={v}" for k, v in r.get("env", {}).items()) or "-"
        if "ray_start_share" in r:
            share = (f"{sum(r['ray_start_s'].values()):.1f} ({r['ray_start_share']:.0%})")
            init = f"{r['ray_start_s']['start_ray']:.1f} ({r['ray_init_share']:.0%})"
        else:
            share = init = "-"
        rows.append([name, env, f"**{_f(r['wall_s'], 1)}**", _f(r["first_epoch_line_s"], 1),
                     share, init, r["returncode"]])
    out = _md_settings(s) + [""] + table_lines(
        ["run", "environment", "wall s (command to exit)", "first epoch line s",
         "Ray start-up s (share of wall)", "of which ray.init", "exit code"], rows)
    if "ray_over_no_ray_wall" in s:
        out += ["", f"- demo on Ray / the same demo with `--no-ray`: "
                    f"**{_f(s['ray_over_no_ray_wall'])}x** wall time"]
    ev = s.get("eval", {})
    if "eval_over_training_wall" in s:
        out += ["", f"- `mmcl eval` of the demo run, right after it: {_f(ev['eval_wall_s'], 1)} "
                    f"s wall; eval / training (the instrumented run's wall): "
                    f"**{_f(s['eval_over_training_wall'])}**"]
    elif ev:
        out += ["", f"- `mmcl eval` of the demo run failed (exit {ev['returncode']}); output "
                    "tail:", "```", ev.get("output_tail", ""), "```"]
    if s.get("goals"):
        out += [""] + _md_goals(s["goals"])
    phased = {k: r for k, r in runs.items() if "phases_s" in r}
    if phased:
        keys = list(dict.fromkeys(k for r in phased.values() for k in r["phases_s"]))
        rows = []
        for k in keys:
            cells = []
            for r in phased.values():
                v = r["phases_s"].get(k)
                cells.append("-" if v is None else f"{v:.2f} ({v / r['wall_s']:.0%})")
            rows.append([k, *cells])
        out += [""] + table_lines(["phase (s)", *phased], rows)
    for name, r in runs.items():
        if r["returncode"] != 0:
            out += ["", f"{name} failed; output tail:", "```", r.get("output_tail", ""), "```"]
    return out


# Each section's measurement (those that need neither Ray nor a work folder) and its
# markdown, named once here.
IN_PROCESS_SECTIONS = {"objective_step": objective_step, "efficiency": efficiency,
                       "critics": critics, "loss_memory": loss_memory,
                       "hf_encoders": hf_encoders, "encoders": encoders, "clip_step": clip_step,
                       "compile": compile_step}
SECTION_MARKDOWN = {"objective_step": _md_objective_step, "efficiency": _md_efficiency,
                    "critics": _md_critics, "loss_memory": _md_loss_memory,
                    "hf_encoders": md_hf_encoders, "encoders": md_encoders,
                    "online_probe": md_online_probe,
                    "read": _md_read, "data_plane": _md_data_plane, "startup": _md_startup,
                    "import": _md_import, "clip_step": md_clip_step,
                    "ray_images": md_ray_images, "compile": md_compile_step}
