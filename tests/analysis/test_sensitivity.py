"""Sensitivity sweeps and the mixed-precision search: exact rows, verified plans, a clean front, a page."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.analysis.search import (Budget, Candidate, SearchError, SearchOutcome, dominated, greedy_steps,
                                    pareto_front, search)
from engine.analysis.sensitivity import (DIRECTIONS, Row, SweepError, block_summary, layer_plan, proxy_agreement,
                                         proxy_texts, sqnr_proxy, sweep)
from engine.data.sets import load_dataset
from engine.core.plan import Plan
from engine.evaluation.evaluate import evaluate, get_evaluator
from engine.model.inventory import inventory
from engine.runtime.size import model_size_bytes

LIMIT = 48
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_sweeps(tiny_model, tokenizer):
    """Both directions of a full sweep on a tiny model, with the evaluator and data they ran on."""
    data = load_dataset("embedded").head(LIMIT)
    evaluator = get_evaluator(tiny_model, tokenizer, data, keep_states=True)
    sqnr = sqnr_proxy(tiny_model, tokenizer, texts=load_dataset("embedded-train").texts[:16])
    return evaluator, data, {d: sweep(evaluator, direction=d, sqnr=sqnr) for d in DIRECTIONS}


def test_sweep_rows_equal_a_plain_evaluation(tiny_model, tokenizer, tiny_sweeps):
    evaluator, data, sweeps = tiny_sweeps
    names = [layer.name for layer in inventory(tiny_model)]
    assert len(sweeps["one"].rows) == 2 * len(names)
    # the embedding (full run), a mid-block attention and FFN layer, and the head (head-only run)
    picked = {names[0], names[3], names[len(names) // 2], names[-1]}
    for direction, result in sweeps.items():
        for row in result.rows:
            if row.layer not in picked:
                continue
            full = evaluate(tiny_model, tokenizer, data, layer_plan(row.layer, row.precision, direction))
            for field in ("accuracy", "flips", "kl", "mcnemar_p", "agreement"):
                assert getattr(row, field) == full[field], (direction, row.layer, row.precision, field)
            assert list(row.ci95) == full["ci95"]
            assert row.drop == pytest.approx(100 * (evaluator.baseline.comparison.accuracy - row.accuracy))


def test_rows_start_at_their_layer(tiny_model, tiny_sweeps):
    evaluator, _, sweeps = tiny_sweeps
    for row in sweeps["one"].rows:
        assert row.start_cut == evaluator.cuts[row.layer], row.layer
    assert all(row.sqnr_db is not None for row in sweeps["one"].rows)


def test_stopping_keeps_finished_rows_and_resumes(tiny_sweeps):
    evaluator, _, sweeps = tiny_sweeps
    seen: list[Row] = []
    stopped = sweep(evaluator, ("int8",), should_stop=lambda: len(seen) >= 3, on_row=seen.append)
    assert stopped.stopped and len(stopped.rows) == 3 and stopped.rows == seen
    resumed = sweep(evaluator, ("int8",), done={(r.layer, r.precision): r for r in stopped.rows})
    assert not resumed.stopped and resumed.computed == len(resumed.rows) - 3
    assert resumed.rows[:3] == stopped.rows
    full = [r for r in sweeps["one"].rows if r.precision == "int8"]
    assert [(r.layer, r.accuracy, r.kl) for r in resumed.rows] == [(r.layer, r.accuracy, r.kl) for r in full]


def test_progress_reports_time_left(tiny_sweeps):
    evaluator, _, _ = tiny_sweeps
    reports = []
    sweep(evaluator, ("int4",), progress=reports.append)
    assert reports[0].done == 0 and reports[0].eta_s is None
    assert reports[-1].done == reports[-1].total and reports[-1].eta_s == pytest.approx(0.0, abs=1e-9)
    assert all(r.eta_s is not None and r.eta_s >= 0 for r in reports[1:])


def test_bad_sweep_requests_are_clear(tiny_sweeps):
    evaluator, _, _ = tiny_sweeps
    with pytest.raises(SweepError, match="fp16"):
        sweep(evaluator, ("fp16",))
    with pytest.raises(SweepError, match="direction"):
        sweep(evaluator, ("int8",), direction="sideways")


def test_block_summary_and_proxy_agreement(tiny_model, tiny_sweeps):
    _, _, sweeps = tiny_sweeps
    rows = sweeps["one"].rows
    summary = block_summary(rows)
    groups = {item["group"] for item in summary}
    assert {"embedding", "head", "block 0", "block 1"} == groups
    for item in summary:
        chosen = [r.drop for r in rows if r.precision == item["precision"] and
                  (item["group"] == "embedding" and r.role == "embedding" or
                   item["group"] == "head" and r.block is None and r.role != "embedding" or
                   item["group"] == f"block {r.block}")]
        assert item["mean_drop"] == pytest.approx(sum(chosen) / len(chosen))
    agreement = proxy_agreement(rows)
    assert set(agreement) <= {"all", "int8", "int4"} and "all" in agreement
    assert -1.0 <= agreement["all"]["rho"] <= 1.0 and agreement["all"]["n"] == len(rows)


def test_sqnr_proxy_is_finite_and_orders_precisions(embedded):
    model, tokenizer = embedded
    sqnr = sqnr_proxy(model, tokenizer, load_dataset("embedded-train").texts[:64])
    layers = inventory(model)
    assert set(sqnr) == {(layer.name, p) for layer in layers for p in ("int8", "int4")}
    assert all(math.isfinite(v) for v in sqnr.values())
    typical = [layer.name for layer in layers if layer.role == "query"][2]
    assert sqnr[(typical, "int8")] > sqnr[(typical, "int4")]
    # Not every layer: 7-bit per-tensor activations lose to INT4 weights where the input has outlier
    # channels (the FFN's input after the attention LayerNorm), which is what the proxy should show.
    higher = sum(sqnr[(layer.name, "int8")] > sqnr[(layer.name, "int4")] for layer in layers)
    assert higher >= 0.6 * len(layers)


# ---- search -----------------------------------------------------------------------------------
def _candidate(size: int, accuracy: float) -> Candidate:
    return Candidate(Plan(), "synthetic", accuracy, (accuracy, accuracy), 0.0, 0.0, 1.0, 0.0, 0.0, 0, size)


def test_pareto_front_keeps_exactly_the_non_dominated():
    pool = [_candidate(s, a) for s, a in [(10, 0.9), (8, 0.9), (8, 0.85), (5, 0.8), (5, 0.8), (6, 0.7), (3, 0.6)]]
    front = pareto_front(pool)
    assert [(c.size_bytes, c.accuracy) for c in front] == [(3, 0.6), (5, 0.8), (8, 0.9)]
    assert not any(dominated(c, other) for c in front for other in pool)
    assert all(any(dominated(c, f) for f in front) for c in pool if c not in front and
               (c.size_bytes, c.accuracy) not in {(f.size_bytes, f.accuracy) for f in front})


def test_greedy_steps_visit_int8_before_int4_of_the_same_layer(tiny_sweeps, tiny_model):
    _, _, sweeps = tiny_sweeps
    layers = inventory(tiny_model)
    sizes = {(layer.name, p): layer.bytes_at(p) for layer in layers for p in ("fp32", "int8", "int4")}
    steps = greedy_steps(sweeps["one"].rows, sizes, [layer.name for layer in layers])
    assert {name for name, _ in steps} == {layer.name for layer in layers}
    for name in {name for name, _ in steps}:
        mine = [p for n, p in steps if n == name]
        assert mine in (["int4"], ["int8", "int4"], ["int8"]), (name, mine)


@pytest.fixture(scope="module")
def embedded_rows(embedded):
    model, tokenizer = embedded
    data = load_dataset("embedded").head(96)
    evaluator = get_evaluator(model, tokenizer, data, keep_states=True)
    return evaluator, data, sweep(evaluator, sqnr=sqnr_proxy(model, tokenizer, proxy_texts(evaluator))).rows


@pytest.mark.parametrize("budget", [Budget("max_drop", 1.0), Budget("not_worse"), Budget("target_bytes", 20e6)])
def test_search_plan_meets_its_budget_when_evaluated_afresh(embedded, embedded_rows, budget):
    model, tokenizer = embedded
    evaluator, data, rows = embedded_rows
    result = search(evaluator, model, tokenizer, rows, budget, latency=False)
    out = result.to_json()
    plan = Plan.from_json(out["plan"])
    fresh = evaluate(model, tokenizer, data, plan)
    base = evaluator.baseline.comparison.accuracy
    assert fresh["accuracy"] == out["accuracy"] and fresh["size_bytes"] == out["size_bytes"]
    if budget.kind == "max_drop":
        assert 100 * (base - fresh["accuracy"]) <= budget.value + 1e-9
        assert fresh["size_bytes"] < model_size_bytes(model, Plan.uniform("int8"))
    elif budget.kind == "not_worse":
        assert fresh["mcnemar_p"] >= 0.05 or fresh["accuracy"] >= base
    else:
        assert fresh["size_bytes"] <= budget.value
    front = result.front
    assert front and not any(dominated(c, other) for c in front for other in result.candidates)
    assert all(not dominated(result.chosen, other) for other in result.candidates) or budget.kind == "not_worse"
    assert {"fp32", "int8", "int4"} == set(out["references"])
    for c in out["front"]:
        assert set(c) >= {"plan", "accuracy", "ci95", "size_bytes", "latency_ms_p50"}
        assert c["predicted_drop"] == pytest.approx(sum(
            r.drop for r in rows if r.direction == "one" and Plan.from_json(c["plan"]).resolve(
                [layer.name for layer in inventory(model)], strict=False)[r.layer] == r.precision))


def test_search_measures_latency_for_the_front(tiny_sweeps, tiny_model, tokenizer):
    evaluator, _, sweeps = tiny_sweeps
    result = search(evaluator, tiny_model, tokenizer, sweeps["one"].rows, Budget("max_drop", 0.0))
    assert all(c.latency_ms_p50 is not None and c.latency_ms_p50 > 0 for c in result.front)
    assert result.chosen.latency_ms_p50 is not None
    # Each candidate names where it came from in words, and the whole result is what --json prints.
    out = json.loads(json.dumps(result.to_json()))
    assert all(isinstance(c["source"], str) for c in out["front"] + out["candidates"])
    # What the page stores reads back as the same outcome, its front and chosen plan among its candidates again.
    again = SearchOutcome.from_json(out)
    assert again == result and again.to_json() == out
    assert again.chosen.latency_ms_p50 == result.chosen.latency_ms_p50 and again.latency_front == result.latency_front
    assert all(any(c is other for other in again.candidates) for c in [again.chosen, *again.front])


def test_search_rejects_impossible_budgets(tiny_sweeps, tiny_model, tokenizer):
    evaluator, _, sweeps = tiny_sweeps
    with pytest.raises(SearchError, match="no verified plan"):
        search(evaluator, tiny_model, tokenizer, sweeps["one"].rows, Budget("target_bytes", 1000), latency=False)
    with pytest.raises(SearchError, match="budget"):
        Budget("max_drop", -1.0)
    with pytest.raises(SearchError, match="no single-layer row"):
        search(evaluator, tiny_model, tokenizer, sweeps["one"].rows[:4], Budget("max_drop", 1.0), latency=False)


# ---- CLI and page -----------------------------------------------------------------------------
def test_cli_sensitivity_and_bad_input(capsys, embedded):
    from engine.cli import main

    assert main(["sensitivity", "--precisions", "int8", "--limit", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(inventory(embedded[0]))
    assert {"layer", "precision", "accuracy", "ci95", "flips", "kl", "mcnemar_p", "sqnr_db"} <= set(rows[0])
    assert main(["sensitivity", "--precisions", "int3", "--limit", "8", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "int3" in err[-1]


def _saved(tmp_path, monkeypatch, tiny_bert, tokenizer) -> Path:
    """The tiny model as a folder the pages load, with a cache of the test's own."""
    folder = tmp_path / "tiny"
    tiny_bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    return folder


def _page(folder: Path, limit: int):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app_pages" / "sensitivity.py"), default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = limit
    at.run()
    return at


def test_page_runs_sweep_and_search(tmp_path, monkeypatch, tiny_bert, tokenizer):
    folder = _saved(tmp_path, monkeypatch, tiny_bert, tokenizer)
    at = _page(folder, 24)
    assert not at.exception, at.exception
    at.button(key="sens_run").click().run()
    assert not at.exception, at.exception
    charts = at.get("plotly_chart")
    assert len(charts) >= 4  # two heatmaps, the proxy scatter, the per-block bars
    at.button(key="sens_search").click().run()
    assert not at.exception, at.exception
    chosen = [s.value for s in at.success if "Chosen for" in s.value]
    assert chosen and any("plans verified in" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) >= len(charts) + 3  # the Pareto front and the two compounding charts
    assert any("sum of single drops" in m.value for m in at.markdown)
    assert at.button(key="sens_apply_0") is not None
    # Another session is shown the stored outcome (read back as a SearchOutcome) without searching again.
    again = _page(folder, 24)
    assert not again.exception, again.exception
    assert [s.value for s in again.success if "Chosen for" in s.value] == chosen


def test_cli_and_page_share_the_sweep_rows(tmp_path, monkeypatch, capsys, tiny_bert, tokenizer):
    """A sweep run from the CLI fills the rows the page reads: the page then has nothing left to compute."""
    from engine.cli import main

    folder = _saved(tmp_path, monkeypatch, tiny_bert, tokenizer)
    assert main(["sensitivity", "--model", str(folder), "--limit", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    at = _page(folder, 24)
    assert not at.exception
    assert at.button(key="sens_run").disabled  # every row is already there
    assert len(at.get("plotly_chart")) >= 4


def test_page_offers_a_quick_sample_with_its_cost_and_the_whole_sets(tmp_path, monkeypatch, tiny_bert, tokenizer):
    """On a set larger than the quick sample, the sweep starts on the sample, and both costs are said first."""
    at = _page(_saved(tmp_path, monkeypatch, tiny_bert, tokenizer), 260)
    assert not at.exception, at.exception
    assert at.toggle(key="sens_quick").value
    said = " ".join(c.value for c in at.caption)
    assert "on 200 sentences" in said and "the rest will take about" in said
    assert "The whole set (260 sentences) would take about" in said
    at.toggle(key="sens_quick").set_value(False).run()
    said = " ".join(c.value for c in at.caption)
    assert not at.exception and "on 260 sentences" in said and "whole set" not in said
