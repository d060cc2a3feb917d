"""Ray Tune: YAML search spaces, a sweep with ASHA on local Ray, and TupleInfoNCE's sample
optimization (policy update, shared checkpoints between rounds, resume after a kill)."""

import json
import math
import os

import numpy as np
import pytest

from mmcl import config
from mmcl.config import ConfigError
from mmcl.tune import space
from mmcl.cli import add_tune, main
from mmcl.tune.cli import choose_strategy
from mmcl.tune.sample_opt import Policy, SampleOptConfig
from mmcl.tune.sweep import SweepConfig, best_row, section_config

ray = pytest.importorskip("ray")

TINY = {
    "data": {"synth": {"preset": "rus", "n": 300}},
    "train": {"batch_size": 32, "warmup_epochs": 0, "epochs": 2, "lr": 3.0e-3},
    "model": {"embed_dim": 16, "encoder": {"hidden": 16}, "proj_hidden": 16, "proj_dim": 16,
              "fusion_heads": 2},
    "objective": {"name": "tuple_infonce", "temperature": 0.1},
    "scaling": {"num_workers": 1},
}


def tiny(tmp_path, name, **sections):
    raw = json.loads(json.dumps(TINY))
    raw["storage"] = {"path": str(tmp_path), "name": name}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


# ------------------------------------------------------------------- no Ray needed


def test_space_parses_distributions_and_validates_their_edges():
    tf = space.parse({
        "train": {"lr": {"tune": "loguniform", "low": 1e-4, "high": 1e-2},
                  "batch_size": {"tune": "qrandint", "low": 32, "high": 128, "q": 32}},
        "objective": {"negative_weights": {"weak": {"tune": "grid", "values": [0.5, 4.0]}}},
        "augment": {"per_modality": {"weak": {"noise": {"tune": "uniform", "low": 0.0,
                                                        "high": 0.5}}}},
        "sweep": {"num_samples": 3},
    }, ["train.epochs=3", "sweep.searcher=random"])
    assert set(tf.space) == {"train.lr", "train.batch_size", "objective.negative_weights.weak",
                             "augment.per_modality.weak.noise"}
    assert tf.sections["sweep"] == {"num_samples": 3, "searcher": "random"}
    cfg = space.validate(tf)
    assert cfg.train.epochs == 3 and cfg.train.lr == 1e-4
    sampled = tf.config_with({"train.lr": 3e-3, "train.batch_size": 64,
                              "objective.negative_weights.weak": 4.0,
                              "augment.per_modality.weak.noise": 0.3})
    assert sampled.objective.negative_weights == {"weak": 4.0}
    assert sampled.augment.for_modality("weak").noise == 0.3
    assert sampled.augment.for_modality("weak").dropout == 0.1  # other fields keep defaults

    with pytest.raises(ConfigError, match=r"(?s)augment.default.noise = 2.0 .*less than or equal"):
        space.validate(space.parse({"augment": {"default": {
            "noise": {"tune": "uniform", "low": 0.0, "high": 2.0}}}}))
    with pytest.raises(ConfigError, match="unknown distribution 'normal'"):
        space.parse({"train": {"lr": {"tune": "normal", "low": 0, "high": 1}}})
    assert space.parse({}, ["train.lr={tune: loguniform, low: 1e-4, high: 1e-2}"]).space[
        "train.lr"].low == 1e-4   # YAML reads 1e-4 as a string
    with pytest.raises(ConfigError, match="needs low > 0"):
        space.parse({"train": {"lr": {"tune": "loguniform", "low": 0.0, "high": 1.0}}})
    with pytest.raises(ConfigError, match="scaling.num_workers cannot be searched"):
        space.parse({"scaling": {"num_workers": {"tune": "choice", "values": [1, 2]}}})
    with pytest.raises(ConfigError, match=r"sweep.num_sample: unknown field"):
        section_config(SweepConfig, {"num_sample": 3}, "sweep", "f.yaml")
    with pytest.raises(ConfigError, match=r"sample_opt.candidates: .*greater than or equal"):
        section_config(SampleOptConfig, {"candidates": 1}, "sample_opt", "f.yaml")


def test_each_distribution_becomes_the_tune_domain_of_its_name():
    from ray.tune.search import sample

    def domain(kind, grid_choices=False, **keys):
        return space.parse_distribution("x", {"tune": kind, **keys}).to_tune(grid_choices)

    expected = {  # kind, keys -> (domain class, sampler class, bounds, q)
        ("uniform", ()): (sample.Float, sample.Float._Uniform, (0.0, 4.0), None),
        ("quniform", (("q", 0.5),)): (sample.Float, sample.Float._Uniform, (0.0, 4.0), 0.5),
        ("loguniform", ()): (sample.Float, sample.Float._LogUniform, (1.0, 4.0), None),
        ("qloguniform", (("q", 0.5),)): (sample.Float, sample.Float._LogUniform, (1.0, 4.0),
                                         0.5),
        ("randint", ()): (sample.Integer, sample.Integer._Uniform, (1, 4), None),
        ("qrandint", (("q", 2),)): (sample.Integer, sample.Integer._Uniform, (1, 4), 2),
        ("lograndint", ()): (sample.Integer, sample.Integer._LogUniform, (1, 4), None),
    }
    for (kind, keys), (cls, sampler_cls, bounds, q) in expected.items():
        low = 0 if kind in ("uniform", "quniform") else 1
        made = domain(kind, low=low, high=4, **dict(keys))
        sampler = made.get_sampler()
        assert isinstance(made, cls) and (made.lower, made.upper) == bounds, kind
        assert isinstance(getattr(sampler, "sampler", sampler), sampler_cls), kind
        assert getattr(sampler, "q", None) == q, kind
    assert domain("choice", values=[1, "a"]).categories == [1, "a"]
    assert domain("choice", grid_choices=True, values=[1, "a"]) == {"grid_search": [1, "a"]}
    assert domain("grid", values=[0.1, 0.2]) == {"grid_search": [0.1, 0.2]}


def test_tune_files_in_configs_are_valid():
    for name in ("tune_weak.yaml", "sample_opt_weak.yaml"):
        tf = space.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tune", name))
        space.validate(tf)
        section_config(SweepConfig, tf.sections["sweep"], "sweep", name)
        section_config(SampleOptConfig, tf.sections["sample_opt"], "sample_opt", name)
    assert choose_strategy(space.load(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                   "tune", "sample_opt_weak.yaml")), None) == "sample-opt"


def test_policy_moves_mu_toward_the_better_candidate():
    mu0 = np.array([0.0, 0.1])
    policy = Policy(["log_alpha.a", "beta.a"], mu0, np.array([0.5, 0.05]),
                    np.array([-6.0, 0.0]), np.array([6.0, 1.0]))
    x = np.array([[0.4, 0.12], [-0.3, 0.07]])
    mu, adv = policy.update(x, np.array([2.0, 1.0]), lr=1.0, gradient="natural")
    assert np.allclose(adv, [1.0, -1.0])
    assert np.allclose(mu - mu0, 0.5 * (x[0] - x[1]))     # mu += lr * mean_i A_i (x_i - mu)
    mu, _ = policy.update(x, np.array([2.0, 1.0]), lr=0.01, gradient="vanilla")
    assert np.allclose(mu - mu0, 0.01 * 0.5 * (x[0] - x[1]) / policy.sigma ** 2)
    mu, adv = policy.update(x, np.array([1.0, 1.0]), lr=1.0, gradient="natural")
    assert np.allclose(mu, mu0) and np.allclose(adv, 0.0)  # a tie carries no signal
    mu, _ = policy.update(x, np.array([1.0, 2.0]), lr=10.0, gradient="natural")
    assert mu[1] == 0.0                                     # beta's mean stays in [0, 1]


def test_reward_views_choose_the_augmentation_r_is_scored_on(tmp_path):
    from mmcl.config import AugmentConfig
    from mmcl.tune.sample_opt import resolve_search, trains_in_trial

    strong = {"per_modality": {"c": {"noise": 0.9}}}
    searches = {views: resolve_search(space.parse(tiny(
        tmp_path, f"views-{views}", augment=strong,
        sample_opt={"reward_views": views, "modalities": ["c"]}), source="tiny"))
        for views in ("start", "default")}
    start, default = searches["start"], searches["default"]
    assert start.score.reward_augment["per_modality"]["c"]["noise"] == 0.9
    assert default.score.reward_augment == AugmentConfig().model_dump()
    assert default.mu0[-1] == 0.9          # the policy still starts at the run's strength
    assert trains_in_trial(default.base)   # one worker: no Ray Train run per candidate


def test_sample_optimization_state_reads_the_saved_format_and_refuses_others(tmp_path):
    from mmcl.tune.sample_opt import FORMAT, STATE_NAME, SearchState, read_state, write_state
    from mmcl.tune.trial import TuneError

    # A state file as every search since format 1 has written it (one key per field).
    saved = {"format": 1, "names": ["log_alpha.weak", "beta.weak"], "settings": {"rounds": 3},
             "metric": "reward", "label": None, "total_epochs": 3,
             "mu0": {"log_alpha.weak": 0.0, "beta.weak": 1.0}, "mu": [0.5, 0.7],
             "completed": 1, "pretrained": True, "start_checkpoint": "/ckpt/1",
             "pending": {"round": 2, "samples": [[0.1, 0.6], [0.9, 0.8]]},
             "score_init": 1.0, "R_init": 1.0, "score_start": 1.0, "R_start": 1.0,
             "rounds": [{"round": 1, "best": 0}]}
    assert FORMAT == 1
    cfg = config.load(None, [f"storage.path={tmp_path}"])
    url = str(tmp_path / "so")
    write_state(url, cfg, saved)
    state = SearchState.from_record(read_state(url, cfg), "state")
    assert state.mu == [0.5, 0.7] and state.pending["round"] == 2 and state.completed == 1
    assert state.record() == saved                     # written back unchanged
    state.completed = 2
    write_state(url, cfg, state.record())
    assert read_state(url, cfg)["completed"] == 2
    with pytest.raises(TuneError, match="format 1 .found 2"):
        SearchState.from_record({**saved, "format": 2}, STATE_NAME)
    with pytest.raises(TuneError, match="lacks mu, names"):
        SearchState.from_record({k: v for k, v in saved.items() if k not in ("mu", "names")},
                                STATE_NAME)


def test_scorer_prepares_stored_rows_as_training_does(tmp_path):
    """The validation rows a trial is scored on go through the run's Preparer: stored
    vectors are standardised with the manifest's constants, as the Engine and mmcl.load do."""
    import torch

    from mmcl.data.prepare import Preparer
    from mmcl.data.synth import generate
    from mmcl.tune.trial import Scorer, ScoreSpec, read_rows

    import dataclasses

    manifest = generate("weak", str(tmp_path / "data"), n=120, seed=0)
    manifest = dataclasses.replace(manifest, modalities=[  # constants, as imported data has
        dataclasses.replace(m, mean=(1.0,) * m.shape[0], std=(2.0,) * m.shape[0])
        for m in manifest.modalities])
    cfg = config.from_dict(tiny(tmp_path, "score", data={"path": str(tmp_path / "data")}))
    scorer = Scorer(cfg, manifest, str(tmp_path / "data"), ScoreSpec(reward=False))
    objective = scorer.objective(None)
    val = scorer.val()
    stored = read_rows(str(tmp_path / "data"), "val", manifest.modality_names, manifest)
    prepared = Preparer.for_run(manifest, cfg.data)(
        {m: torch.as_tensor(stored[m]) for m in manifest.modality_names})
    with torch.no_grad():
        expected = objective.embed(prepared).numpy()
    np.testing.assert_allclose(scorer.embed(objective, val), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(prepared["weak"].numpy() - stored["weak"]).max() > 0.1  # it did standardise


def test_searchers_sample_valid_configs():
    from mmcl.tune.sweep import build_search

    tf = space.parse({"train": {"lr": {"tune": "loguniform", "low": 1e-4, "high": 1e-2}},
                      "objective": {"temperature": {"tune": "choice", "values": [0.05, 0.1]}}})
    _, generator, n = build_search(tf, SweepConfig(), seed=0, concurrent=2)
    assert n == 8 and generator.max_concurrent == 2
    with pytest.raises(ConfigError, match="searcher=grid needs every searched field"):
        build_search(tf, SweepConfig(searcher="grid"), 0, 1)
    grid = space.parse({"train": {"lr": {"tune": "grid", "values": [1e-3, 1e-2]}}})
    assert build_search(grid, SweepConfig(searcher="grid"), 0, 1)[2] == 1
    pytest.importorskip("optuna")
    param_space, tpe, _ = build_search(tf, SweepConfig(searcher="tpe"), seed=0, concurrent=1)
    tpe.set_search_properties("score", "max", param_space)
    sample = tpe.suggest("trial-1")
    cfg = tf.config_with(sample)
    assert 1e-4 <= cfg.train.lr <= 1e-2 and cfg.objective.temperature in (0.05, 0.1)


def test_best_row_prefers_finished_trials_and_cli_reports_user_errors(tmp_path, capsys):
    from types import SimpleNamespace as Result

    from mmcl.tune.sweep import trial_rows

    tf = space.parse({"train": {"epochs": 3,
                                "lr": {"tune": "loguniform", "low": 1e-4, "high": 1e-2}}})
    results = [
        Result(metrics={"trial_id": "t1", "epoch": 3, "score": 0.5}, config={"train.lr": 1e-3},
               error=None, path="/x/mmcl_trial_t1"),
        Result(metrics={"trial_id": "t2", "epoch": 1, "score": 0.9}, config={"train.lr": 2e-3},
               error=None, path="/x/mmcl_trial_t2"),
        Result(metrics={}, config={"train.lr": 3e-3}, error=ValueError("boom\nDataError: bad"),
               path="/x/mmcl_trial_abcde_00002_2_train.lr=0.003_2026"),
        Result(metrics={}, config={}, error=None, path="/x/mmcl_trial_abcde_00003_3_x_2026")]
    statuses = {"abcde_00003": ("PENDING", {"train.lr": 4e-3})}
    rows = {r["trial"]: r for r in trial_rows(results, tf, statuses)}
    assert {t: r["status"] for t, r in rows.items()} == {
        "t1": "done", "t2": "early-stopped", "abcde_00002": "error",
        "abcde_00003": "unfinished"}
    assert rows["abcde_00002"]["error"] == "DataError: bad"
    assert rows["abcde_00003"]["params"] == {"train.lr": 4e-3}
    assert best_row(list(rows.values()))["trial"] == "t1"   # finished beats early-stopped
    rows = [{"status": "early-stopped", "score": 0.9}, {"status": "done", "score": 0.5},
            {"status": "error", "score": float("nan")}, {"status": "done", "score": 0.7}]
    assert best_row(rows)["score"] == 0.7
    assert best_row([{"status": "error", "score": math.nan}]) is None

    import argparse

    parser = argparse.ArgumentParser()
    add_tune(parser.add_subparsers())
    args = parser.parse_args(["tune", "-c", "x.yaml", "--strategy", "sample-opt"])
    assert args.strategy == "sample-opt" and args.func.__name__ == "cmd_tune"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: {tune: loguniform, low: -1, high: 1}\n")
    assert main(["tune", "--config", str(bad)]) == 2
    assert "needs low > 0" in capsys.readouterr().err


# ------------------------------------------------------------------------ local Ray


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_sweep_with_asha_records_trials_and_writes_a_loadable_best_config(tmp_path):
    from mmcl.tune.sweep import run_sweep

    # Two configs, each twice. The score is continuous (R² of a validation probe of a latent
    # factor), so the two configs score differently at the first rung and ASHA, which stops a
    # trial below the median of those before it, stops at least one trial whatever the order.
    raw = tiny(tmp_path, "sweep", train={"lr": {"tune": "grid", "values": [1e-7, 3e-3]}},
               sweep={"num_samples": 2, "scheduler": "asha", "metric": "probe",
                      "label": "z_redundancy", "max_concurrent_trials": 2, "grace_period": 1,
                      "reduction_factor": 2})
    result = run_sweep(space.parse(raw, source="tiny"))

    assert len(result.rows) == 4
    assert all(r["status"] in ("done", "early-stopped") for r in result.rows), result.table()
    assert all(r["epochs"] >= 1 and math.isfinite(r["score"]) for r in result.rows)
    assert all(math.isfinite(r["val_R"]) and r["score"] == r["val_probe"] for r in result.rows)
    stopped = [r for r in result.rows if r["status"] == "early-stopped"]
    assert stopped and all(r["epochs"] < r["max_epochs"] for r in stopped), result.table()
    assert all(r["epochs"] == 2 for r in result.rows if r["status"] == "done")
    assert result.best["status"] == "done"
    assert result.best["score"] == max(r["score"] for r in result.rows if r["status"] == "done")

    best = config.load(result.best_config_url)
    assert best.train.lr == result.best["params"]["train.lr"]
    assert best.storage.name == "sweep-best" and best.storage.path == str(tmp_path)
    assert best.model.embed_dim == 16
    table = open(os.path.join(result.url, "trials.md")).read()
    assert "early-stopped" in table and table.count("\n") == 2 + 4
    # every finished trial is a standard run folder
    run = os.path.join(result.url, "runs", f"trial-{result.best['trial']}")
    assert os.path.exists(os.path.join(run, "model", "weights.pt"))


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_sample_optimization_updates_mu_chains_checkpoints_and_resumes(tmp_path):
    from mmcl.tune.sample_opt import read_state, run_sample_opt

    # The policy follows a continuous score here (R² of a validation probe of z_shared): R on
    # a 60-tuple validation split after one epoch is near chance and two candidates often tie.
    raw = tiny(tmp_path, "so", data={"synth": {"preset": "weak", "n": 600}},
               sample_opt={"candidates": 2, "rounds": 2, "epochs_per_round": 1,
                           "sigma": {"log_alpha": 1.0, "beta": 0.1}, "lr": 1.0,
                           "metric": "probe", "label": "z_shared"})
    # "Kill" the search after round 1, then run the same search again.
    first = run_sample_opt(space.parse(raw, source="tiny"), stop_after_round=1)
    assert not first.finished and [r["round"] for r in first.rounds] == [1]
    saved = read_state(first.url, config.from_dict(tiny(tmp_path, "so")))
    assert saved["completed"] == 1 and saved["pending"] is None
    assert saved["start_checkpoint"] == first.rounds[0]["best_checkpoint"]

    second = run_sample_opt(space.parse(raw, source="tiny"))
    assert second.started_at_round == 2 and second.finished
    r1, r2 = second.rounds
    assert r1 == first.rounds[0], "round 1 was run again"

    # mu moved toward the better candidate: natural gradient, B=2 -> lr/2 (x_best - x_worst)
    names = second.state.names
    good, bad = sorted(r1["candidates"], key=lambda c: -c["score"])
    assert good["score"] > bad["score"], r1
    assert all(math.isfinite(c["R"]) for c in (good, bad))
    delta = np.array([r1["mu_after"][n] - r1["mu"][n] for n in names])
    direction = np.array([good["x"][n] - bad["x"][n] for n in names])
    inside = np.array([0.0 < r1["mu_after"][n] < 1.0 or n.startswith("log_alpha")
                       for n in names])  # beta's mean is kept in [0, 1]
    assert np.allclose(delta[inside], 0.5 * direction[inside]) and delta @ direction > 0

    # round 2 started from round 1's best checkpoint: its runs carry that run's history
    assert r2["start_checkpoint"] == r1["best_checkpoint"]
    best1 = r1["candidates"][r1["best"]]
    with open(os.path.join(best1["run"], "metrics.jsonl")) as f:
        history1 = [json.loads(line) for line in f]
    for cand in r2["candidates"]:
        with open(os.path.join(cand["run"], "metrics.jsonl")) as f:
            history2 = [json.loads(line) for line in f]
        assert history2[:1] == history1 and len(history2) == 2
        assert history2[1]["resumed_from_step"] == history1[-1]["step"]

    for entry in (r1, r2):  # where each round's wall time went (bench sampleopt reports it)
        timing = entry["timing"]
        assert 0 < timing["train_s"] < timing["round_s"], timing
        assert 0 < timing["outside_training_share"] < 1 and timing["concurrent"] == 2

    traj = json.load(open(os.path.join(second.url, "trajectory.json")))
    assert [r["round"] for r in traj["rounds"]] == [1, 2] and math.isfinite(traj["R_init"])
    import mmcl

    model = mmcl.load(second.url)
    assert model.config.objective.name == "tuple_infonce"
    assert config.load(second.files["policy config"]).storage.name == "so-policy"


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_bench_sampleopt_quick_writes_the_grid_and_the_three_arms(tmp_path):
    """`mmcl bench sampleopt --quick`: the grid (in process) and defaults / random search /
    sample optimization on this module's Ray, each final model probed; table and plots."""
    from mmcl.bench.sampleopt import ARMS, run_compare, run_grid

    out = str(tmp_path / "bench")
    grid = run_grid(quick=True, out=out, log=lambda line: None)
    assert len(grid["summary"]["cells"]) == 4 and os.path.exists(os.path.join(out, "grid.md"))
    report = run_compare(quick=True, out=out, log=lambda line: None)
    assert [r["arm"] for r in report["runs"]] == list(ARMS)
    for row in report["runs"]:
        assert 0 <= row["weak_factor"] <= 1 and math.isfinite(row["R"]), row
        assert 0 <= row["beta"] <= 1 and 0.25 <= row["alpha"] <= 16, row
    assert report["runs"][0]["alpha"] == 1.0 and report["runs"][0]["beta"] == 1.0
    assert report["summary"]["round_efficiency"]["rounds"] == 1
    assert set(report["summary"]["checks"]) == {"c_beats_a_by_more_than_seed_spread",
                                                "c_at_least_b", "c_in_grid_top_quarter"}
    assert os.path.exists(os.path.join(out, "compare.md"))
    assert report["plot"] is None or os.path.exists(report["plot"])


@pytest.mark.ray
@pytest.mark.usefixtures("local_ray")
def test_the_cpu_budget_is_checked_before_any_trial_starts(tmp_path):
    from mmcl.tune.trial import TuneError, ensure_ray

    one = config.from_dict(tiny(tmp_path, "budget"))        # 1 worker + 1 CPU for Ray Data
    assert ensure_ray(one, None, None) == 2                # local_ray has 4 CPUs
    with pytest.raises(TuneError, match="3 concurrent trials need 6 CPUs"):
        ensure_ray(one, None, 3)
    four = config.from_dict(tiny(tmp_path, "budget", scaling={"num_workers": 4}))
    with pytest.raises(TuneError, match="has 4 CPUs; one trial needs .* = 5 CPUs"):
        ensure_ray(four, None, None)


def test_any_searcher_and_scheduler_ray_tune_ships_is_accepted_and_bad_ones_fail_early():
    from ray.tune.schedulers import (AsyncHyperBandScheduler, MedianStoppingRule,
                                     PopulationBasedTraining)
    from mmcl.tune.sweep import build_scheduler, build_search

    tf = space.parse({"train": {"lr": {"tune": "loguniform", "low": 1e-4, "high": 1e-2}}})
    asha = build_scheduler(SweepConfig(grace_period=2), max_t=6)
    assert isinstance(asha, AsyncHyperBandScheduler) and asha._max_t == 6
    assert build_scheduler(SweepConfig(scheduler="none"), 6) is None
    assert isinstance(build_scheduler(SweepConfig(scheduler="median_stopping_rule"), 6),
                      MedianStoppingRule)
    pbt = SweepConfig(scheduler="pbt", scheduler_options={
        "perturbation_interval": 2, "hyperparam_mutations": {"train.lr": [1e-3, 1e-2]}})
    assert isinstance(build_scheduler(pbt, 6), PopulationBasedTraining)
    with pytest.raises(ConfigError, match="sweep.scheduler='nope' is not a Ray Tune scheduler"):
        build_scheduler(SweepConfig(scheduler="nope"), 6)
    with pytest.raises(ConfigError, match=r"pbt takes no \['perturbation_intervall'\]"):
        build_scheduler(SweepConfig(scheduler="pbt", scheduler_options={
            "perturbation_intervall": 2}), 6)
    with pytest.raises(ConfigError, match="sweep.scheduler=pbt cannot be built"):
        build_scheduler(SweepConfig(scheduler="pbt"), 6)  # PBT needs mutations
    with pytest.raises(ConfigError, match="sweep.searcher='nope' is not a Ray Tune searcher"):
        build_search(tf, SweepConfig(searcher="nope"), 0, 1)
    try:
        import hyperopt  # noqa: F401
    except ImportError:  # Tune's HyperOpt searcher exists; its package does not
        with pytest.raises(ConfigError, match="sweep.searcher=hyperopt cannot be built"):
            build_search(tf, SweepConfig(searcher="hyperopt"), 0, 1)
