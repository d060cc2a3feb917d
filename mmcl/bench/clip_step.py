"""`mmcl bench perf` sections clip_step and ray_images: mmcl on the towers CLIP users train.

clip_step   every objective's `Engine.train_step` on an image + text batch with Hugging Face
            towers (a ViT and a BERT built from their configs, nothing downloaded) against a
            bare PyTorch loop on the same towers, written here: one view per modality, the
            towers' CLS tokens projected linearly, symmetric InfoNCE with a learnt
            temperature, AdamW, bf16 autocast on CUDA (what open_clip does). Per row:
            samples/s (interleaved rounds, same-round ratios to the bare loop), FLOPs per
            sample (torch.utils.flop_counter: exact and load-independent on any machine),
            FLOP/s over the matmul rate measured in the same rounds, peak memory.
            Sizes: ViT-B/16 at 224 px + BERT-base, 32 tokens, batch 256, embed 512 on a GPU;
            small towers on a CPU.
ray_images  the Ray path (Parquet shards of uint8 images + a 16-d vector -> Ray Data -> one
            Ray Train worker, ViT + MLP, `cross`): samples/s and data wait of every epoch,
            the first one (Ray Data's start) apart. 224x224 and ViT-B/16 on a GPU.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcl.bench.timing import interleaved, paired_ratio, peak_memory, quartiles, torch_threads
from mmcl.markdown import table_lines


@dataclass(frozen=True)
class Towers:
    """The image and text towers and the batch a comparison runs on."""

    side: int
    patch: int
    tokens: int
    width: int
    layers: int
    heads: int
    batch: int
    embed: int
    vocab: int = 30522

    def vit(self) -> dict:
        return {"model_type": "vit", "image_size": self.side, "patch_size": self.patch,
                **self._common()}

    def bert(self) -> dict:
        return {"model_type": "bert", "vocab_size": self.vocab,
                "max_position_embeddings": max(64, self.tokens), **self._common()}

    def _common(self) -> dict:
        return {"hidden_size": self.width, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "intermediate_size": 4 * self.width}

    def describe(self) -> str:
        return (f"ViT {self.side}px/{self.patch} + BERT {self.tokens} tokens, width "
                f"{self.width}, {self.layers} blocks, batch {self.batch}, embed {self.embed}")


SIZES = {
    "quick": Towers(side=32, patch=8, tokens=16, width=64, layers=2, heads=4, batch=16,
                    embed=64, vocab=1000),
    "cpu": Towers(side=96, patch=16, tokens=32, width=256, layers=4, heads=4, batch=32,
                  embed=128, vocab=1000),
    "clip": Towers(side=224, patch=16, tokens=32, width=768, layers=12, heads=12, batch=256,
                   embed=512),  # ViT-B/16 + BERT-base
}

# (row name, mmcl overrides): every objective at its defaults on these towers, plus the
# variants the GPU issue asked about.
NO_AUGMENT = ["augment.per_modality.image={noise: 0, dropout: 0}",
              "augment.per_modality.caption={noise: 0, dropout: 0}"]
ROWS = [("cross", []), ("cross, no augmentation", NO_AUGMENT),
        ("cross, 2 views", ["objective.views=2"]), ("cross_self", []), ("tuple", []),
        ("tuple_infonce", []), ("comm", []), ("supcon", []), ("factorcl_ssl", []),
        ("factorcl_sup", [])]
GPU_ROWS = [("cross, fp32", ["train.mixed_precision=false"])]
GOALS = {"cross_over_bare_samples_per_s_min": 0.95, "cross_over_bare_flops_max": 1.02,
         "flop_fraction_min": 0.35, "cross_over_bare_peak_memory_max": 1.2}


def towers_for(quick: bool, device: str) -> Towers:
    return SIZES["quick" if quick else ("clip" if device == "cuda" else "cpu")]


def manifest_of(t: Towers):
    from mmcl.data.schema import LabelSpec, Manifest, ModalitySpec

    return Manifest([ModalitySpec("image", (3, t.side, t.side), "image", "uint8"),
                     ModalitySpec("caption", (t.tokens,), "text", "int64",
                                  vocab_size=t.vocab, mask_id=3)],
                    [LabelSpec("label", "classification", 10)])


def batch_of(t: Towers) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 256, (t.batch, 3, t.side, t.side), dtype=torch.uint8,
                                   generator=gen),
            "caption": torch.randint(4, t.vocab, (t.batch, t.tokens), generator=gen),
            "caption__len": torch.randint(t.tokens // 2, t.tokens + 1, (t.batch,),
                                          generator=gen),
            "label": torch.randint(0, 10, (t.batch,), generator=gen)}


def mmcl_overrides(t: Towers, objective: str) -> list[str]:
    as_yaml = lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"  # noqa: E731
    return [f"objective.name={objective}", f"train.batch_size={t.batch}", "train.seed=0",
            f"model.embed_dim={t.embed}", f"model.proj_hidden={t.embed}",
            f"model.proj_dim={t.embed}",
            "model.encoders.image.kind=hf", f"model.encoders.image.hf_config={as_yaml(t.vit())}",
            "model.encoders.image.pooling=cls",
            "model.encoders.caption.kind=hf",
            f"model.encoders.caption.hf_config={as_yaml(t.bert())}",
            "model.encoders.caption.pooling=cls",
            "augment.per_modality.image={crop: 0.9, flip: 0.5, color_jitter: 0.8, noise: 0, "
            "dropout: 0}",
            "augment.per_modality.caption={token_mask: 0.15, noise: 0, dropout: 0}"]


class BareClip(nn.Module):
    """The hand-written loop's model: the towers, their CLS tokens projected linearly to
    the embedding, a learnt temperature (CLIP's initialisation, 1/0.07)."""

    def __init__(self, t: Towers):
        super().__init__()
        import transformers

        def build(raw: dict):
            raw = dict(raw)
            config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
            try:  # the pooler is never used: leave it out where the model allows
                return transformers.AutoModel.from_config(config, add_pooling_layer=False)
            except TypeError:
                return transformers.AutoModel.from_config(config)

        self.image, self.text = build(t.vit()), build(t.bert())
        self.image_proj = nn.Linear(t.width, t.embed)
        self.text_proj = nn.Linear(t.width, t.embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        image = self.image_proj(self.image(pixel_values=images).last_hidden_state[:, 0])
        text = self.text_proj(self.text(input_ids=ids, attention_mask=mask)
                              .last_hidden_state[:, 0])
        logits = self.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class BareLoop:
    """One step of the hand-written loop on a host batch: copy, scale the pixels, forward
    under bf16 autocast (CUDA), backward, AdamW."""

    def __init__(self, t: Towers, device: str):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = BareClip(t).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                           fused=self.device.type == "cuda" or None)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" else torch.autocast("cpu", enabled=False))

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"].to(self.device, non_blocking=True).float().div_(255.0)
        images = (images - 0.5) / 0.5
        ids = batch["caption"].to(self.device, non_blocking=True)
        lengths = batch["caption__len"].to(self.device, non_blocking=True)
        mask = (torch.arange(ids.shape[1], device=self.device) < lengths[:, None]).long()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(images, ids, mask)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def resident_bytes(self) -> int:
        return _resident_bytes(self.model, [self.optimizer])


def _resident_bytes(module: nn.Module, optimizers) -> int:
    """Bytes a model keeps between steps: parameters, their gradients, optimiser state."""
    tensors = [p for p in module.parameters()] + [p.grad for p in module.parameters()
                                                   if p.grad is not None]
    tensors += [v for opt in optimizers for state in opt.state.values()
                for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(x.numel() * x.element_size() for x in tensors)


def step_flops(step, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def step_peak_bytes(step, batch, resident: int, device: str) -> int:
    """Peak memory of one step of a model that holds `resident` bytes between steps, apart
    from everything else alive (the other rows' models)."""
    if device != "cuda":
        return resident + peak_memory(lambda: step(batch))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(batch)
    torch.cuda.synchronize()
    return resident + torch.cuda.max_memory_allocated() - before


def matmul_rate_fn(device: str):
    """(a call that runs matmuls, its FLOPs): bf16 8192^3 on CUDA, fp32 256^3 x 8 on CPU."""
    if device == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        return (lambda: a @ b), 2 * 8192 ** 3
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def matmuls():
        for _ in range(8):
            a @ b
    return matmuls, 2 * 256 ** 3 * 8


def clip_step(quick: bool) -> dict:
    """The clip_step section (see the module doc)."""
    from mmcl import config
    from mmcl.train.engine import Engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = towers_for(quick, device)
    manifest, batch = manifest_of(t), batch_of(t)
    rows = ROWS + (GPU_ROWS if device == "cuda" else [])
    steps_per_call = 1 if device == "cpu" else 5
    rounds, warmup = (2, 1) if quick else ((3, 1) if device == "cpu" else (5, 1))

    def synced(step, model=None):
        def run():
            for _ in range(steps_per_call):
                step(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            if model is not None:  # twelve models' gradients need not all stay resident
                model.zero_grad(set_to_none=True)
        return run

    with torch_threads(1 if device == "cpu" else torch.get_num_threads()):
        models = {"bare loop": BareLoop(t, device)}
        for name, extra in rows:
            objective = name.split(",")[0]
            models[name] = Engine(config.load(None, [*mmcl_overrides(t, objective), *extra]),
                                  manifest, 10**6, device=device)
        steps = {name: m.train_step for name, m in models.items()}
        flops = {name: step_flops(step, batch) for name, step in steps.items()}
        resident = {name: (m.resident_bytes() if isinstance(m, BareLoop)
                           else _resident_bytes(m.objective, m.optimizers.values()))
                    for name, m in models.items()}
        peaks = {name: step_peak_bytes(step, batch, resident[name], device)
                 for name, step in steps.items()}
        matmul, matmul_flop = matmul_rate_fn(device)
        fns = {name: synced(step, m.model) for (name, step), m in zip(steps.items(),
                                                                       models.values())}
        fns["matmul"] = synced(lambda _: matmul())
        times = interleaved(fns, rounds=rounds, warmup=warmup)
    rate = [steps_per_call * matmul_flop / s for s in times.pop("matmul")]
    out_rows = []
    for name, per_call in times.items():
        per_step = [s / steps_per_call for s in per_call]
        out_rows.append({
            "step": name,
            "samples_per_s": t.batch / quartiles(per_step)["median"],
            "over_bare_samples_per_s": paired_ratio(times["bare loop"], per_call)["median"],
            "gflop_per_sample": flops[name] / t.batch / 1e9,
            "flops_over_bare": flops[name] / flops["bare loop"],
            "flop_fraction": quartiles([flops[name] / s / r
                                        for s, r in zip(per_step, rate)])["median"],
            "peak_gib": peaks[name] / 2**30,
            "peak_over_bare": peaks[name] / peaks["bare loop"]})
    by_name = {r["step"]: r for r in out_rows}
    cross = by_name["cross"]
    measured = {"cross_over_bare_samples_per_s_min": cross["over_bare_samples_per_s"],
                "cross_over_bare_flops_max": cross["flops_over_bare"],
                "flop_fraction_min": cross["flop_fraction"],
                "cross_over_bare_peak_memory_max": cross["peak_over_bare"]}
    goals = {k: {"goal": f"{'>=' if k.endswith('_min') else '<='} {v}", "measured": measured[k],
                 "met": measured[k] >= v if k.endswith("_min") else measured[k] <= v}
             for k, v in GOALS.items()}
    return {"settings": {"device": device, "towers": t.describe(),
                         "precision": "bf16 autocast" if device == "cuda" else "fp32",
                         "steps_per_timed_call": steps_per_call, "rounds": rounds,
                         "matmul": "bf16 8192^3" if device == "cuda" else "fp32 256^3 x 8",
                         "bare loop": "one view, CLS -> linear, symmetric InfoNCE, learnt "
                                      "temperature, AdamW"},
            "matmul_tflop_per_s": quartiles(rate)["median"] / 1e12,
            "rows": out_rows, "goals": goals}


def md_clip_step(s: dict) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines.append(f"- matmul rate measured in the same rounds: {s['matmul_tflop_per_s']:.3g} "
                 "TFLOP/s")
    lines += [""] + table_lines(
        ["step", "samples/s", "/ bare", "GFLOP/sample", "FLOPs / bare", "FLOP/s / matmul rate",
         "peak GiB", "peak / bare"],
        [[r["step"], f"{r['samples_per_s']:.0f}", f"{r['over_bare_samples_per_s']:.2f}",
          f"{r['gflop_per_sample']:.3g}", f"{r['flops_over_bare']:.3f}",
          f"{r['flop_fraction']:.2f}", f"{r['peak_gib']:.2f}", f"{r['peak_over_bare']:.2f}"]
         for r in s["rows"]])
    lines.append("")
    lines += [f"- goal {k}: {g['goal']}, measured {g['measured']:.3f}: "
              f"**{'met' if g['met'] else 'not met'}**" for k, g in s["goals"].items()]
    return lines


# ------------------------------------------------------------------------- the Ray path

RAY_SIZES = {"quick": dict(rows=256, side=32, patch=8, width=64, layers=2, heads=4, batch=32,
                           epochs=2),
             "cpu": dict(rows=1024, side=64, patch=16, width=128, layers=2, heads=4, batch=64,
                         epochs=3),
             "clip": dict(rows=4096, side=224, patch=16, width=768, layers=12, heads=12,
                          batch=256, epochs=3)}


def write_image_data(root: str, rows: int, side: int) -> None:
    """`rows` tuples of a random uint8 image 3 x side x side and a 16-d vector, 80% of them
    for training, in shards of at most 64 MB."""
    from mmcl.data.schema import Manifest, ModalitySpec
    from mmcl.data.shards import write_dataset

    rng = np.random.default_rng(0)
    manifest = Manifest([ModalitySpec("image", (3, side, side), "image", "uint8"),
                         ModalitySpec("vector", (16,))])
    cut = {"train": (0, int(rows * 0.8)), "val": (int(rows * 0.8), int(rows * 0.9)),
           "test": (int(rows * 0.9), rows)}
    splits = {name: {"id": np.arange(a, b, dtype=np.int64),
                     "image": rng.integers(0, 256, (b - a, 3, side, side), dtype=np.uint8),
                     "vector": rng.standard_normal((b - a, 16)).astype(np.float32)}
              for name, (a, b) in cut.items()}
    write_dataset(root, manifest, splits, stats_split="train")


def ray_images(quick: bool, workdir: str) -> dict:
    """The ray_images section (see the module doc): `mmcl pretrain`'s own path."""
    from mmcl import config
    from mmcl.train import launcher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = RAY_SIZES["quick" if quick else ("clip" if device == "cuda" else "cpu")]
    root = os.path.join(workdir, f"images-{size['side']}")
    if not os.path.exists(os.path.join(root, "manifest.json")):
        write_image_data(root, size["rows"], size["side"])
    vit = (f"{{model_type: vit, image_size: {size['side']}, patch_size: {size['patch']}, "
           f"hidden_size: {size['width']}, num_hidden_layers: {size['layers']}, "
           f"num_attention_heads: {size['heads']}, intermediate_size: {4 * size['width']}}}")
    cpus = max(1, (os.cpu_count() or 2) // 2) if device == "cuda" else 1
    cfg = config.load(None, [
        f"data.path={root}", "objective.name=cross", f"train.epochs={size['epochs']}",
        f"train.batch_size={size['batch']}", "scaling.num_workers=1",
        f"scaling.use_gpu={str(device == 'cuda').lower()}", f"scaling.cpus_per_worker={cpus}",
        "scaling.max_failures=0", "model.encoders.image.kind=hf",
        f"model.encoders.image.hf_config={vit}", "model.encoders.image.pooling=cls",
        "augment.per_modality.image={crop: 0.9, flip: 0.5, noise: 0, dropout: 0}",
        f"storage.path={os.path.join(workdir, 'ray-runs')}", "storage.name=ray-images",
        "eval.every_epochs=0", "tracking.backend=none"])
    start = time.perf_counter()
    result = launcher.pretrain(cfg)
    wall = time.perf_counter() - start
    history = result.history
    epochs = [{"epoch": h["epoch"], "steps": h["steps"],
               "samples_per_s": h["samples_per_s_total"],
               "data_wait_fraction": h["data_wait_fraction"]} for h in history]
    later = epochs[1:] or epochs
    return {"settings": {"device": device, "images": f"3x{size['side']}x{size['side']} uint8 "
                         "+ a 16-d vector", "train_rows": int(size["rows"] * 0.8),
                         "model": f"ViT {size['side']}px/{size['patch']}, width "
                                  f"{size['width']}, {size['layers']} blocks + MLP",
                         "objective": "cross", "batch_size": size["batch"], "workers": 1,
                         "cpus_per_worker": cpus, "epochs": size["epochs"]},
            "epochs": epochs, "wall_s": wall,
            "steps_expected_per_epoch": (int(size["rows"] * 0.8)) // size["batch"],
            "data_wait_after_epoch_1_max": max(e["data_wait_fraction"] for e in later),
            "goals": {"data_wait_after_epoch_1": {
                "goal": "< 0.05", "measured": max(e["data_wait_fraction"] for e in later),
                "met": max(e["data_wait_fraction"] for e in later) < 0.05}}}


def md_ray_images(s: dict) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += [f"- steps per epoch expected: {s['steps_expected_per_epoch']}",
              f"- wall time of the run (Ray start, data set read, build, epochs, export): "
              f"{s['wall_s']:.0f} s", ""]
    lines += table_lines(["epoch", "steps", "samples/s", "data wait"],
                         [[e["epoch"], e["steps"], f"{e['samples_per_s']:.0f}",
                           f"{e['data_wait_fraction']:.1%}"] for e in s["epochs"]])
    lines.append("")
    lines += [f"- goal {k}: {g['goal']}, measured {g['measured']:.3f}: "
              f"**{'met' if g['met'] else 'not met'}**" for k, g in s["goals"].items()]
    return lines


# --------------------------------------------------------------------- torch.compile

def compile_step(quick: bool) -> dict:
    """`train.compile` (torch.compile of the encoders) against eager, `cross` on the
    clip_step towers: the compile time (the first steps) and samples/s after it."""
    from mmcl import config
    from mmcl.train.engine import Engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = towers_for(quick, device)
    manifest, batch = manifest_of(t), batch_of(t)
    engines, first_s = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        engines[name] = Engine(config.load(None, [*mmcl_overrides(t, "cross"),
                                                  f"train.compile={str(compiled).lower()}"]),
                               manifest, 10**6, device=device)
        start = time.perf_counter()
        for _ in range(2):  # the compile, and a recompile for the train-mode graph if any
            engines[name].train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        first_s[name] = time.perf_counter() - start
    steps_per_call = 1 if device == "cpu" else 5

    def timed(engine):
        def run():
            for _ in range(steps_per_call):
                engine.train_step(batch)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    times = interleaved({k: timed(e) for k, e in engines.items()},
                        rounds=2 if quick else 4, warmup=1)
    return {"settings": {"device": device, "towers": t.describe(), "objective": "cross",
                         "steps_per_timed_call": steps_per_call},
            "first_two_steps_s": first_s,
            "samples_per_s": {k: t.batch * steps_per_call / quartiles(v)["median"]
                              for k, v in times.items()},
            "compiled_over_eager_samples_per_s":
                paired_ratio(times["eager"], times["compiled"])["median"]}


def md_compile_step(s: dict) -> list[str]:
    lines = [f"- {k}: {v}" for k, v in s["settings"].items()]
    lines += [f"- first two steps (compile included): eager {s['first_two_steps_s']['eager']:.1f}"
              f" s, compiled {s['first_two_steps_s']['compiled']:.1f} s",
              f"- samples/s after: eager {s['samples_per_s']['eager']:.0f}, compiled "
              f"{s['samples_per_s']['compiled']:.0f} (compiled / eager "
              f"{s['compiled_over_eager_samples_per_s']:.2f})"]
    return lines
