"""Where the error comes from: each op's local and accumulated SQNR, on models of several families."""
from __future__ import annotations

import json

import pytest

import zoo
from engine.analysis.deploy import deploy
from engine.analysis.diagnose import Diagnosis, diagnose, exported_layer_sqnr, sample
from engine.data.sets import load_dataset
from engine.core.plan import FP32, Plan
from engine.model.inventory import list_layers

DATA = load_dataset("embedded")
TEXTS = sample(DATA.texts, 24)


@pytest.mark.parametrize("family", ("bert", "gpt2", "llama", "albert"))
def test_one_quantized_layer_puts_in_all_the_error_and_nothing_comes_before_it(family):
    model, tokenizer = zoo.build(family)
    layer = list_layers(model)[3]
    rows = diagnose(model, tokenizer, TEXTS, {layer: "int8"}, DATA.calibration).rows
    at = next(i for i, row in enumerate(rows) if row.op == layer)
    assert all(row.accumulated_sqnr_db is None for row in rows[:at])  # upstream is exactly FP32
    mine = rows[at]
    assert mine.precision == "int8" and mine.local_sqnr_db is not None
    assert mine.accumulated_sqnr_db == pytest.approx(mine.local_sqnr_db, abs=1e-6)
    assert mine.weight_sqnr_db is not None and mine.activation_sqnr_db is not None
    assert rows[-1].kind == "logits" and rows[-1].accumulated_sqnr_db is not None
    # only that layer puts error in (ALBERT runs its one shared layer in every block: `name#k` after the first)
    assert all(row.local_sqnr_db is None for row in rows if row.layer != layer)
    assert all(row.local_sqnr_db is not None for row in rows if row.layer == layer and row.kind == "linear")


def test_fp32_has_no_error_anywhere_and_every_kind_of_op_is_seen():
    model, tokenizer = zoo.build("llama")
    rows = diagnose(model, tokenizer, TEXTS, FP32, DATA.calibration).rows
    assert all(row.local_sqnr_db is None and row.accumulated_sqnr_db is None for row in rows)
    kinds = {row.kind for row in rows}
    assert {"embedding", "linear", "norm", "activation", "attention_scores", "softmax", "attention_context",
            "residual_add", "logits"} <= kinds
    assert len({row.op for row in rows}) == len(rows)  # one name per op


def test_w8a8_splits_weight_and_activation_error_and_int4_has_weight_error_only():
    model, tokenizer = zoo.build("bert")
    names = list_layers(model)
    plan = Plan.from_json({"*": "int8", names[1]: "int4", "options": {"act": "static", "calib": 16}})
    rows = {row.op: row for row in diagnose(model, tokenizer, TEXTS, plan, DATA.calibration).rows}
    int8 = [rows[name] for name in names[2:]]
    assert all(row.weight_sqnr_db is not None and row.activation_sqnr_db is not None for row in int8)
    assert rows[names[1]].precision == "int4" and rows[names[1]].weight_sqnr_db is None
    # every downstream op carries error; the logits carry the least SQNR of the model's output side
    assert all(row.accumulated_sqnr_db is not None for row in rows.values())


def test_a_diagnosis_round_trips_through_the_json_the_cache_keeps():
    model, tokenizer = zoo.build("bert")
    plan = Plan.from_json({"*": "int8", "options": {"act": "static", "calib": 16}})
    found = diagnose(model, tokenizer, TEXTS[:4], plan, DATA.calibration)
    stored = json.loads(json.dumps(found.to_json()))
    assert Diagnosis.from_json(stored) == found
    assert list(stored["rows"][0]) == ["op", "layer", "kind", "block", "precision", "local_sqnr_db",
                                       "accumulated_sqnr_db", "weight_sqnr_db", "activation_sqnr_db"]


def test_the_cli_gives_one_row_per_op(tmp_path, capsys, monkeypatch):
    from engine.cli import main

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    folder = zoo.save("distilbert", tmp_path / "model")
    plan = json.dumps({"*": "int8", "*layer.0.*": "int4"})
    assert main(["diagnose", "--model", str(folder), "--plan", plan, "--limit", "16", "--runtime", "onnxruntime",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows[0]) >= {"op", "layer", "kind", "local_sqnr_db", "accumulated_sqnr_db", "weight_sqnr_db",
                            "activation_sqnr_db"}
    assert {row["precision"] for row in rows if row["kind"] == "linear"} == {"int8", "int4"}
    assert main(["diagnose", "--model", str(folder), "--plan", plan, "--limit", "16", "--runtime", "onnxruntime",
                 "--exported", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    both = [row for row in rows if row.get("exported_accumulated_sqnr_db") is not None]
    assert both and all(abs(r["exported_accumulated_sqnr_db"] - r["accumulated_sqnr_db"]) < 0.5 for r in both)
    assert main(["diagnose", "--model", str(folder), "--plan", "int8", "--exported", "--json"]) == 2
    assert "--runtime onnxruntime" in capsys.readouterr().err
    assert main(["diagnose", "--model", str(folder), "--plan", '{"nothing.*": "int8"}', "--json"]) == 2
    assert "matches no layer" in capsys.readouterr().err


@pytest.mark.parametrize("family", ("bert", "gpt2", "llama"))
def test_the_exported_graph_carries_the_error_the_engine_computes(family, tmp_path):
    """Each layer's accumulated SQNR on the ORT graph itself equals the engine's simulation of ORT's numerics,
    for the dynamic, static-QDQ and MatMulNBits exports (tolerance 0.5 dB; measured: at most 0.01 dB)."""
    model, tokenizer = zoo.build(family)
    names = list_layers(model)
    plans = {"dynamic": Plan.from_json({"*": "int8", names[2]: "int4", "options": {"group_size": 16}}),
             "static": Plan.uniform("int8", act="static", calib=16)}
    for name, plan in plans.items():
        deploy(model, tokenizer, plan, tmp_path / name, DATA, measure=False)
        measured = exported_layer_sqnr(model, tokenizer, tmp_path / name, TEXTS)
        simulated = {row.op: row.accumulated_sqnr_db
                     for row in diagnose(model, tokenizer, TEXTS, plan.on("onnxruntime"), DATA.calibration).rows}
        assert len(measured) >= len(names) - 2  # at most the float Gemms ORT fused are left out
        for layer, value in measured.items():
            assert value == pytest.approx(simulated[layer], abs=0.5), (name, layer)
