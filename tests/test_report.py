"""`mmcl report` read back from its numbers: each run's own references and chance, every
training metric plotted, the data set's row counts, retrieval and kNN beside the probe, and
the flag on runs whose shared settings differ. Report dicts are built by hand (no training)."""

from __future__ import annotations

import pytest

from mmcl.evaluate import report as rep


def _entry(task: str, classes: int | None, fused: float, raw_all: float, raw_a: float,
           emb_a: float, chance: float) -> dict:
    metric = "balanced_accuracy" if task == "classification" else "r2"
    return {"role": "label" if task == "classification" else "factor", "task": task,
            "num_classes": classes, "carried_by": ["a"], "description": "",
            "primary_metric": metric, "chance": {metric: chance},
            "probes": {"fused": {metric: fused}, "emb:a": {metric: emb_a},
                       "raw:a": {metric: raw_a}, "raw:all": {metric: raw_all}},
            "knn": {"fused": {"balanced_accuracy": fused - 0.05}} if classes else {},
            "carried": {}, "few_label": {}}


def _report(name: str, objective: str, raw_all: float, temperature: float,
            retrieval: bool = False) -> dict:
    r = {"format": 1, "kind": "run", "name": name, "run": f"/runs/{name}",
         "objective": objective, "seed": 0, "epochs": 2, "data": "/data/rus",
         "rows": {"train": 100, "val": 50, "test": 50},
         "rows_embedded": {"train": 2457, "val": 819, "test": 820},
         "representations": {"fused": "", "emb:a": "", "raw:a": "", "raw:all": ""},
         "settings": {"protocol": "p", "knn_protocol": "k"},
         "config": {"objective": {"name": objective, "temperature": temperature},
                    "train": {"epochs": 2, "batch_size": 128}},
         "labels": {"y8": _entry("classification", 8, 0.6, raw_all, 0.3, 0.4, 0.125),
                    "y4": _entry("classification", 4, 0.7, raw_all, 0.5, 0.45, 0.25)},
         "factors": {"z": _entry("regression", None, 0.8, raw_all, 0.6, 0.5, -0.001)},
         "final_metrics": {"loss": 1.0}}
    if retrieval:
        r["retrieval"] = {"ks": [1, 5, 10], "split": "test", "pairs": {"a:b": {
            "modalities": ["a", "b"], "n": 820,
            "a_to_b": {"recall@1": 0.31, "recall@5": 0.6, "recall@10": 0.7,
                       "median_rank": 3.0, "chance@1": 1 / 820, "chance@5": 5 / 820,
                       "chance@10": 10 / 820, "chance_median_rank": 410.5},
            "b_to_a": {"recall@1": 0.29, "recall@5": 0.55, "recall@10": 0.66,
                       "median_rank": 4.0, "chance@1": 1 / 820, "chance@5": 5 / 820,
                       "chance@10": 10 / 820, "chance_median_rank": 410.5}}},
            "no_shared_space": []}
    return r


def _row(markdown: str, first_cell: str, after: str = "") -> list[str]:
    text = markdown[markdown.index(after):] if after else markdown
    line = next(l for l in text.splitlines() if l.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_each_run_keeps_its_own_raw_reference_and_the_data_set_rows():
    three = _report("three", "factorcl_ssl", raw_all=0.9, temperature=0.1)
    two = _report("two", "factorcl_ssl", raw_all=0.7, temperature=0.1)
    md = rep.compare_markdown([three, two], ["three", "two"])
    header = _row(md, "label", "## Labels")
    assert header[2:6] == ["chance (three)", "chance (two)", "raw features (three)",
                           "raw features (two)"]
    assert _row(md, "y8", "## Labels")[4:6] == ["0.900", "0.700"]
    runs = _row(md, "three", "## Runs")
    assert runs[-2:] == ["2457 / 819 / 820", "100 / 50 / 50"]   # data set rows, then probed
    same = rep.compare_markdown([three, _report("t2", "factorcl_ssl", 0.9, 0.1)])
    assert _row(same, "label", "## Labels")[2:4] == ["chance", "raw features"]


def test_factor_panels_use_each_runs_reference_and_each_columns_chance():
    three = _report("three", "comm", raw_all=0.9, temperature=0.1)
    two = _report("two", "comm", raw_all=0.7, temperature=0.1)
    panels = rep.factor_panels([three, two], ["three", "two"])
    fused, emb = panels
    assert fused["ref_kind"] == "raw:all" and emb["ref_kind"] == "raw:a"
    assert fused["refs"] == {"three": [0.9, 0.9, 0.9], "two": [0.7, 0.7, 0.7]}
    assert fused["chance"] == pytest.approx([0.125, 0.25, -0.001])   # 1/8, 1/4, R² of mean


def test_factors_png_has_a_legend_per_panel_naming_that_panels_reference(tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    reports = [_report("r1", "comm", 0.9, 0.1), _report("r2", "comm", 0.7, 0.1)]
    assert rep.plot_factor_bars(reports, ["r1", "r2"], str(tmp_path / "f.png"))
    axes = [ax for ax in seen["fig"].axes if ax.get_visible()]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert "raw:all (reference)" in legends[0] and "raw:a (reference)" in legends[1]
    assert all("chance" in lg and "r1" in lg for lg in legends)


def test_curves_keep_every_metric_and_split_losses_by_objective():
    factorcl = [{"epoch": e, "loss": -5.0 * e, **{f"term{i}": float(i) for i in range(8)}}
                for e in (1, 2)]
    infonce = [{"epoch": e, "loss": 2.0 / e, "lr": 0.1} for e in (1, 2)]
    panels = rep.curve_panels({"f": factorcl, "t": infonce},
                              {"f": "factorcl_ssl", "t": "tuple_infonce"})
    titles = [p[0] for p in panels]
    assert titles[:2] == ["loss (factorcl_ssl)", "loss (tuple_infonce)"]
    assert [p[2] for p in panels[:2]] == [["f"], ["t"]]
    assert [f"term{i}" for i in range(8)] == titles[2:]          # none of the 8 dropped


def test_report_flags_runs_whose_shared_settings_differ_and_shows_retrieval_and_knn():
    a = _report("a", "tuple_infonce", 0.9, 0.07, retrieval=True)
    b = _report("b", "factorcl_ssl", 0.9, 1.0)
    md = rep.compare_markdown([a, b], ["a", "b"])
    assert "not a like-for-like comparison" in md
    assert _row(md, "objective.temperature")[1:] == ["0.0700", "1.0000"]
    assert _row(md, "a → b", "## Cross-modal retrieval")[1:] == ["R@1", "0.0012", "0.310", "–"]
    assert _row(md, "y8", "### kNN probe")[1:] == ["0.550", "0.550"]
    fair = rep.compare_markdown([a, _report("c", "comm", 0.9, 0.07)], ["a", "c"])
    assert "not a like-for-like" not in fair
    curves = rep.recall_curves([a, b], ["a", "b"])
    assert curves == {"a": {"a_to_b": [(1, 0.31), (5, 0.6), (10, 0.7)],
                            "b_to_a": [(1, 0.29), (5, 0.55), (10, 0.66)]}}


def test_recall_png_gives_each_run_its_own_colour(tmp_path, monkeypatch):
    """Issue 35, item 8: runs of one objective (seeds, settings) were drawn in one colour;
    each run has its own colour now, each direction its own line style."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    reports = [_report(n, "cross", 0.9, 0.1, retrieval=True) for n in ("s0", "s1", "s2")]
    assert rep.plot_recall(reports, ["s0", "s1", "s2"], ["cross"] * 3, str(tmp_path / "r.png"))
    lines = seen["fig"].axes[0].get_lines()
    colour = {ln.get_label(): ln.get_color() for ln in lines}
    by_run = {n: {c for label, c in colour.items() if label.startswith(n + " ")}
              for n in ("s0", "s1", "s2")}
    assert all(len(c) == 1 for c in by_run.values())           # one colour per run
    assert len(set().union(*by_run.values())) == 3               # and a different one each
    styles = {ln.get_label().rsplit(" ", 1)[-1]: ln.get_linestyle() for ln in lines}
    assert styles["a→b"] != styles["b→a"]


def test_settings_table_shows_an_inlined_hf_config_in_one_row():
    """Issue 35, item 8: a run with an inlined Hugging Face config (hf_config) beside one
    without made the 'not like-for-like' table run to 144 lines, one per config key; the
    whole config is one row, shown compactly (its size and a digest)."""
    a = _report("a", "cross", 0.9, 0.1)
    b = _report("b", "cross", 0.9, 0.1)
    hf = {"model_type": "vit", "hidden_size": 32, **{f"key{i}": i for i in range(140)}}
    a["config"]["model"] = {"encoders": {"image": {"kind": "hf", "hf_config": hf}}}
    b["config"]["model"] = {"encoders": {"image": {"kind": "hf", "hf_config": None,
                                                   "model": "/hf/tiny-vit"}}}
    md = rep.compare_markdown([a, b], ["a", "b"])
    table_start = md.index("not a like-for-like comparison")
    table_lines = [ln for ln in md[table_start:].split("\n\n", 2)[1].splitlines()]
    assert len(table_lines) <= 6, "\n".join(table_lines)
    row = _row(md, "model.encoders.image.hf_config")
    assert "142 keys" in row[1] and "model_type=vit" in row[1] and len(row[1]) <= 80
    assert row[2] == "None"
