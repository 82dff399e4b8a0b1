"""AWQ: the search beats plain rounding where inputs have outlier channels, a plan builds on encoders and decoders,
the folds keep the float function, and a group cannot take both AWQ and SmoothQuant."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from engine.analysis.deploy import deploy
from engine.data.sets import load_dataset, rt_split
from engine.core.plan import FP32, Plan, PlanError
from engine.core.rules import LayerSpec
from engine.core.vocabulary import Runtime, WeightMethod
from engine.evaluation.deployed import evaluate_exported
from engine.evaluation.evaluator import Evaluator
from engine.model.graph import model_graph
from engine.model.inventory import inventory
from engine.quant import awq
from engine.quant.apply import apply_plan
from engine.quant.calibration import calibrate, calibration_texts
from engine.quant.prepare import prepare_with
from engine.quant.prepared import Prepared
from engine.quant.smoothing import EXPLICIT, smooth

TEXTS = calibration_texts(rt_split("train").texts, 32)
SENTENCES = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "", "not bad"]


def _awq(precision: str, **options) -> dict:
    return {"precision": precision, "method": WeightMethod.AWQ, **options}


def _outlier_layer(seed: int = 0):
    """A 64-input layer whose inputs have four channels 30 times larger than the rest (as transformers' do)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=generator)
    x[:, [3, 17, 40, 41]] *= 30.0
    return x, torch.randn(48, 64, generator=generator) * 0.05


@pytest.mark.parametrize("runtime", list(Runtime))
@pytest.mark.parametrize("precision,group_size", [("int4", 32), ("int4", 64), ("int8", 64)])
def test_awq_beats_rounding_on_outlier_channels(runtime, precision, group_size):
    x, w = _outlier_layer()
    quantize = awq.weight_quantizer(LayerSpec(precision, WeightMethod.AWQ, group_size), runtime, 8)
    exponent, factor = awq.search(x.abs().mean(0), x, [w], [quantize])
    reference = x @ w.T
    rtn = (x @ quantize(w).T - reference).norm()
    scaled = (x / factor) @ quantize(w * factor).T
    assert exponent in awq.exponents() and exponent > 0
    assert (scaled - reference).norm() < 0.9 * rtn  # int4 per channel (group 64 = the row) as well as group 32
    assert torch.allclose(awq.awq_scale(x.abs().mean(0), 0.0), torch.ones(64))  # the grid starts at plain rounding


def test_search_never_loses_to_rounding():
    """Without outliers scaling may not help; the search then keeps a = 0 and the weights as they are."""
    generator = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 32, generator=generator), torch.randn(16, 32, generator=generator)
    quantize = awq.weight_quantizer(LayerSpec("int4", WeightMethod.AWQ, 32), Runtime.TORCH, 8)
    exponent, factor = awq.search(x.abs().mean(0), x, [w], [quantize])
    chosen = awq.output_error(x, [w], [quantize], factor)
    assert chosen <= awq.output_error(x, [w], [quantize], torch.ones(32))
    assert chosen == min(awq.output_error(x, [w], [quantize], awq.awq_scale(x.abs().mean(0), a))
                         for a in awq.exponents())
    assert (exponent == 0.0) == torch.equal(factor, torch.ones(32))


def _logits(model, tokenizer):
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**encoded).logits


@pytest.fixture(scope="module")
def bert():
    model, tokenizer = zoo.build("bert")
    return model, tokenizer, calibrate(model, tokenizer, TEXTS)


def test_awq_plan_on_an_encoder(bert):
    model, tokenizer, calibration = bert
    plan = Plan.from_json({"*.query": _awq("int4", group_size=16)})
    smoothing = smooth(model, plan, calibration)
    qkv = [group.layers for group in model_graph(model).groups if any(n.endswith(".query") for n in group.layers)]
    assert len(qkv) == 2 and all(len(names) == 3 for names in qkv)
    # the group shares one s (key and value read the query's input), and nothing else is touched
    assert set(smoothing.layers) == {name for names in qkv for name in names}
    for names in qkv:
        entries = [smoothing.layers[name] for name in names]
        assert all(e.method == WeightMethod.AWQ and e.alpha in awq.exponents() and e.form == EXPLICIT
                   for e in entries)
        assert all(torch.equal(e.factor, entries[0].factor) for e in entries)
    assert any(not torch.equal(e.factor, torch.ones_like(e.factor)) for e in smoothing.layers.values())
    rows = {row["layer"]: row for row in smoothing.forms(model)}
    assert rows[qkv[0][0]]["method"] == WeightMethod.AWQ and rows["classifier"]["method"] is None
    # smoothing alone keeps the float function; the plan itself builds through prepare and runs
    smoothed = apply_plan(model, FP32, prepared=Prepared(smoothing=smoothing))
    assert (_logits(smoothed, tokenizer) - _logits(model, tokenizer)).abs().max() < 1e-4
    quantized = apply_plan(model, plan, prepared=prepare_with(model, plan, calibration))
    assert torch.isfinite(_logits(quantized, tokenizer)).all()
    assert awq.awq_search_cost(model, plan.specs([layer.name for layer in inventory(model)])) == 2 * 3 * awq.GRID
    assert awq.awq_search_cost(model, Plan.uniform("int4").specs([layer.name for layer in inventory(model)])) == 0


def test_key_names_every_awq_choice(bert):
    model, _, calibration = bert
    keys = {smooth(model, Plan.from_json({"*.query": _awq("int4", group_size=g)}),
                   calibration).key for g in (16, 32)}
    keys.add(smooth(model, Plan.from_json({"*.query": _awq("int8")}), calibration).key)
    assert len(keys) == 3


def test_awq_and_smoothquant_in_one_group_is_a_plan_error(bert):
    model, _, calibration = bert
    plan = Plan.from_json({"*.query": _awq("int8"),
                           "*.key": {"precision": "int8", "smooth_alpha": 0.5}})
    with pytest.raises(PlanError, match=r"layer\.0\.attention\.self\.query.*layer\.0\.attention\.self\.key"):
        smooth(model, plan, calibration)
    # in different groups they combine: AWQ on the feed-forward input, SmoothQuant on attention's
    plan = Plan.from_json({"*.intermediate.dense": _awq("int8"),
                           "*.query": {"precision": "int8", "smooth_alpha": 0.5}})
    methods = {entry.method for entry in smooth(model, plan, calibration).layers.values()}
    assert methods == {WeightMethod.AWQ, None}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_awq_everywhere_on_a_decoder(family):
    model, tokenizer = zoo.build(family)
    calibration = calibrate(model, tokenizer, TEXTS)
    plan = Plan.from_json({"*": _awq("int4", group_size=16)})
    smoothing = smooth(model, plan, calibration)
    linear = [layer.name for layer in inventory(model) if layer.kind == "linear"]
    assert set(smoothing.layers) == set(linear)
    if family == "llama":  # pre-LN with grouped KV heads and a gated MLP: every fold kind is taken
        targets = {entry.target for entry in smoothing.layers.values()}
        assert any(t and "norm" in t for t in targets) and any(t and t.endswith("v_proj") for t in targets)
        assert any(t and t.endswith("up_proj") for t in targets)
    smoothed = apply_plan(model, FP32, prepared=Prepared(smoothing=smoothing))
    assert (_logits(smoothed, tokenizer) - _logits(model, tokenizer)).abs().max() < 1e-4
    quantized = apply_plan(model, plan, prepared=prepare_with(model, plan, calibration))
    assert torch.isfinite(_logits(quantized, tokenizer)).all()


def test_the_exported_awq_graph_computes_what_was_simulated(tmp_path):
    """The export folds the same Smoothing into the float model before quantizing: no AWQ path of its own."""
    model, tokenizer = zoo.build("llama")
    data = load_dataset("embedded").head(24)
    plan = Plan.from_json({"*": _awq("int4", group_size=16), "options": {"calib": 16}})
    deploy(model, tokenizer, plan, tmp_path / "out", data, measure=False)
    evaluator = Evaluator(model, tokenizer, data, batch_size=8)
    exported = evaluate_exported(evaluator, tmp_path / "out", threads=1)
    simulated, _ = evaluator.run(plan.on(Runtime.ONNXRUNTIME))
    assert np.array_equal(exported.predictions, simulated.predictions)
    np.testing.assert_allclose(exported.logits, simulated.logits, atol=1e-5)
