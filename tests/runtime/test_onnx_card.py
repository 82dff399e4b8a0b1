"""An export's model card: which CPU its int8 figures assume and a warning exactly where 8-bit int8 weights
compute other logits on some CPUs, the versions and machine that made it, and a README that states what was
measured (or that nothing was) and loads the folder. Cards of real exports: tests/runtime/test_onnx.py."""
from __future__ import annotations

import datetime
import json
import os
import re

import onnxruntime as ort
import pytest
import torch

from engine.core.cpu import TargetCpu, this_cpu
from engine.runtime import onnx_card

ROWS = [{"layer": "bert.encoder.layer.0.output.dense", "precision": "int8", "onnx": "MatMulInteger"},
        {"layer": "classifier", "precision": "fp32", "onnx": "MatMul"}]
MEASURED = {"data": "embedded", "n": 64, "accuracy": 0.8125, "ci95": [0.7, 0.89], "fp32_accuracy": 0.828125,
            "agreement": 0.96875, "flips": 2, "kl": 1.5e-3, "mcnemar_p": 0.5,
            "latency": {"latency_ms_p50": 1.234, "latency_ms_p95": 2.5, "batch": 1, "tokens": 32, "threads": 1,
                        "protocol": "warm, 20 runs", "load_average": [0.5, 0.75]},
            "profile": {"groups": {"MatMul": 0.5, "Attention": 0.25, "Idle": 0.0}, "profiled_ms": 0.75,
                        "wall_ms": 1.0, "unfused": [f"DequantizeLinear_{i}" for i in range(7)],
                        "cpu": {"features": "avx2 avx512_vnni", "meaning": ["int8 sums are exact here"]}}}


@pytest.mark.parametrize("target", list(TargetCpu))
@pytest.mark.parametrize("int8_layers", [True, False])
def test_the_cpu_path_warns_exactly_where_8_bit_weights_can_saturate(target, int8_layers):
    path = onnx_card.cpu_path(target, int8_layers)
    assert path["target_cpu"] == target.value and path["kernel"] == target.kernel
    assert path["int8_weight_bits"] == (7 if target in (TargetCpu.AVX2, TargetCpu.AVX512) else 8)
    assert path["measured_on"]["target_cpu"] == this_cpu().value
    warned = int8_layers and not target.saturates
    assert (path["warning"] is not None) == warned
    if warned:
        assert "--target-cpu avx2" in path["warning"]
        assert path["warning"].startswith("this machine") == this_cpu().saturates


def test_the_measured_figures_are_typed_and_keep_their_json():
    figures = onnx_card.CardFigures.from_json(MEASURED)
    assert figures.accuracy == MEASURED["accuracy"] and figures.ci95 == tuple(MEASURED["ci95"])
    assert figures.to_json() == MEASURED and onnx_card.CardFigures.from_json(figures.to_json()) == figures
    untimed = {k: v for k, v in MEASURED.items() if k not in ("latency", "profile")}
    assert onnx_card.CardFigures.from_json(untimed).to_json() == untimed  # no latency key where none was timed
    assert onnx_card.CardFigures.from_json(untimed).latency_ms_p50 is None
    path = onnx_card.cpu_path(TargetCpu.VNNI, int8_layers=True)
    typed = onnx_card.CpuPath.from_json(path)
    assert typed.measured_on.target_cpu == path["measured_on"]["target_cpu"] and typed.to_json() == path


def test_build_records_the_plan_the_figures_and_who_made_them():
    card = onnx_card.build("tiny", {"*": "int8"}, "INT8", ROWS, 1000, 4000, MEASURED, TargetCpu.VNNI)
    assert (card["model"], card["plan"], card["plan_label"], card["layers"]) == ("tiny", {"*": "int8"}, "INT8", ROWS)
    assert (card["size_bytes"], card["fp32_size_bytes"], card["measured"]) == (1000, 4000, MEASURED)
    assert card["cpu"] == onnx_card.cpu_path(TargetCpu.VNNI, int8_layers=True)
    assert card["versions"]["onnxruntime"] == ort.__version__ and card["versions"]["torch"] == torch.__version__
    assert card["machine"] == f"{onnx_card.cpu_name()}, {os.cpu_count()} cores" and onnx_card.cpu_name()
    made = datetime.datetime.strptime(card["date"], "%Y-%m-%d %H:%M UTC").replace(tzinfo=datetime.UTC)
    assert abs((datetime.datetime.now(datetime.UTC) - made).total_seconds()) < 120
    json.dumps(card)  # the card is written as card.json
    fp32_only = onnx_card.build("tiny", {"*": "fp32"}, "FP32", ROWS[1:], 4000, 4000, None, TargetCpu.VNNI)
    assert fp32_only["cpu"]["warning"] is None  # no int8 layer, nothing to saturate


def test_the_readme_states_what_was_measured():
    card = onnx_card.build("tiny", {"*": "int8"}, "INT8", ROWS, 1_000_000, 4_000_000, MEASURED, TargetCpu.VNNI)
    text = onnx_card.markdown(card)
    assert text.startswith("# tiny: ONNX export of plan `INT8`")
    assert json.dumps(card["plan"], indent=1) in text
    assert "| `bert.encoder.layer.0.output.dense` | int8 | MatMulInteger |" in text
    assert "model.onnx 1.0 MB, 25.00% of the FP32 export (4.0 MB)" in text
    assert "accuracy on `embedded` (n=64): 81.25% (95% Wilson CI 70.00% to 89.00%); FP32 torch 82.81%" in text
    assert "96.88% (2 flips)" in text and "p50 1.23 ms, p95 2.50 ms at batch 1, 32 tokens" in text
    assert "- MatMul 0.50 ms, Attention 0.25 ms: 0.75 ms of the forward's 1.00 ms" in text  # idle groups left out
    assert "unfused: 7 (DequantizeLinear_0, DequantizeLinear_1, DequantizeLinear_2, DequantizeLinear_3, " \
           "DequantizeLinear_4, ...)" in text
    assert "- int8 sums are exact here" in text
    assert ("**warning**" in text) == (card["cpu"]["warning"] is not None)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    compile(code, "README.md", "exec")  # the loading snippet is Python


def test_the_readme_of_an_unmeasured_export_says_so():
    card = onnx_card.build("tiny", {"*": "int4"}, "INT4", ROWS[1:], 500, 4000, None, TargetCpu.AVX2)
    text = onnx_card.markdown(card)
    assert "- accuracy and latency: not measured at export" in text
    assert "Where the time goes" not in text and "**warning**" not in text
    assert text.endswith(f"- machine: {card['machine']}\n")
