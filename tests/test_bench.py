"""`mmcl bench`: the baseline it compares against is right, its helpers measure what they say,
the Parquet reader choice of the pipeline behaves, and `mmcl bench perf --quick` runs end to
end and writes valid JSON and markdown. No timing is asserted anywhere."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmcl import config
from mmcl.bench.reencode import ReencodingTupleInfoNCE
from mmcl.bench.timing import interleaved, paired_ratio, peak_memory, quartiles
from mmcl.data.schema import Manifest, ModalitySpec
from mmcl.objectives import build_objective

SMALL = ["model.embed_dim=16", "model.encoder.hidden=16", "model.proj_hidden=16",
         "model.proj_dim=16", "model.fusion_heads=2", "objective.name=tuple_infonce"]


@pytest.mark.parametrize("extra", [[], ["objective.symmetric=false"],
                                   ["objective.negative_weights={m1: 0.0}"]])
def test_reencoding_baseline_gives_mmcls_loss_and_gradients(extra):
    """The reference code's step (every disturbed tuple through the whole network) and mmcl's
    (encoders once per view) are the same function of the weights."""
    manifest = Manifest([ModalitySpec(f"m{k}", (6,)) for k in range(3)], [])
    torch.manual_seed(0)
    objective = build_objective(config.load(None, [*SMALL, *extra]), manifest)
    reference = ReencodingTupleInfoNCE(objective)
    gen = torch.Generator().manual_seed(0)
    views = [{f"m{k}": torch.randn(10, 6, generator=gen) for k in range(3)} for _ in range(2)]
    grads, losses = [], []
    for model in (objective, reference):
        objective.zero_grad()
        loss = model(views, views[0], generator=torch.Generator().manual_seed(5)).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in objective.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):  # float32: the fast path sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reencoding_baseline_refuses_other_objectives():
    manifest = Manifest([ModalitySpec(f"m{k}", (6,)) for k in range(2)], [])
    objective = build_objective(config.load(None, [*SMALL, "objective.name=tuple"]), manifest)
    with pytest.raises(TypeError, match="TupleInfoNCE"):
        ReencodingTupleInfoNCE(objective)


def test_interleaved_rounds_and_same_round_ratios():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        rounds=4, warmup=1, inner=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert calls.count("a") == calls.count("b") == 1 + 4 * 2
    # The order rotates, so neither side always runs first in a round.
    firsts = [calls[2 + 4 * r] for r in range(4)]
    assert set(firsts) == {"a", "b"}
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])["median"] == 2.0
    assert quartiles([5.0]) == {"median": 5.0, "p25": 5.0, "p75": 5.0, "n": 1}


def test_peak_memory_sees_torch_allocations_and_their_peak():
    assert peak_memory(lambda: None) == 0
    # 4 MB alive at once, twice in sequence: the peak is one of them, not the sum.
    def two_in_a_row():
        for _ in range(2):
            torch.ones(1000, 1000).sum()
    peak = peak_memory(two_in_a_row)
    assert 4_000_000 <= peak < 8_000_000


def test_parquet_reader_chooses_v1_unless_the_user_chose(monkeypatch):
    ray_data = pytest.importorskip("ray.data")
    from mmcl.data import pipeline

    ctx = ray_data.DataContext.get_current()
    monkeypatch.delenv(pipeline.DATASOURCE_V2_ENV, raising=False)
    monkeypatch.delenv(pipeline.FOOTER_ACTORS_ENV, raising=False)
    before = ctx.use_datasource_v2
    with pipeline.parquet_reader(3):
        assert ctx.use_datasource_v2 is False
        assert pipeline.FOOTER_ACTORS_ENV not in os.environ
    assert ctx.use_datasource_v2 == before

    monkeypatch.setenv(pipeline.DATASOURCE_V2_ENV, "1")  # the user asked for V2
    with pipeline.parquet_reader(250):
        assert ctx.use_datasource_v2 == before
        assert os.environ[pipeline.FOOTER_ACTORS_ENV] == "3"
    assert pipeline.FOOTER_ACTORS_ENV not in os.environ

    monkeypatch.setenv(pipeline.FOOTER_ACTORS_ENV, "7")  # and sized its pool: left alone
    with pipeline.parquet_reader(1):
        assert os.environ[pipeline.FOOTER_ACTORS_ENV] == "7"
    assert [pipeline.footer_actor_count(n) for n in (1, 100, 101, 10**6)] == [1, 1, 2, 32]


@pytest.mark.slow
@pytest.mark.ray
def test_bench_perf_quick_runs_and_writes_json_and_markdown(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "mmcl.cli", "bench", "perf", "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=1800)  # generous: shared CI machines
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "perf.json").read_text())
    assert report["mode"] == "quick"
    for key in ("cores", "gpu", "load_average", "versions", "torch_threads"):
        assert key in report["machine"], key
    sections = report["sections"]
    assert set(sections) == {"objective_step", "efficiency", "critics", "loss_memory",
                             "hf_encoders", "encoders", "clip_step", "online_probe", "read",
                             "data_plane", "ray_images", "startup"}
    for name, section in sections.items():
        assert "error" not in section, (name, section.get("error"))
        assert "load_average" in section and "elapsed_s" in section
    step = sections["objective_step"]
    assert {(r["setting"], r["modalities"]) for r in step["rows"]} >= {
        ("default", 2), ("default", 3), ("default", 4)}
    assert all(r["loss_abs_difference_reencode_vs_mmcl"] < 1e-5 for r in step["rows"])
    default3 = next(r for r in step["rows"] if r["setting"] == "default" and r["modalities"] == 3)
    assert default3["floor_mflop"]["total"] < default3["mflop_per_step"]["tuple_infonce"]
    eff = sections["efficiency"]
    assert eff["matmul_gflop_per_s"] > 0
    assert {r["objective"] for r in eff["rows"]} >= {"tuple_infonce", "cross", "factorcl_ssl"}
    assert all(0 < r["flop_efficiency"] for r in eff["rows"])
    assert [r["n"] for r in sections["critics"]["rows"]] == [128, 256, 512]
    assert all(r["equal_to_1e-5"] for r in sections["critics"]["rows"])
    plane = sections["data_plane"]
    assert {(r["source"], r["workers"]) for r in plane["runs"]} >= {("ray", 2), ("memory", 2)}
    assert "ray_over_memory" in plane and "ray_data_wait_fraction" in plane
    assert {"pyarrow", "ray_data"} <= set(sections["read"])
    assert sections["startup"]["instrumented"]["returncode"] == 0
    # issue 35, item 4: `mmcl eval` of the demo run, as a same-run ratio to its training
    assert sections["startup"]["eval"]["returncode"] == 0
    assert sections["startup"]["eval_over_training_wall"] > 0
    clip = {r["step"]: r for r in sections["clip_step"]["rows"]}
    assert {"bare loop", "cross", "cross, 2 views", "tuple_infonce", "comm",
            "factorcl_ssl"} <= set(clip)
    # FLOP counts are exact: one view of cross does the bare CLIP loop's work, two twice
    assert clip["cross"]["flops_over_bare"] <= 1.02
    assert clip["cross, 2 views"]["flops_over_bare"] >= 1.9
    images = sections["ray_images"]
    assert [e["steps"] for e in images["epochs"]] == \
        [images["steps_expected_per_epoch"]] * images["settings"]["epochs"]
    markdown = (out / "perf.md").read_text()
    for heading in ("# mmcl bench perf (quick)", "## objective_step", "## efficiency",
                    "## critics", "## loss_memory", "## hf_encoders", "## online_probe",
                    "## read", "## data_plane", "## clip_step", "## ray_images",
                    "## startup"):
        assert heading in markdown, heading
    assert "| model | M |" in markdown and "| N |" in markdown
    assert "frozen / trainable step" in markdown
    assert "TupleInfoNCE / plain tuple-contrast step" in markdown
    probe = sections["online_probe"]
    assert probe["probe_over_epoch"]["median"] > 0 and probe["last_figures"]
    assert "online probe / epoch" in markdown
    assert "eval / training (the instrumented run's wall)" in markdown


def test_the_import_benchs_pillow_limit_decodes_what_the_import_stores(tmp_path):
    """The limit `mmcl bench perf --only import` compares the import with is the import's own
    image decode in Pillow calls alone: it must give the very arrays the import stores."""
    import numpy as np

    from mmcl.bench.ingest import _pillow_decode, _write_images
    from mmcl.data.ingest import Decoder, ImportSpec, build_manifest

    _write_images(str(tmp_path), 3, 80)
    for size in ([24, 24], [16, 40]):  # square and not: the crop picks the right side
        spec = ImportSpec.model_validate({"modalities": {
            "image": {"column": "file", "kind": "image", "size": size},
            "feat": {"column": "feat", "holds": "numbers", "kind": "vector", "shape": [8]}}})
        decoder = Decoder(spec, build_manifest(spec), str(tmp_path), None, None)
        for i in range(3):
            stored, _ = decoder.decode("image", f"img/{i}.jpg", i)
            limit = _pillow_decode(str(tmp_path / "img" / f"{i}.jpg"), *size)
            assert limit.shape == (3, *size) and np.array_equal(stored, limit)
