"""ONNX Runtime: the numerics equal ORT's quantizers and kernels, every family exports and maps its layers,
the exported graph equals the engine's simulation of ORT's numerics, bad input is one ExportError with
nothing left behind, the folder reloads in a fresh process, and the CLI's export, eval and compare."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import zoo  # noqa: E402
from engine.analysis.compare import run_comparison  # noqa: E402
from engine.analysis.deploy import Exports, deploy  # noqa: E402
from engine.core import ort_numerics as N  # noqa: E402
from engine.data.sets import load_dataset  # noqa: E402
from engine.core.labels import LabelError  # noqa: E402
from engine.core.plan import Plan  # noqa: E402
from engine.evaluation.deployed import evaluate_exported  # noqa: E402
from engine.evaluation.evaluator import Evaluator  # noqa: E402
from engine.model.inventory import list_layers  # noqa: E402
from engine.runtime import emulated_cpu, onnx_graph  # noqa: E402
from engine.runtime.latency import bench_inputs  # noqa: E402
from engine.runtime.onnx_card import ModelCard  # noqa: E402
from engine.runtime.onnx_export import ExportError, export_onnx  # noqa: E402
from engine.runtime.onnx_session import OrtClassifier, benchmark, ort_call  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EDGE = ["", "   ", "great 😀 movie", "ok", "a " * 200]  # the last is longer than the zoo models take
DATA = load_dataset("embedded").head(40)


def mixed(model) -> Plan:
    """int8 everywhere, the table and every third linear int4, the last linear fp32."""
    names = list_layers(model)
    plan = {"*": "int8", names[0]: "int4", **{name: "int4" for name in names[1::3]}, names[-1]: "fp32"}
    return Plan.from_json({**plan, "options": {"group_size": 16}})


PLANS = {"int8": lambda m: Plan.uniform("int8"), "int4": lambda m: Plan.uniform("int4", group_size=16),
         "mixed": mixed}


# ---- numerics: each function equals what ORT's tools and kernels compute -------------------------
def _session(graph: onnx.GraphProto, opset: int = 21) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_activation_numerics_equal_dynamic_quantize_linear():
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    session, rng = _session(graph), np.random.default_rng(0)
    for trial in range(60):
        x = (rng.standard_normal((5, 33)) * rng.uniform(0.01, 10) + rng.uniform(-3, 3)).astype(np.float32)
        if trial % 2:  # exact ties at half a step: round-half-to-even must match
            step = np.float32((max(x.max(), 0) - min(x.min(), 0)) / np.float32(255))
            x = (np.round(x / step * 2) / 2 * step).astype(np.float32)
        expected = session.run(None, {"x": x})[0]
        q, scale = N.ort_quantize_activation(torch.from_numpy(x), "dynamic")
        assert np.array_equal((q * scale).numpy(), expected)


def test_weight_numerics_equal_ort_quantizers(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((24, 48)) * 0.05).astype(np.float32)  # [out, in]
    weight[3] *= 20
    table = (rng.standard_normal((30, 48)) * 0.1).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["T", "ids"], ["e"], name="g"),
                               helper.make_node("MatMul", ["x", "B"], ["y"], name="m")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, None),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight.T.copy(), "B"), numpy_helper.from_array(table, "T")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "f.onnx")
    with onnx_graph.quiet_ort():
        quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"])
    values = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    int8 = values["B_quantized"].astype(np.float32) * values["B_scale"]
    assert np.array_equal(N.ort_int8_weight(torch.from_numpy(weight)).numpy(), int8.T)
    integers, scales = N.ort_int8_integers(torch.from_numpy(weight))
    assert np.array_equal(integers.numpy(), values["B_quantized"].T)
    assert np.array_equal(scales.numpy(), values["B_scale"])
    uint8 = (values["T_quantized"].astype(np.float32) - values["T_zero_point"]) * values["T_scale"]
    assert np.array_equal(N.ort_uint8_table(torch.from_numpy(table)).numpy(), uint8)
    with onnx_graph.quiet_ort():  # reduce_range: 7-bit weights for CPUs whose int8 GEMM saturates; the table as before
        quantize_dynamic(tmp_path / "f.onnx", tmp_path / "r.onnx", per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])
    reduced = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "r.onnx").graph.initializer}
    integers, scales = N.ort_int8_integers(torch.from_numpy(weight), 7)
    assert np.array_equal(integers.numpy(), reduced["B_quantized"].T) and integers.abs().max() == 64
    assert np.array_equal(scales.numpy(), reduced["B_scale"])
    assert np.array_equal(reduced["T_quantized"], values["T_quantized"])
    for block in (16, 32):  # MatMulNBits through an identity input, GatherBlockQuantized through every id
        quantizer = MatMulNBitsQuantizer(onnx.load(tmp_path / "f.onnx"), block_size=block, is_symmetric=False,
                                         op_types_to_quantize=("MatMul", "Gather"))
        with onnx_graph.quiet_ort():
            quantizer.process()
        session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
        y, e = session.run(None, {"x": np.eye(48, dtype=np.float32), "ids": np.arange(30)})
        assert np.array_equal(N.ort_int4_weight(torch.from_numpy(weight), block).numpy(), y.T)
        assert np.array_equal(N.ort_int4_table(torch.from_numpy(table), block).numpy(), e)


# ---- export: every family maps its layers, and FP32 ORT equals torch --------------------------
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_every_family_exports_and_maps_every_layer(family, tmp_path):
    model, tokenizer = zoo.build(family, names=("negative", "neutral", "positive") if family == "qwen2" else None)
    result = export_onnx(model, tokenizer, "fp32", tmp_path / "out")
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert [row["layer"] for row in card["layers"]] == list_layers(model)
    assert all(row["nodes"] for row in card["layers"]) and result["size_bytes"] > 0
    # the file is saved as ORT optimizes it offline, and the FP32 size the ratios use is that same file's
    assert result["size_bytes"] == result["fp32_size_bytes"]
    assert not onnx.load(str(tmp_path / "out" / "model.onnx")).graph.value_info
    evaluator = Evaluator(model, tokenizer, DATA, batch_size=7)
    exported = evaluate_exported(evaluator, tmp_path / "out", threads=1)
    np.testing.assert_allclose(exported.logits, evaluator.baseline_logits, atol=1e-4, rtol=1e-3)
    assert exported.comparison.agreement == 1.0


@pytest.mark.parametrize("family", ("bert", "gpt2", "llama", "modernbert"))
@pytest.mark.parametrize("plan, target", [(plan, None) for plan in PLANS] + [("int8", "avx2"), ("mixed", "avx2")])
def test_the_exported_graph_equals_the_simulated_ort_numerics(family, plan, target, tmp_path):
    """On this machine, for a plan made for it (None) and one made for an AVX2 CPU (7-bit int8 weights, exact on
    every CPU); whether 8-bit weights are exact depends on the CPU, which the emulated test below checks."""
    model, tokenizer = zoo.build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = PLANS[plan](model).for_cpu(target)
    export_onnx(model, tokenizer, chosen, tmp_path / "out")
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    kernels = {"fp32": ("MatMul (float", "Gather (float"), "int8": ("MatMulInteger", "Gather (uint8"),
               "int4": ("MatMulNBits", "GatherBlockQuantized")}
    assert all(any(k in row["onnx"] for k in kernels[row["precision"]]) for row in card["layers"])
    evaluator = Evaluator(model, tokenizer, DATA, batch_size=8)
    exported = evaluate_exported(evaluator, tmp_path / "out", threads=1)
    simulated, _ = evaluator.run(chosen.on("onnxruntime"))
    assert np.array_equal(exported.predictions, simulated.predictions)
    np.testing.assert_allclose(exported.logits, simulated.logits, atol=2e-3 * max(1.0, np.abs(simulated.logits).max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched


def test_a_quantized_weight_folded_back_to_float_is_caught(tmp_path):
    model, tokenizer = zoo.build("bert")
    export_onnx(model, tokenizer, "int8", tmp_path / "out")
    exported = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx_graph.check_kept(exported, exported)
    folded = onnx.ModelProto()
    folded.CopyFrom(exported)
    weight = next(i for i in folded.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float32), weight.name))
    with pytest.raises(onnx_graph.GraphError, match="low-precision weights"):
        onnx_graph.check_kept(exported, folded)


def test_static_smoothed_and_fp16_plans(tmp_path):
    from engine.quant.calibration import calibration_texts

    model, tokenizer = zoo.build("bert")
    evaluator = Evaluator(model, tokenizer, DATA, batch_size=8)
    for name, plan in (("static", Plan.uniform("int8", act="static", calib=16)),
                       ("static-avx2", Plan.uniform("int8", act="static", calib=16, target_cpu="avx2")),
                       ("smoothed", Plan.uniform("int8", act="static", calib=16, smooth_alpha=0.5)),
                       ("half", Plan.from_json({"*.layer.0.*": "fp16", "bert.embeddings.word_embeddings": "fp16"}))):
        deploy(model, tokenizer, plan, tmp_path / name, DATA, measure=False)
        exported = evaluate_exported(evaluator, tmp_path / name, threads=1)
        simulated, _ = evaluator.run(plan.on("onnxruntime"))
        agreement = float(np.mean(exported.predictions == simulated.predictions))
        assert agreement >= 0.95, (name, agreement)
        scale = max(1.0, np.abs(simulated.logits).max())
        np.testing.assert_allclose(exported.logits, simulated.logits, atol=0.05 * scale)
    assert calibration_texts(DATA.calibration, 16)  # the static plans calibrated on held-out rows


@pytest.mark.skipif(not emulated_cpu.available(), reason="qemu-user is not installed (apt-get install qemu-user): "
                    "the AVX2 CPU cannot be emulated")
def test_on_an_emulated_avx2_cpu_only_the_7_bit_export_computes_what_was_simulated(tmp_path):
    """QEMU's Haswell (AVX2, no VNNI): ORT's int8 GEMM saturates there, so an export with 8-bit weights computes
    other logits than its simulation (the failure CI met on an AVX2 machine) and one for avx2 does not."""
    model, tokenizer = zoo.build("gpt2")
    evaluator = Evaluator(model, tokenizer, DATA, batch_size=8)
    batches = [(b.inputs["input_ids"].numpy(), b.inputs["attention_mask"].numpy()) for b in evaluator.batches]
    gaps = {}
    for target in ("vnni", "avx2"):
        plan = Plan.uniform("int8").for_cpu(target)
        export_onnx(model, tokenizer, plan, tmp_path / target)
        card = json.loads((tmp_path / target / "card.json").read_text())["cpu"]
        assert card["target_cpu"] == target and (card["warning"] is None) == (target == "avx2")
        logits, saturates = emulated_cpu.emulated_logits(tmp_path / target, batches)
        assert saturates  # the emulated CPU really takes the saturating path
        emulated = np.zeros_like(evaluator.baseline_logits)
        for batch, values in zip(evaluator.batches, logits):
            emulated[batch.rows] = values
        simulated, _ = evaluator.run(plan.on("onnxruntime"))
        gaps[target] = np.abs(emulated - simulated.logits).max() / max(1.0, np.abs(simulated.logits).max())
    assert gaps["avx2"] < 1e-5 < 1e-3 < gaps["vnni"], gaps


def test_a_decoder_without_pad_token_pads_with_eos(tmp_path):
    model, tokenizer = zoo.build("llama", padded=False)
    model.config.pad_token_id = None  # as a decoder checkpoint without one arrives
    assert tokenizer.pad_token is None
    export_onnx(model, tokenizer, "int4", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pad_token_id"] == tokenizer.eos_token_id and model.config.pad_token_id is None
    assert tokenizer.pad_token is None  # the caller's tokenizer is unchanged
    got = OrtClassifier(tmp_path / "out").predict(list(DATA.texts[:6]) + EDGE)
    assert len(got) == 11 and all(abs(sum(row["probs"].values()) - 1) < 1e-6 for row in got)


# ---- bad input: one ExportError, nothing left behind ------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_bad_input_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    model, tokenizer = zoo.build("bert")
    (tmp_path / "taken").mkdir()
    cases = [("fp32", tmp_path / "taken", "already exists"),
             ("bf16", tmp_path / "a", "bfloat16"),
             (Plan.uniform("int4", group_size=24), tmp_path / "b", "power of two"),
             (Plan.uniform("int8", act="token"), tmp_path / "c", "per-token"),
             ({"nothing.here": "int8"}, tmp_path / "d", "matches no layer"),
             (Plan.uniform("int8", act="static"), tmp_path / "e", "calibration sentences"),
             ("fp32", tmp_path / "missing" / "out", "does not exist")]
    unwritable = Path("/proc/onnx-export") if os.geteuid() == 0 else tmp_path / "locked" / "out"
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
    cases.append(("fp32", unwritable, "cannot write"))
    for plan, out, words in cases:
        with pytest.raises(ExportError, match=words) as caught:
            export_onnx(model, tokenizer, plan, out)
        assert "\n" not in str(caught.value)
        assert not out.exists() or out == tmp_path / "taken"
    assert list((tmp_path / "taken").iterdir()) == [] and _leftovers(tmp_path) == []

    def fail(*args, **kwargs):
        raise RuntimeError("quantizer broke\nsecond line")

    monkeypatch.setattr(onnx_graph, "int4_weight_only", fail)  # a failure half-way through
    with pytest.raises(ExportError, match="quantizer broke$"):
        export_onnx(model, tokenizer, "int4", tmp_path / "half")
    assert not (tmp_path / "half").exists() and _leftovers(tmp_path) == []


def test_a_set_the_model_cannot_be_scored_on_fails_before_any_export(tmp_path, monkeypatch):
    model, tokenizer = zoo.build("bert", num_labels=3)
    monkeypatch.setattr(onnx_graph, "export_fp32", lambda *a, **k: pytest.fail("exported before checking labels"))
    with pytest.raises(LabelError, match="that the model lacks"):
        deploy(model, tokenizer, "int8", tmp_path / "out", DATA)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    with pytest.raises(LabelError, match="that the model lacks"):
        run_comparison(model, tokenizer, [("int8", Plan.uniform("int8"))], [DATA], runtimes=("torch", "onnxruntime"),
                       exports=Exports(tmp_path / "exports"))
    assert not (tmp_path / "exports").exists()


# ---- the folder on its own: a fresh process, the card, timing ---------------------------------
def test_the_folder_reloads_in_a_fresh_process_and_its_card_is_measured(tmp_path):
    model, tokenizer = zoo.build("bert")
    result = deploy(model, tokenizer, Plan.uniform("int8", group_size=16), tmp_path / "out", DATA)
    folder = Path(result["out"])
    assert {"model.onnx", "config.json", "tokenizer.json", "plan.json", "README.md", "card.json"} <= \
        {p.name for p in folder.iterdir()}
    assert result["format"] == "onnx" and result["size_bytes"] == (folder / "model.onnx").stat().st_size
    stored = json.loads((folder / "card.json").read_text())
    card = ModelCard.read(folder)  # what the deployment page reads: the file's every field, and nothing lost
    assert card.to_json() == stored and list(card.to_json()) == list(stored) and ModelCard.from_json(stored) == card
    assert card.size_bytes == result["size_bytes"] and card.cpu.target_cpu == stored["cpu"]["target_cpu"]
    measured = card.measured
    assert measured.n == len(DATA) and 0 <= measured.ci95[0] <= measured.accuracy <= measured.ci95[1] <= 1
    assert measured.latency["protocol"] == "back_to_back" and "Wilson" in (folder / "README.md").read_text()
    assert measured.latency_ms_p50 == measured.latency["latency_ms_p50"] > 0
    # the card says where the time goes: the int8 plan's integer matmuls, and the CPU features behind them
    assert measured.profile["groups"]["quantized matmul"] > 0 and measured.profile["cpu"]["features"]
    assert "Where the time goes" in (folder / "README.md").read_text()
    texts = list(DATA.texts[:12]) + EDGE
    expected = OrtClassifier(folder, threads=1).predict(texts)
    script = ("import json, sys, numpy as np, onnxruntime as ort; from transformers import AutoTokenizer; "
              "tok = AutoTokenizer.from_pretrained(sys.argv[1]); "
              "s = ort.InferenceSession(sys.argv[1] + '/model.onnx', providers=['CPUExecutionProvider']); "
              "out = [s.run(None, {k: v for k, v in tok([t], truncation=True, return_tensors='np').items() "
              "if k in ('input_ids', 'attention_mask')})[0][0].tolist() for t in json.loads(sys.argv[2])]; "
              "print(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(texts)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, check=True)
    there = np.array(json.loads(done.stdout))  # plain onnxruntime, one text at a time
    alone = [OrtClassifier(folder, threads=1).predict([t])[0] for t in texts]
    assert [e["label"] for e in alone] == [["negative", "positive"][int(i)] for i in there.argmax(-1)]
    assert sum(a["label"] == e["label"] for a, e in zip(alone, expected)) >= len(texts) - 1  # batch-mates aside
    assert expected[-1]["truncated"] and not expected[0]["truncated"]
    assert set(expected[0]["probs"]) == {"negative", "positive"}


def test_benchmark_protocols(tmp_path):
    model, tokenizer = zoo.build("bert")
    export_onnx(model, tokenizer, "fp32", tmp_path / "out")
    inputs = bench_inputs(tokenizer, DATA.texts, 2, 16, "cpu")
    for protocol, spinning in (("back_to_back", True), ("interleaved", False)):
        calls = {"ort": ort_call(tmp_path / "out", inputs, threads=1, spinning=spinning),
                 "torch": lambda: model(**inputs)}
        rows = benchmark(calls, batch=2, protocol=protocol, repeats=3, min_seconds=0.0)
        assert all(r["latency_ms_p95"] >= r["latency_ms_p50"] > 0 and r["repeats"] >= 3 for r in rows.values())
        assert all(r["protocol"] == protocol and len(r["load_average"]) == 2 for r in rows.values())
    with pytest.raises(ValueError, match="protocol"):
        benchmark(calls, batch=2, protocol="round_robin")


def test_exports_are_made_once_and_reused(tmp_path):
    model, tokenizer = zoo.build("distilbert")
    exports = Exports(tmp_path / "exports")
    first = exports.folder(model, tokenizer, "int8", DATA)
    stamp = (first / "model.onnx").stat().st_mtime_ns
    assert exports.folder(model, tokenizer, Plan.uniform("int8"), DATA) == first
    assert (first / "model.onnx").stat().st_mtime_ns == stamp
    assert exports.folder(model, tokenizer, "int4", DATA) != first


# ---- the CLI ----------------------------------------------------------------------------------
def test_cli_export_eval_and_compare(tmp_path, capsys, monkeypatch):
    from engine.cli import main

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    folder = zoo.save("roberta", tmp_path / "model")
    assert main(["export", "--model", str(folder), "--plan", "int8", "--out", str(tmp_path / "served"), "--limit",
                 "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"out", "format", "size_bytes", "plan"} and out["plan"]["*"] == "int8"
    assert main(["export", "--model", str(folder), "--plan", "int8", "--out", str(tmp_path / "served"),
                 "--json"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval", "--model", str(folder), "--plan", "int8", "--runtime", "onnxruntime", "--limit", "24",
                 "--json"]) == 0
    real = json.loads(capsys.readouterr().out)
    assert real["runtime"] == "onnxruntime" and real["kernels"] == "real" and real["n"] == 24
    assert main(["eval", "--model", str(folder), "--plan", "int8", "--runtime", "onnxruntime", "--kernels",
                 "simulated", "--limit", "24", "--json"]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert abs(simulated["agreement"] - real["agreement"]) <= 2 / 24
    assert main(["compare", "--model", str(folder), "--plans", "fp32,int8", "--runtime", "torch,onnxruntime",
                 "--limit", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["plan"], r["runtime"]) for r in rows] == [("fp32", "torch"), ("fp32", "onnxruntime"),
                                                         ("int8", "torch"), ("int8", "onnxruntime")]
    assert all(r["protocol"] == "interleaved" and r["speedup_ci95"][0] <= r["speedup"] for r in rows)
    assert main(["eval", "--model", str(folder), "--plan", "bf16", "--runtime", "onnxruntime", "--json"]) == 2
    assert "bfloat16" in capsys.readouterr().err
