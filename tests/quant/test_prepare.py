"""Prepare, then convert, per layer: each rule's method, calibrator, calibration size and bias correction is
computed once and used by the simulation, torch's real kernels and the ONNX export alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from engine.data.sets import load_dataset
from engine.core.plan import Plan, PlanError
from engine.core.qmodules import Int4Linear, SimLinear
from engine.evaluation.deployed import evaluate_exported
from engine.evaluation.evaluator import Evaluator
from engine.model.inventory import list_layers
from engine.quant.apply import apply_plan
from engine.quant.calibration import calibrate, calibration_texts
from engine.quant.prepare import prepare

DATA = load_dataset("embedded").head(40)
POOL = DATA.calibration


def _linears(model) -> list[str]:
    return [name for name in list_layers(model) if isinstance(model.get_submodule(name), torch.nn.Linear)]


def _plan(model, rule: dict, **options) -> Plan:
    """`rule` on every Linear (methods take Linear layers)."""
    return Plan.from_json({**{name: rule for name in _linears(model)}, "options": {"calib": 16, **options}})


@pytest.mark.parametrize("method", ["gptq", "hqq"])
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_methods_integers_are_what_the_layer_computes_with(tiny_bert, tokenizer, method, runtime):
    plan = _plan(tiny_bert, {"precision": "int4", "method": method, "group_size": 16}, runtime=runtime)
    prepared = prepare(tiny_bert, tokenizer, plan, POOL)
    assert set(prepared.weights) == set(_linears(tiny_bert))
    simulated = apply_plan(tiny_bert, plan, prepared=prepared)
    for name, weights in prepared.weights.items():
        module = simulated.get_submodule(name)
        assert isinstance(module, SimLinear)
        assert torch.equal(module.dequantized(), weights.values())
    rtn = apply_plan(tiny_bert, _plan(tiny_bert, {"precision": "int4", "group_size": 16}, runtime=runtime))
    name = _linears(tiny_bert)[0]
    assert not torch.equal(rtn.get_submodule(name).dequantized(), simulated.get_submodule(name).dequantized())


def test_torch_real_int4_kernels_compute_the_methods_integers(tiny_bert, tokenizer):
    plan = _plan(tiny_bert, {"precision": "int4", "method": "gptq", "group_size": 16})
    prepared = prepare(tiny_bert, tokenizer, plan, POOL)
    real = apply_plan(tiny_bert, plan, "real", prepared=prepared)
    simulated = apply_plan(tiny_bert, plan, prepared=prepared)
    name = _linears(tiny_bert)[1]
    assert isinstance(real.get_submodule(name), Int4Linear)
    assert torch.equal(real.get_submodule(name).dequantized(), simulated.get_submodule(name).dequantized())
    inputs = tokenizer(["a fine film", "not good at all"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(real(**inputs).logits, simulated(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_bias_correction_keeps_each_layers_mean_output_on_the_calibration_inputs(tiny_bert, tokenizer):
    plan = _plan(tiny_bert, {"precision": "int4", "group_size": 16, "bias_correction": True})
    prepared = prepare(tiny_bert, tokenizer, plan, POOL)
    calibration = calibrate(tiny_bert, tokenizer, calibration_texts(POOL, 16))
    corrected = apply_plan(tiny_bert, plan, prepared=prepared)
    plain = apply_plan(tiny_bert, _plan(tiny_bert, {"precision": "int4", "group_size": 16}))
    for name in _linears(tiny_bert):
        mean = calibration.mean[name]
        reference = tiny_bert.get_submodule(name)(mean)  # a Linear's mean output is its output at the mean input
        assert torch.allclose(corrected.get_submodule(name)(mean), reference, atol=1e-5)
        assert not torch.allclose(plain.get_submodule(name)(mean), reference, atol=1e-5)


def test_each_rule_is_prepared_as_it_says(tiny_bert, tokenizer):
    """Static int8 with its own calibrator and size on some layers, dynamic int8 on the others."""
    names = _linears(tiny_bert)
    static = {"precision": "int8", "act": "static", "calibration": "percentile", "percentile": 99.0, "calib": 8}
    plan = Plan.from_json({"*": "int8", **{name: static for name in names[:2]}})
    prepared = prepare(tiny_bert, tokenizer, plan, POOL)
    assert set(prepared.ranges) == set(names[:2])
    minmax = calibrate(tiny_bert, tokenizer, calibration_texts(POOL, 8))
    low, high = prepared.ranges[names[0]]
    assert minmax.low[names[0]].min() <= low.min() and high.max() <= minmax.high[names[0]].max()
    model = apply_plan(tiny_bert, plan, prepared=prepared)
    assert model.get_submodule(names[0]).static_scale is not None
    assert model.get_submodule(names[3]).static_scale is None


def test_a_plan_that_needs_preparing_is_refused_unprepared(tiny_bert):
    with pytest.raises(PlanError, match="prepare the plan first"):
        apply_plan(tiny_bert, _plan(tiny_bert, {"precision": "int4", "method": "gptq"}))


EXPORTED = {
    "gptq": {"precision": "int4", "method": "gptq", "group_size": 16},
    "hqq": {"precision": "int4", "method": "hqq", "group_size": 16},
    "awq": {"precision": "int4", "method": "awq", "group_size": 16},
    "awq-int8": {"precision": "int8", "method": "awq"},
    "bias": {"precision": "int4", "group_size": 32, "bias_correction": True},
    "entropy": {"precision": "int8", "act": "static", "calibration": "entropy"},
    "percentile": {"precision": "int8", "act": "static", "calibration": "percentile"},
    "mse": {"precision": "int8", "act": "static", "calibration": "mse"},
}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("case", list(EXPORTED))
def test_the_export_computes_what_the_layer_map_simulates(family, case, tmp_path):
    from engine.analysis.deploy import deploy

    model, tokenizer = zoo.build(family)
    plan = _plan(model, EXPORTED[case], runtime="onnxruntime")
    deploy(model, tokenizer, plan, tmp_path / "out", DATA, measure=False)
    evaluator = Evaluator(model, tokenizer, DATA, batch_size=8)
    exported = evaluate_exported(evaluator, tmp_path / "out", threads=1)
    simulated, _ = evaluator.run(plan)
    assert np.mean(exported.predictions == simulated.predictions) >= 0.995
    scale = max(1.0, np.abs(simulated.logits).max())
    np.testing.assert_allclose(exported.logits, simulated.logits, atol=2e-3 * scale)


@pytest.mark.parametrize("calibrator", ["minmax", "entropy"])
def test_torch_real_static_int8_sums_integers_with_the_calibrated_scale(tiny_bert, tokenizer, calibrator):
    from engine.core.qmodules import StaticInt8Linear

    plan = _plan(tiny_bert, {"precision": "int8", "act": "static", "calibration": calibrator})
    prepared = prepare(tiny_bert, tokenizer, plan, POOL)
    real = apply_plan(tiny_bert, plan, "real", prepared=prepared)
    simulated = apply_plan(tiny_bert, plan, prepared=prepared)
    name = _linears(tiny_bert)[0]
    assert isinstance(real.get_submodule(name), StaticInt8Linear)
    assert real.get_submodule(name).static_scale == simulated.get_submodule(name).static_scale
    inputs = tokenizer(list(DATA.texts[:8]), padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(real(**inputs).logits, simulated(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_runs_every_method(family):
    """One plan per family giving its Linear layers each method, a calibrator and bias correction in turn."""
    model, tokenizer = zoo.build(family)
    evaluator = Evaluator(model, tokenizer, DATA.head(16), batch_size=8)
    linears = [layer.name for layer in evaluator.layers if layer.kind == "linear"]
    rules = ({"precision": "int4", "method": "gptq", "group_size": 16},
             {"precision": "int4", "method": "hqq", "group_size": 16},
             {"precision": "int8", "method": "awq"},
             {"precision": "int8", "act": "static", "calibration": "entropy", "bias_correction": True})
    plan = Plan.from_json({**{name: rules[i % len(rules)] for i, name in enumerate(linears)},
                           "options": {"calib": 16}})
    result, _ = evaluator.run(plan)
    assert np.isfinite(result.logits).all()
    prepared = prepare(model, tokenizer, plan, DATA.calibration)
    assert {name for i, name in enumerate(linears) if i % 4 < 2} == set(prepared.weights)
    assert {name for i, name in enumerate(linears) if i % 4 == 3} == set(prepared.ranges) == set(prepared.biases)
