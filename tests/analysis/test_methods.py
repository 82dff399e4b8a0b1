"""Quantization methods in the analyses: the method/calibrator plans, their comparison's exact McNemar and
interval arithmetic, the calibration curve, the cost estimate, method rows in the sweep, `rescued_by`, and the
search giving layers methods. Until the methods' numerics differ from RTN these assert plumbing, not which wins."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import _tiny
from engine.analysis.methods import (CurvePoint, MethodsReport, calibration_curve, compare_methods, estimate_cost,
                                     machine_flops, method_flops, method_plans, per_channel_group, static_plan)
from engine.analysis.search import Budget, greedy_steps, search, step_rule
from engine.analysis.sensitivity import (Row, SweepError, applies, layer_plan, rescued_by, row_key, sweep)
from engine.data.sets import load_dataset
from engine.core.rules import Rule
from engine.core.stats import mcnemar_exact, wilson_interval
from engine.core.vocabulary import Calibrator, WeightMethod
from engine.evaluation.evaluate import evaluate, get_evaluator

LIMIT = 48


@pytest.fixture(scope="module")
def centred(tokenizer):
    """A tiny random BERT whose classifier bias splits the set's FP32 predictions about evenly, so quantization
    flips some of them and the McNemar tests have discordant pairs to count."""
    model = _tiny("bert")
    data = load_dataset("embedded").head(LIMIT)
    logits = get_evaluator(model, tokenizer, data).baseline_logits
    with torch.no_grad():
        model.classifier.bias[1] -= float(np.median(logits[:, 1] - logits[:, 0]))
    return model, data, get_evaluator(model, tokenizer, data, keep_states=True)


def test_method_plans_cover_methods_groups_and_calibrators(tiny_distilbert, tokenizer):
    evaluator = get_evaluator(tiny_distilbert, tokenizer, load_dataset("embedded").head(8))
    layers = evaluator.layers
    plans = method_plans(layers, (None, 32), (WeightMethod.GPTQ, WeightMethod.HQQ), (Calibrator.ENTROPY,))
    assert [p.label for p in plans] == ["int4 rtn per channel", "int4 hqq per channel", "int4 gptq per channel",
                                        "int4 rtn g32", "int4 hqq g32", "int4 gptq g32",
                                        "w8a8 static minmax", "w8a8 static entropy"]
    assert [p.versus for p in plans] == [None, "int4 rtn per channel", "int4 rtn per channel", None, "int4 rtn g32",
                                         "int4 rtn g32", None, "w8a8 static minmax"]
    widest = max(layer.shape[1] for layer in layers)
    group = per_channel_group(layers)
    assert group >= widest and group & (group - 1) == 0 and group < 2 * widest
    names = [layer.name for layer in layers]
    for item in plans:
        specs = item.plan.specs(names)
        for layer in layers:
            spec = specs[layer.name]
            assert spec.precision == item.precision
            if item.precision == "int4":  # the method on Linears, RTN on the embedding table, one group size
                assert spec.method == (item.method if layer.kind == "linear" else WeightMethod.RTN)
                assert spec.group_size == (group if item.group_size is None else item.group_size)
            elif layer.kind == "linear":
                assert spec.static and spec.calibration == item.calibrator
        assert item.plan.to_json() == json.loads(json.dumps(item.plan.to_json()))


def test_compare_methods_arithmetic(centred, tokenizer):
    model, data, evaluator = centred
    plans = method_plans(evaluator.layers, (None, 32), (WeightMethod.GPTQ,), (Calibrator.PERCENTILE,))
    progress: list[tuple[float, str]] = []
    report = compare_methods(evaluator, plans, lambda f, text: progress.append((f, text)))
    assert isinstance(report, MethodsReport) and [r.label for r in report.rows] == [p.label for p in plans]
    assert progress[-1] == (1.0, "done") and all(0 <= f <= 1 for f, _ in progress)
    correct = {}
    for row, item in zip(report.rows, plans):
        fresh = evaluate(model, tokenizer, data, item.plan)  # the plain path, nothing shared
        assert (row.accuracy, list(row.ci95), row.agreement, row.flips, row.mcnemar_p_fp32) == \
            (fresh["accuracy"], fresh["ci95"], fresh["agreement"], fresh["flips"], fresh["mcnemar_p"])
        predictions = evaluator.run(item.plan)[0].predictions
        correct[row.label] = predictions == evaluator.labels
        assert tuple(row.ci95) == wilson_interval(int(correct[row.label].sum()), len(data))
        assert row.mcnemar_p_fp32 == mcnemar_exact(evaluator.baseline.predictions == evaluator.labels,
                                                   correct[row.label])
        assert row.prepare_s >= 0 and row.seconds > 0 and row.n == LIMIT
    assert any(row.flips > 0 for row in report.rows)  # the centred model makes the tests count something
    for row in report.rows:
        if row.versus is None:
            assert row.mcnemar_p_versus is None and row.prepare_s == 0.0
        else:
            assert row.mcnemar_p_versus == mcnemar_exact(correct[row.versus], correct[row.label])
            assert row.significant == (row.mcnemar_p_versus < 0.05)
    out = json.loads(json.dumps(report.to_json()))
    assert out["n"] == LIMIT and out["fp32_accuracy"] == evaluator.baseline.comparison.accuracy
    first = out["rows"][1]
    assert first["method"] == "gptq" and first["group_size"] is None and first["versus"] == "int4 rtn per channel"
    assert out["rows"][-1]["calibrator"] == "percentile" and isinstance(out["rows"][-1]["plan"], dict)


def test_compare_methods_rejects_a_plan_the_runtime_cannot_run(centred):
    _, _, evaluator = centred
    from dataclasses import replace

    from engine.core.plan import PlanError

    plans = method_plans(evaluator.layers, (24,), (WeightMethod.RTN,), ())
    with pytest.raises(PlanError, match="group_size 24"):
        compare_methods(evaluator, [replace(plans[0], plan=plans[0].plan.on("onnxruntime"))])


def test_calibration_curve_points_are_plain_evaluations(centred, tokenizer):
    model, data, evaluator = centred
    points = calibration_curve(evaluator, Calibrator.MINMAX, (8, 4, 8))
    assert [(p.requested, p.texts) for p in points] == [(4, 4), (8, 8)]
    for point in points:
        assert isinstance(point, CurvePoint)
        fresh = evaluate(model, tokenizer, data, static_plan(evaluator.layers, Calibrator.MINMAX, point.texts))
        assert (point.accuracy, list(point.ci95), point.mcnemar_p_fp32) == \
            (fresh["accuracy"], fresh["ci95"], fresh["mcnemar_p"])
        assert json.loads(json.dumps(point.to_json()))["calibrator"] == "minmax"


def test_estimate_cost(tiny_distilbert, tokenizer):
    layers = get_evaluator(tiny_distilbert, tokenizer, load_dataset("embedded").head(8)).layers
    rtn, hqq, awq, gptq = method_plans(layers, (32,), tuple(WeightMethod), ())[:4]  # minmax, the reference, last
    assert estimate_cost([rtn], layers, 2.0, 100) == 2.0  # no calibration, no method: one evaluation
    assert 1e6 < machine_flops() < 1e15
    linears = [layer.shape for layer in layers if layer.kind == "linear"]
    tokens = gptq.plan.calib * 32.0
    assert method_flops(layers, WeightMethod.GPTQ, gptq.plan.calib) == \
        sum(tokens * i * i + i**3 + o * i * i for o, i in linears)
    assert estimate_cost([gptq], layers, 2.0, 100, flops_per_s=1e9) == pytest.approx(
        2.0 + 2.0 * gptq.plan.calib / 100 + method_flops(layers, WeightMethod.GPTQ, gptq.plan.calib) / 1e9)
    assert estimate_cost([rtn, hqq], layers, 2.0, 100) > estimate_cost([rtn], layers, 2.0, 100)
    assert estimate_cost([awq], layers, 2.0, 100) > estimate_cost([rtn], layers, 2.0, 100)
    static = method_plans(layers, (), (), (Calibrator.MSE,))
    assert estimate_cost(static, layers, 1.0, 64) == pytest.approx(2 * (1.0 + static[0].plan.calib / 64))


# ---- the sweep, rescue and the search -----------------------------------------------------------
@pytest.fixture(scope="module")
def method_sweep(centred):
    _, _, evaluator = centred
    plain = sweep(evaluator)
    both = sweep(evaluator, methods=(WeightMethod.RTN, WeightMethod.GPTQ, WeightMethod.AWQ))
    return evaluator, plain, both


def test_sweep_rows_per_layer_precision_and_method(centred, tokenizer, method_sweep):
    model, data, _ = centred
    evaluator, plain, both = method_sweep
    expected = [row_key(layer.name, p, m) for layer in evaluator.layers for p in ("int8", "int4")
                for m in (WeightMethod.RTN, WeightMethod.GPTQ, WeightMethod.AWQ) if applies(layer, p, m)]
    assert [row.key for row in both.rows] == expected
    assert all(len(row.key) == 2 and row.method == WeightMethod.RTN for row in plain.rows)  # RTN keys unchanged
    embedding = evaluator.layers[0]
    assert {row.method for row in both.rows if row.layer == embedding.name} == {WeightMethod.RTN}
    assert {row.precision for row in both.rows if row.method == WeightMethod.GPTQ} == {"int4"}
    assert {row.precision for row in both.rows if row.method == WeightMethod.AWQ} == {"int8", "int4"}
    rtn = [row for row in both.rows if row.method == WeightMethod.RTN]
    strip = lambda row: {**row.to_json(), "seconds": 0}  # noqa: E731
    assert [strip(r) for r in rtn] == [strip(r) for r in plain.rows]
    assert all(row.sqnr_db is None for row in both.rows if row.method != WeightMethod.RTN)
    for row in [r for r in both.rows if r.method != WeightMethod.RTN][:3]:
        fresh = evaluate(model, tokenizer, data, layer_plan(row.layer, row.precision, "one", row.method))
        assert (row.accuracy, row.flips, row.mcnemar_p, row.kl) == \
            (fresh["accuracy"], fresh["flips"], fresh["mcnemar_p"], fresh["kl"])
        assert Row.from_json(json.loads(json.dumps(row.to_json()))) == row
    old = {k: v for k, v in rtn[0].to_json().items() if k != "method"}  # a row stored before methods existed
    assert Row.from_json(old) == rtn[0]
    with pytest.raises(SweepError, match="direction one"):
        sweep(evaluator, methods=(WeightMethod.GPTQ,), direction="all-but-one")
    with pytest.raises(SweepError, match="sweep methods"):
        sweep(evaluator, methods=("omniquant",))


def _row(layer: str, precision: str, method: WeightMethod, p: float, drop: float = 0.0, kl: float = 0.0) -> Row:
    return Row(layer, 0, "query", precision, "one", 0.9, (0.8, 0.95), 3, kl, p, None, drop, 0.97, 100, 1, 0.1,
               method)


def test_rescued_by_names_the_cheapest_method_within_noise():
    rows = [_row("a", "int4", WeightMethod.RTN, 0.01), _row("a", "int4", WeightMethod.HQQ, 0.02),
            _row("a", "int4", WeightMethod.GPTQ, 0.5), _row("a", "int4", WeightMethod.AWQ, 0.2),
            _row("b", "int4", WeightMethod.RTN, 0.001), _row("b", "int4", WeightMethod.GPTQ, 0.04),
            _row("c", "int4", WeightMethod.RTN, 0.3), _row("c", "int4", WeightMethod.GPTQ, 0.9),
            _row("a", "int8", WeightMethod.RTN, 0.049), _row("a", "int8", WeightMethod.AWQ, 0.05)]
    assert rescued_by(rows) == {("a", "int4"): WeightMethod.AWQ, ("b", "int4"): None,
                                ("a", "int8"): WeightMethod.AWQ}


def test_greedy_steps_take_the_cheapest_method():
    sizes = {("a", "fp32"): 400, ("a", "int8"): 100, ("a", "int4"): 50,
             ("b", "fp32"): 400, ("b", "int8"): 100, ("b", "int4"): 50}
    rtn_only = [_row("a", "int8", WeightMethod.RTN, 1.0, 0.0), _row("a", "int4", WeightMethod.RTN, 0.01, 3.0),
                _row("b", "int8", WeightMethod.RTN, 1.0, 0.5), _row("b", "int4", WeightMethod.RTN, 1.0, 0.5)]
    assert greedy_steps(rtn_only, sizes, ["a", "b"]) == [("a", "int8"), ("b", "int4"), ("a", "int4")]
    rows = rtn_only + [_row("a", "int4", WeightMethod.GPTQ, 0.9, 0.0), _row("b", "int4", WeightMethod.HQQ, 1.0, 0.5)]
    steps = greedy_steps(rows, sizes, ["a", "b"])
    # a's INT4 by GPTQ costs nothing; b's INT4 by HQQ costs what RTN's does, and the cheaper method keeps it
    assert steps == [("a", "int8"), ("a", "int4", WeightMethod.GPTQ), ("b", "int4")]
    assert step_rule(steps[1]) == Rule("int4", (("method", "gptq"),)) and step_rule(steps[2]) == Rule("int4")


def test_search_gives_layers_methods_and_verifies_them(centred, tokenizer, method_sweep):
    model, data, _ = centred
    evaluator, _, both = method_sweep
    result = search(evaluator, model, tokenizer, both.rows, Budget("max_drop", 100.0), latency=False)
    assert result.chosen.size_bytes == min(c.size_bytes for c in result.candidates)
    for candidate in result.candidates:
        specs = candidate.plan.specs([layer.name for layer in evaluator.layers], strict=False)
        assert candidate.methods == {n: s.method for n, s in specs.items() if s.method != WeightMethod.RTN}
        assert all(isinstance(rule, Rule) for _, rule in candidate.plan.rules)
    with_methods = [c for c in result.candidates if c.methods]
    for candidate in with_methods[:2]:  # resumed from other candidates' states: equal to a plain evaluation
        fresh = evaluate(model, tokenizer, data, candidate.plan)
        assert (candidate.accuracy, candidate.flips, candidate.kl) == (fresh["accuracy"], fresh["flips"], fresh["kl"])
    out = json.loads(json.dumps(result.to_json()))
    assert all(isinstance(c["methods"], dict) for c in out["candidates"])
