"""Where the time goes: one forward's time by op group, from ONNX Runtime's session profiling and torch's
profiler, beside the latency measured around the same calls, and what this CPU's instructions mean for
int8 and int4 kernels.

Groups: quantized matmuls (the layers' integer or 4-bit kernels), float matmuls (layers kept in float),
quantize/dequantize (the activations' quantization and any Q/DQ or Cast left standing), attention (the
score and context matmuls, softmax), norms, activations, other. A float MatMul reading an initializer is
a layer; one between two activations is attention. Torch's op times are self times on the calling thread
(each op's own, without its children), so they add up to the forward's wall time.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from engine.core.cpu import cpu_features, features_line, this_cpu
from engine.core.vocabulary import Runtime

GROUPS = ("quantized matmul", "float matmul", "quantize/dequantize", "attention", "norm", "activation", "other")
_ORT_GROUPS = {
    "quantized matmul": {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
                         "MatMulNBits", "QGemm", "QAttention", "GatherBlockQuantized"},
    "quantize/dequantize": {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Cast"},
    "attention": {"Softmax", "Attention", "MultiHeadAttention"},
    "norm": {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "RMSNormalization"},
    "activation": {"Gelu", "FastGelu", "BiasGelu", "Erf", "Tanh", "Sigmoid", "QuickGelu", "Relu", "Silu"},
}
_TORCH_GROUPS = (  # (name fragment, group), first match wins
    ("quantized::", "quantized matmul"), ("quantize_per", "quantize/dequantize"), ("dequantize", "quantize/dequantize"),
    ("choose_qparams", "quantize/dequantize"), ("softmax", "attention"), ("bmm", "attention"),
    ("scaled_dot_product", "attention"), ("layer_norm", "norm"), ("rms_norm", "norm"), ("gelu", "activation"),
    ("silu", "activation"), ("tanh", "activation"), ("addmm", "float matmul"), ("aten::mm", "float matmul"),
    ("aten::linear", "float matmul"),
)


@dataclass(frozen=True)
class Profile:
    """Milliseconds per forward by op group (means over the profiled forwards), their sum, and the mean wall time
    of those same forwards: what the groups account for."""

    runtime: str
    batch: int
    groups: dict[str, float]
    profiled_ms: float
    wall_ms: float
    unfused: tuple[str, ...]  # Q/DQ and Cast nodes the runtime left standing (ORT), by name

    @property
    def outside_ops_ms(self) -> float:
        """Wall time in no op: Python and module calls between torch's ops, ORT's own per-run work."""
        return round(max(self.wall_ms - self.profiled_ms, 0.0), 4)

    def to_json(self) -> dict:
        return {**asdict(self), "unfused": list(self.unfused), "outside_ops_ms": self.outside_ops_ms}


def _ort_group(op_type: str, reads_weight: bool) -> str:
    for group, ops in _ORT_GROUPS.items():
        if op_type in ops:
            return group
    if op_type in ("MatMul", "Gemm", "FusedMatMul"):
        return "float matmul" if reads_weight else "attention"
    return "other"


def profile_ort(folder: str | Path, feeds: dict[str, np.ndarray], batch: int, runs: int = 20,
                warmup: int = 5, threads: int | None = None) -> Profile:
    """ORT's own per-node times over `runs` forwards after `warmup`, and the wall time of those forwards."""
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(Path(folder) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            session.run(None, feeds)
        walls = []
        for _ in range(runs):
            begin = time.perf_counter()
            session.run(None, feeds)
            walls.append(time.perf_counter() - begin)
        events = json.loads(Path(session.end_profiling()).read_text())
        graph = onnx.load(str(Path(scratch) / "optimized.onnx"), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    weights = {node.name: len(node.input) > 1 and node.input[1] in initializers for node in graph.node}
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")[warmup:]
    first = run_starts[0] if run_starts else 0
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < first:
            continue
        node = event["name"][: -len("_kernel_time")]
        totals[_ort_group(event["args"].get("op_name", ""), weights.get(node, False))] += event["dur"] / 1000.0
    unfused = tuple(node.name for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"))
    return _profile(Runtime.ONNXRUNTIME, batch, totals, runs, walls, unfused)


def profile_torch(call: Callable[[], object], batch: int, runs: int = 20, warmup: int = 5) -> Profile:
    """torch.profiler's self CPU time per op over `runs` forwards after `warmup`, and their wall time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(warmup):
            call()
        walls = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                begin = time.perf_counter()
                call()
                walls.append(time.perf_counter() - begin)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        group = next((g for fragment, g in _TORCH_GROUPS if fragment in event.key), "other")
        totals[group] += event.self_cpu_time_total / 1000.0
    return _profile(Runtime.TORCH, batch, totals, runs, walls, ())


def _profile(runtime: str, batch: int, totals: dict[str, float], runs: int, walls: list[float],
             unfused: tuple[str, ...]) -> Profile:
    groups = {group: round(totals.get(group, 0.0) / runs, 4) for group in GROUPS}
    return Profile(runtime, batch, groups, round(sum(groups.values()), 4), round(1000 * float(np.mean(walls)), 4),
                   unfused)


def cpu_report() -> dict:
    """This CPU's instruction sets that decide int8 and int4 speed, each with what it means for the kernels."""
    features = cpu_features()
    meaning = []
    if features["amx_int8"]:
        meaning.append("AMX-INT8: tile matrix multiplies; ORT's and oneDNN's int8 GEMMs use them where the OS allows")
    if features["avx512_vnni"] or features["avx_vnni"]:
        meaning.append("VNNI: one instruction (vpdpbusd) multiplies and adds 4 int8 pairs into 32 bits; int8 GEMMs "
                       "do about twice the work per cycle of AVX2's three-instruction sequence, and exactly")
    elif features["avx2"]:
        meaning.append("no VNNI: int8 GEMMs use vpmaddubsw + vpmaddwd (16-bit pairs that saturate, so ORT's "
                       "exports use 7-bit weights here), about half VNNI's int8 rate; expect smaller int8 gains")
    if features["avx512_f"]:
        meaning.append("AVX-512: 16 floats per instruction for FP32 GEMMs and the dequantizing int4 kernels")
    meaning.append("int4 (MatMulNBits / torch's unpacked int4): weights are unpacked to float per call, so int4 "
                   "saves memory and bandwidth, and pays off only where the GEMM waited on memory")
    report = {"features": features_line(), "target_cpu": this_cpu().value, "meaning": meaning}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        report["cuda_compute_capability"] = f"{major}.{minor}"
    return report
