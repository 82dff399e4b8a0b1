"""Every family the engine claims, as tiny random models with tokenizers of their own kind: the inventory,
the incremental evaluation against the model's own forward, apply_plan's purity, predict, a sweep, the
SmoothQuant invariant, and models with 3 and 5 classes read from a CSV of named labels."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.analysis.predict import predict
from engine.analysis.sensitivity import sweep
from engine.data.sets import EvalSet, load_csv, load_dataset
from engine.core.labels import LabelError
from engine.core.plan import FP32, Plan
from engine.evaluation.evaluator import Evaluator
from engine.evaluation.session import Session, StateBudget
from engine.model.graph import is_linear, model_graph
from engine.model.inventory import inventory
from engine.quant.apply import apply_plan
from engine.quant.prepare import prepare

import zoo

TEXTS = load_dataset("embedded").head(24)
_BUILT: dict = {}


def built(family: str):
    if family not in _BUILT:
        _BUILT[family] = zoo.build(family)
    return _BUILT[family]


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def family(request):
    model, tokenizer = built(request.param)
    return request.param, model, tokenizer, Evaluator(model, tokenizer, TEXTS, batch_size=8, keep_states=True)


def test_inventory_lists_every_linear_once_with_a_role_and_a_block(family):
    name, model, _, _ = family
    layers = inventory(model)
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names)), "a layer is listed twice"
    called = set(model_graph(model).places)
    linears = {n for n, module in model.named_modules() if is_linear(module)}
    assert called <= linears and {layer.name for layer in layers if layer.kind == "linear"} == called
    assert layers[0].kind == "embedding" and model.get_submodule(layers[0].name) is model.get_input_embeddings()
    blocks = model_graph(model).n_blocks
    assert blocks >= 2
    for layer in layers[1:]:
        assert layer.role != "other", f"{name}: no role for {layer.name}"
        if layer.block is not None:
            assert 0 <= layer.block < blocks
    assert {layer.block for layer in layers if layer.block is not None} == (
        {0} if name == "albert" else set(range(blocks)))
    assert any(layer.role == "classifier" for layer in layers)
    if name == "albert":  # one set of block weights, run by every block: listed once, and said so
        shared = [layer for layer in layers if layer.block is not None]
        assert shared and all(layer.shared == blocks for layer in shared)
        assert all(layer.to_json()["shared_by_blocks"] == blocks for layer in shared)


def _random_plan(names, rng) -> Plan:
    return Plan.from_mapping({n: rng.choice(["int8", "int4", "fp16", "bf16"]) for n in names if rng.random() < 0.35})


def test_incremental_equals_full_and_the_models_own_forward(family):
    name, model, _, evaluator = family
    names = [layer.name for layer in evaluator.layers]
    rng = random.Random(name)
    session = Session(evaluator, StateBudget())
    for _ in range(4):
        plan = _random_plan(names, rng)
        incremental = session.update(plan)
        full, _ = evaluator.run(plan)
        assert np.array_equal(incremental.logits, full.logits), name
        own = evaluator.build(plan)
        with torch.inference_mode():
            for batch in evaluator.batches:
                logits = own(**batch.inputs).logits.numpy()
                assert np.allclose(full.logits[batch.rows], logits, atol=1e-5, rtol=1e-5), name
    assert evaluator.stages.block_cuts, evaluator.stages.notes


def test_apply_plan_never_mutates_its_input(family):
    _, model, _, _ = family
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    for plan in (Plan.uniform("int8"), Plan.uniform("int4", group_size=16)):
        for kernels in ("simulated", "real"):
            quantized = apply_plan(model, plan, kernels)
            assert quantized is not model
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in model.named_modules())


def test_predict_names_every_class(family):
    _, model, tokenizer, _ = family
    out = predict(model, tokenizer, ["a fine film", "", "the film was good " * 200], "int8")
    assert [set(p["probs"]) for p in out] == [{"negative", "positive"}] * 3
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-6 and p["label"] in p["probs"] for p in out)
    assert out[2]["truncated"]


def test_a_short_sensitivity_sweep(family):
    _, _, _, evaluator = family
    result = sweep(evaluator, ("int8",), "one")
    assert len(result.rows) == len(evaluator.layers)
    for row in result.rows:
        plan = Plan(rules=((row.layer, "int8"),))
        assert row.accuracy == evaluator.run(plan)[0].comparison.accuracy


def test_smoothing_alone_leaves_fp32_unchanged(family):
    name, model, tokenizer, evaluator = family
    for alpha in (0.0, 0.5, 0.9):
        plan = Plan(smooth_alpha=alpha)
        result, _ = evaluator.run(plan)
        assert np.abs(result.logits - evaluator.baseline_logits).max() < 1e-4, (name, alpha)
    smoothing = prepare(model, tokenizer, Plan(smooth_alpha=0.5), evaluator.dataset.calibration).smoothing
    forms = {row["form"].split(" into ")[0] for row in smoothing.forms(model) if row["alpha"] is not None}
    if name in ("gpt2", "llama", "qwen2"):  # pre-LN: the norms before q/k/v and the MLP take the 1/s
        blocks = model_graph(model).n_blocks
        assert len(smoothing.norms) >= 2 * blocks
        assert all(type(model.get_submodule(norm)).__name__.endswith(("LayerNorm", "RMSNorm"))
                   for norm in smoothing.norms)
    if name in ("bert", "distilbert", "roberta"):  # post-LN: the norm output is the residual too
        assert "explicit input scale" in forms


@pytest.mark.parametrize("classes", [("negative", "neutral", "positive"), ("1 star", "2 stars", "3 stars",
                                                                             "4 stars", "5 stars")])
@pytest.mark.parametrize("family_name", ["roberta", "llama"])
def test_multiclass_models_with_a_csv_of_named_labels(tmp_path, classes, family_name):
    model, tokenizer = zoo.build(family_name, names=classes)
    rows = [(f"review number {i} was {'good' if i % 2 else 'bad'}", classes[i % len(classes)].upper())
            for i in range(40)]
    path = tmp_path / "named.csv"
    path.write_text("text,label\n" + "".join(f"{t},{c}\n" for t, c in rows))
    data = load_csv(path)
    evaluator = Evaluator(model, tokenizer, data, batch_size=8, keep_states=True)
    assert evaluator.classes.names == classes
    assert [classes[i].upper() for i in evaluator.labels] == list(data.labels)
    result, _ = evaluator.run(Plan.uniform("int8"))
    assert result.logits.shape == (len(data), len(classes))
    assert 0 <= result.comparison.accuracy <= 1 and result.comparison.n == len(data)
    out = predict(model, tokenizer, ["fine"], "fp32")[0]
    assert list(out["probs"]) == [c.lower() for c in classes]
    bad = EvalSet("bad.csv", ("a", "b"), ("negative", "mixed"))
    with pytest.raises(LabelError, match="'mixed'"):
        Evaluator(model, tokenizer, bad)


def test_index_zero_positive_is_read_right():
    model, tokenizer = zoo.build("bert", names=("POSITIVE", "NEGATIVE"))
    data = EvalSet("flip", ("good", "bad"), ("positive", "0"))
    evaluator = Evaluator(model, tokenizer, data)
    assert evaluator.labels.tolist() == [0, 1]
    assert FP32.key() == evaluator.baseline.plan.key()
