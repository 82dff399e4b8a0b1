"""ONNX Runtime export: every family maps and exports, plans become ORT's kernels, the simulated ORT
numerics agree with the exported graph, bad input is one ExportError with nothing left behind."""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")  # both before the engine's runtime modules, which import them
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from engine.data import load_dataset
from engine.plan import Plan
from engine.runtime import onnx_graph
from engine.runtime import ort_numerics as N
from engine.runtime.onnx_export import ExportError, export_onnx
from engine.runtime.onnx_session import OrtClassifier, benchmark, length_sorted_batches, run_batches, torch_forward

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "albert", "deberta-v2", "mobilebert", "mpnet",
            "modernbert", "gpt2", "llama", "qwen2")
EDGE = ["", "   ", "great 😀 movie", "ok", "a " * 200]


@pytest.fixture(scope="module")
def tokenizer():
    """A WordPiece tokenizer of ~370 tokens built from the embedded sentences (tiny embedding tables)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = collections.Counter(w for t in load_dataset("embedded").texts for w in re.findall(r"[a-z]+", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-") + \
        ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + [w for w, _ in words.most_common(300) if len(w) > 1]
    core = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]", model_max_length=128)


@pytest.fixture(scope="module")
def texts():
    return list(load_dataset("embedded").texts[:40]) + EDGE


def tiny(family: str, vocab: int, labels: int = 2, pad: int | None = 0):
    """A random 2-layer model of `family` (hidden 32), `labels` classes, token ids matching the tokenizer."""
    import transformers as T

    torch.manual_seed(0)
    names = ["negative", "positive"] if labels == 2 else [f"class{i}" for i in range(labels)]
    common = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}, "pad_token_id": pad,
              "bos_token_id": 2, "eos_token_id": 3}
    H, L, A, I, P = 32, 2, 2, 64, 130
    bert_like = {"vocab_size": vocab, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": A,
                 "intermediate_size": I, "max_position_embeddings": P}
    decoder = {**bert_like, "num_key_value_heads": 1}
    configs = {
        "bert": (T.BertConfig, T.BertForSequenceClassification, bert_like),
        "distilbert": (T.DistilBertConfig, T.DistilBertForSequenceClassification,
                       {"vocab_size": vocab, "dim": H, "n_layers": L, "n_heads": A, "hidden_dim": I, "max_position_embeddings": P}),
        "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification, bert_like),
        "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification, bert_like),
        "electra": (T.ElectraConfig, T.ElectraForSequenceClassification, {**bert_like, "embedding_size": 16}),
        "albert": (T.AlbertConfig, T.AlbertForSequenceClassification, {**bert_like, "embedding_size": 16}),
        "deberta-v2": (T.DebertaV2Config, T.DebertaV2ForSequenceClassification,
                       {**bert_like, "relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"]}),
        "mobilebert": (T.MobileBertConfig, T.MobileBertForSequenceClassification,
                       {**bert_like, "embedding_size": 16, "intra_bottleneck_size": 16, "true_hidden_size": 16,
                        "num_feedforward_networks": 2}),
        "mpnet": (T.MPNetConfig, T.MPNetForSequenceClassification, bert_like),
        "modernbert": (T.ModernBertConfig, T.ModernBertForSequenceClassification,
                       {**bert_like, "global_attn_every_n_layers": 2, "local_attention": 16, "cls_token_id": 2,
                        "sep_token_id": 3}),
        "gpt2": (T.GPT2Config, T.GPT2ForSequenceClassification, {"vocab_size": vocab, "n_embd": H, "n_layer": L, "n_head": A, "n_positions": P}),
        "llama": (T.LlamaConfig, T.LlamaForSequenceClassification, decoder),
        "qwen2": (T.Qwen2Config, T.Qwen2ForSequenceClassification, decoder),
    }
    config_class, model_class, kwargs = configs[family]
    model = model_class(config_class(**kwargs, **common))
    return model.eval().requires_grad_(False)


def mixed_plan(model) -> dict:
    """int8 everywhere, the table and every third linear int4, the last linear fp32."""
    names = list(onnx_graph.quantizable_layers(model))
    plan = {"*": "int8", names[0]: "int4"}
    plan.update({name: "int4" for name in names[1::3]})
    plan[names[-1]] = "fp32"
    return {**plan, "options": {"group_size": 16}}


PLANS = {"int8": lambda m: "int8", "int4": lambda m: {"*": "int4", "options": {"group_size": 16}}, "mixed": mixed_plan}


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
        assert np.array_equal(N.ort_dynamic_uint8_activation(torch.from_numpy(x)).numpy(), expected)


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
    uint8 = (values["T_quantized"].astype(np.float32) - values["T_zero_point"]) * values["T_scale"]
    assert np.array_equal(N.ort_uint8_table(torch.from_numpy(table)).numpy(), uint8)
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
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_and_maps_every_layer(family, tokenizer, texts, tmp_path):
    labels = 3 if family in ("distilbert", "electra", "qwen2") else 2
    model = tiny(family, len(tokenizer), labels)
    result = export_onnx(model, tokenizer, "fp32", tmp_path / "out", card=False)
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert [row["layer"] for row in card["layers"]] == list(onnx_graph.quantizable_layers(model))
    assert all(row["nodes"] for row in card["layers"]) and result["size_bytes"] > 0
    classifier = OrtClassifier(tmp_path / "out", threads=1)
    batches = length_sorted_batches(classifier.tokenizer, texts, classifier.max_length, batch_size=7)
    got = run_batches(classifier.logits, batches, len(texts))
    reference = run_batches(torch_forward(onnx_graph.prepared(model, tokenizer)[0]), batches, len(texts))
    assert got.shape == (len(texts), labels)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-3)


def _simulated(model, tokenizer, folder: Path, texts) -> tuple[np.ndarray, np.ndarray]:
    card = json.loads((folder / "card.json").read_text())
    resolved = {row["layer"]: row["precision"] for row in card["layers"]}
    static = {row["layer"]: tuple(row["act_scale_zero_point"]) for row in card["layers"] if "act_scale_zero_point" in row}
    classifier = OrtClassifier(folder, threads=1)
    batches = length_sorted_batches(classifier.tokenizer, texts, classifier.max_length, batch_size=8)
    simulated = N.simulate_plan(onnx_graph.prepared(model, tokenizer)[0], resolved,
                                Plan.from_json(card["plan"]).group_size, static)
    return run_batches(classifier.logits, batches, len(texts)), run_batches(torch_forward(simulated), batches, len(texts))


@pytest.mark.parametrize("family", ("bert", "gpt2", "llama", "modernbert"))
@pytest.mark.parametrize("plan", PLANS)
def test_ort_predictions_equal_simulated_ort_numerics(family, plan, tokenizer, texts, tmp_path):
    model = tiny(family, len(tokenizer), 3 if family == "llama" else 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    export_onnx(model, tokenizer, PLANS[plan](model), tmp_path / "out", card=False)
    assert model.config._attn_implementation == attention  # the export traced a copy
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    kernels = {"fp32": ("MatMul (float", "Gather (float"), "int8": ("MatMulInteger", "Gather (uint8"),
               "int4": ("MatMulNBits", "GatherBlockQuantized")}
    assert all(any(k in row["onnx"] for k in kernels[row["precision"]]) for row in card["layers"])
    got, simulated = _simulated(model, tokenizer, tmp_path / "out", texts)
    assert np.array_equal(got.argmax(-1), simulated.argmax(-1))
    np.testing.assert_allclose(got, simulated, atol=2e-3 * max(1.0, np.abs(simulated).max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched


def test_static_and_fp16_plans(tokenizer, texts, tmp_path):
    model = tiny("bert", len(tokenizer))
    export_onnx(model, tokenizer, {"*": "int8", "options": {"act": "static"}}, tmp_path / "static", card=False,
                calibration_texts=texts[:16])
    card = json.loads((tmp_path / "static" / "card.json").read_text())
    assert all("act_scale_zero_point" in row for row in card["layers"][1:])
    got, simulated = _simulated(model, tokenizer, tmp_path / "static", texts)
    assert np.array_equal(got.argmax(-1), simulated.argmax(-1))
    export_onnx(model, tokenizer, {"*.layer.0.*": "fp16", "bert.embeddings.word_embeddings": "fp16"}, tmp_path / "half",
                card=False)
    got, simulated = _simulated(model, tokenizer, tmp_path / "half", texts)
    np.testing.assert_allclose(got, simulated, atol=2e-3)
    assert (tmp_path / "half" / "model.onnx").stat().st_size < (tmp_path / "static" / "model.onnx").stat().st_size * 4


def test_decoder_without_pad_token_pads_with_eos(tokenizer, texts, tmp_path):
    import copy

    model, no_pad = tiny("llama", len(tokenizer), pad=None), copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    export_onnx(model, no_pad, "int4", tmp_path / "out", card=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pad_token_id"] == no_pad.eos_token_id and model.config.pad_token_id is None
    assert no_pad.pad_token is None  # the caller's tokenizer is unchanged
    got = OrtClassifier(tmp_path / "out").predict(texts[:6])
    assert [row["label"] for row in got] and all(abs(sum(row["probs"].values()) - 1) < 1e-6 for row in got)


# ---- bad input: one ExportError, nothing left behind ------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_bad_input_is_one_error_and_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    model = tiny("bert", len(tokenizer))
    (tmp_path / "taken").mkdir()
    cases = [("fp32", tmp_path / "taken", "already exists"),
             ("bf16", tmp_path / "a", "bf16"),
             ({"*": "int4", "options": {"group_size": 24}}, tmp_path / "b", "power of two"),
             ({"*": "int8", "options": {"act": "token"}}, tmp_path / "c", "per-token"),
             ({"nothing.here": "int8"}, tmp_path / "d", "matches no layer"),
             ("fp32", tmp_path / "missing" / "out", "does not exist")]
    unwritable = Path("/proc/onnx-export") if os.geteuid() == 0 else tmp_path / "locked" / "out"
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
    cases.append(("fp32", unwritable, "cannot write"))
    for plan, out, words in cases:
        with pytest.raises(ExportError, match=words) as caught:
            export_onnx(model, tokenizer, plan, out, card=False)
        assert "\n" not in str(caught.value)
        assert not out.exists() or out == tmp_path / "taken"
    assert list((tmp_path / "taken").iterdir()) == []

    def fail(*args, **kwargs):
        raise RuntimeError("quantizer broke\nsecond line")

    monkeypatch.setattr(onnx_graph, "int4_weight_only", fail)  # a failure half-way through
    with pytest.raises(ExportError, match="quantizer broke$"):
        export_onnx(model, tokenizer, "int4", tmp_path / "half", card=False)
    assert not (tmp_path / "half").exists() and _leftovers(tmp_path) == []


# ---- the folder on its own: a fresh process, the card, timing ---------------------------------
def test_folder_reloads_in_a_fresh_process_and_card_is_measured(tokenizer, texts, tmp_path):
    model = tiny("bert", len(tokenizer))
    data = load_dataset("embedded").head(24)
    result = export_onnx(model, tokenizer, {"*": "int8", "options": {"group_size": 16}}, tmp_path / "out",
                         card={"data": data, "latency": True, "threads": 1})
    folder = Path(result["out"])
    assert {"model.onnx", "config.json", "tokenizer.json", "plan.json", "README.md", "card.json"} <= \
        {p.name for p in folder.iterdir()}
    assert result["format"] == "onnx" and result["size_bytes"] == (folder / "model.onnx").stat().st_size
    measured = json.loads((folder / "card.json").read_text())["measured"]
    assert measured["n"] == 24 and 0 <= measured["ci95"][0] <= measured["accuracy"] <= measured["ci95"][1] <= 1
    assert measured["latency"]["threads"] == 1 and measured["latency"]["protocol"] == "back_to_back"
    assert "Wilson" in (folder / "README.md").read_text()
    here = OrtClassifier(folder, threads=1)
    encoded = here.tokenizer(texts, padding=True, truncation=True, max_length=here.max_length, return_tensors="np")
    expected = here.logits(encoded["input_ids"], encoded["attention_mask"])
    script = ("import json, sys, onnxruntime as ort; from transformers import AutoTokenizer; "  # plain onnxruntime
              "tok = AutoTokenizer.from_pretrained(sys.argv[1]); "
              "enc = tok(json.loads(sys.argv[2]), padding=True, truncation=True, max_length=128, return_tensors='np'); "
              "s = ort.InferenceSession(sys.argv[1] + '/model.onnx', providers=['CPUExecutionProvider']); "
              "print(json.dumps(s.run(None, {k: enc[k] for k in ('input_ids', 'attention_mask')})[0].tolist()))")
    out = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(texts)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, check=True)
    there = np.array(json.loads(out.stdout))
    assert np.array_equal(there.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(there, expected, atol=1e-5)
    predictions = here.predict(texts)
    assert predictions[-1]["truncated"] and not predictions[0]["truncated"]
    assert set(predictions[0]["probs"]) == {"negative", "positive"}
    try:
        from optimum.onnxruntime import ORTModelForSequenceClassification
    except ImportError:
        return  # optimum is optional
    optimum = ORTModelForSequenceClassification.from_pretrained(folder, file_name="model.onnx")
    assert optimum(**tokenizer(texts[:4], padding=True, return_tensors="pt")).logits.shape == (4, 2)


def test_benchmark_protocols(tokenizer, texts, tmp_path):
    model = tiny("bert", len(tokenizer))
    export_onnx(model, tokenizer, "fp32", tmp_path / "out", card=False)
    variants = {"ort": tmp_path / "out", "torch": torch_forward(model)}
    for protocol, spinning in (("back_to_back", True), ("interleaved", False)):
        rows = benchmark(variants, tokenizer, texts, batch=2, tokens=16, protocol=protocol, threads=1, warmup=1,
                         repeats=3, min_seconds=0.0)
        assert rows["ort"]["spinning"] is spinning and rows["torch"]["runtime"] == "torch"
        assert all(r["latency_ms_p95"] >= r["latency_ms_p50"] > 0 and r["repeats"] >= 3 for r in rows.values())
    with pytest.raises(ValueError, match="protocol"):
        benchmark(variants, tokenizer, texts, protocol="round_robin")
