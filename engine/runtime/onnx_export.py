"""Export any plan to an ONNX Runtime folder: model.onnx, tokenizer and config, the plan, a model card.

`export_onnx(model, tokenizer, plan, out_dir)` traces the FP32 model (with the plan's SmoothQuant
applied, when it smooths) with the standard (TorchScript) exporter and quantizes exactly the plan's layers
with ORT's own tools (see engine.runtime.onnx_graph for the layer -> node mapping and the ops each
precision becomes). Layers the plan keeps at fp32 stay fp32. Calibration (static int8) and smoothing are
the caller's (prepare, then convert), and so are the card's figures (`card(folder)` measures the folder
before it is moved into place). Everything is written into a temporary folder beside the target and renamed
at the end, so a failure leaves nothing behind; every failure is one `ExportError` line.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from engine.core.errors import EngineError
from engine.core.plan import FP32, Plan, PlanError, PlanLike, as_plan
from engine.core.precisions import PRECISIONS
from engine.core.rules import LayerSpec
from engine.core.tokens import encode
from engine.core.vocabulary import Runtime
from engine.model.loading import input_limit
from engine.quant.apply import apply_plan
from engine.quant.prepared import Prepared
from engine.runtime import onnx_card, onnx_graph
from engine.runtime.onnx_int4 import write_int4
from engine.runtime.onnx_static import int8_static_exact
from engine.runtime.onnx_graph import GraphError, quiet_ort
from engine.runtime.onnx_session import OrtClassifier

FORMATS = ("onnx",)
# what layer_ops must show for each precision once the tools have run
_EXPECTED = {"fp32": ("(float weights)",), "fp16": ("(float16 weights)",),
             "int8": ("MatMulInteger", "DequantizeLinear + MatMul", "Gather (uint8"),
             "int4": ("MatMulNBits", "GatherBlockQuantized")}


class ExportError(EngineError):
    """An export that cannot be done as asked; the message is one line and names the reason."""


def float_source(model: nn.Module, prepared: Prepared) -> nn.Module:
    """The float model the export quantizes: every layer FP32, with the plan's smoothing (SmoothQuant, AWQ)
    folded in and its corrected biases, so ORT's quantizers see the weights the simulation quantized."""
    if prepared.smoothing is None and not prepared.biases:
        return model
    return apply_plan(model, FP32, prepared=Prepared(smoothing=prepared.smoothing, biases=prepared.biases))


def _calibration_feeds(tokenizer, texts: Sequence[str], limit: int) -> list[dict]:
    """One feed per sentence (no padding in the calibrated ranges)."""
    return [{"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            for ids in encode(tokenizer, texts, limit).ids]


def _build(model, tokenizer, plan: Plan, specs: dict[str, LayerSpec], folder: Path, calibration_texts,
           prepared: Prepared, say) -> dict:
    """Everything the folder holds but the card; returns what the card needs."""
    work = folder / ".work"
    work.mkdir()
    layers = onnx_graph.quantizable_layers(model)
    limit = input_limit(model, tokenizer)
    resolved = {name: spec.precision for name, spec in specs.items()}
    source, tokenizer = onnx_graph.prepared(float_source(model, prepared), tokenizer)
    tokenizer.model_max_length = limit  # the folder's tokenizer truncates where the model stops reading
    say("exporting the FP32 graph", 0.1)
    onnx_graph.export_fp32(source, tokenizer, work / "fp32.onnx")
    graph = onnx_graph.replace_gemm(onnx.load(str(work / "fp32.onnx")))
    onnx.save(graph, str(work / "fp32-matmul.onnx"))
    onnx_graph.optimize_offline(work / "fp32-matmul.onnx", work / "fp32-deployed.onnx")
    fp32_size = (work / "fp32-deployed.onnx").stat().st_size  # the FP32 plan's own file, for the size ratio
    mapping = onnx_graph.layer_nodes(graph.graph, layers, {name for name, _ in source.named_modules()})
    chosen = lambda precision: [n for name in layers if resolved[name] == precision for n in mapping[name]]
    if chosen("fp16"):
        say("fp16 layers", 0.3)
        graph = onnx_graph.to_fp16(graph, chosen("fp16"))
    if chosen("int8"):
        graph = _int8(graph, chosen("int8"), layers, mapping, plan, specs, prepared, work,
                      _calibration_feeds(tokenizer, calibration_texts, limit) if calibration_texts else [], say)
    if chosen("int4"):
        say("int4 layers: MatMulNBits", 0.6)
        graph = _int4(graph, [name for name in layers if resolved[name] == "int4"], mapping, specs, prepared)
    ops = onnx_graph.layer_ops(graph, mapping)
    for name, op in ops.items():
        if not any(mark in op for mark in _EXPECTED[resolved[name]]):
            raise GraphError(f"layer {name} should be {resolved[name]} but reads its weight with {op}")
    onnx.save(graph, str(work / "final.onnx"))
    onnx_graph.optimize_offline(work / "final.onnx", folder / "model.onnx")
    onnx_graph.check_kept(graph, onnx.load(str(folder / "model.onnx")))
    tokenizer.save_pretrained(folder)
    source.config.save_pretrained(folder)
    (folder / "plan.json").write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    sample = tokenizer(list(onnx_graph.TRACE_TEXTS), padding=True, return_tensors="np")
    OrtClassifier(folder, threads=1).logits(sample["input_ids"], sample["attention_mask"])  # it loads and runs
    shutil.rmtree(work)
    static = onnx_graph.static_activation_params(graph, mapping)
    rows = [{"layer": name, "precision": resolved[name], "onnx": ops[name], "nodes": mapping[name],
             **({"act_scale_zero_point": list(static[name])} if name in static else {})} for name in layers]
    return {"rows": rows, "fp32_size": fp32_size}


def _int8(graph: onnx.ModelProto, nodes: list[str], layers: dict, mapping: dict[str, list[str]], plan: Plan,
          specs: dict[str, LayerSpec], prepared: Prepared, work: Path, feeds: list[dict], say) -> onnx.ModelProto:
    """The int8 layers: quantize_dynamic, and quantize_static (QDQ) for the linears whose `act` is static, with
    the engine's own activation (scale, zero point) written for each (the table's Gather is always dynamic: a
    weight-only uint8 table)."""
    owner = {node: layer for layer, names in mapping.items() for node in names}
    static = [n for n in nodes if layers[owner[n]] != "embedding" and specs[owner[n]].static]
    dynamic = [n for n in nodes if n not in static]
    if static:
        graph = onnx_graph.own_inputs(graph, static)
    onnx.save(graph, str(work / "stage.onnx"))
    with quiet_ort():
        if static:
            say("int8 layers: static QDQ with the engine's activation scales", 0.4)
            if not feeds:
                raise ExportError("static int8 needs calibration sentences (from the evaluated source's pool)")
            numerics = PRECISIONS["int8"].numerics_for(plan.runtime, plan.int8_weight_bits)
            qparams = {node: numerics.static(*prepared.ranges[owner[node]], numerics.reduce_range) for node in static}
            int8_static_exact(work / "stage.onnx", work / "static.onnx", static, graph, feeds, plan.int8_weight_bits,
                              qparams)
            if not dynamic:
                return onnx.load(str(work / "static.onnx"))
            graph = onnx.load(str(work / "static.onnx"))
            onnx.save(graph, str(work / "stage.onnx"))
        say("int8 layers: dynamic", 0.45)
        onnx_graph.int8_dynamic(work / "stage.onnx", work / "int8.onnx", dynamic, graph, plan.int8_weight_bits)
    return onnx.load(str(work / "int8.onnx"))


def _int4(graph: onnx.ModelProto, names: list[str], mapping: dict[str, list[str]], specs: dict[str, LayerSpec],
          prepared: Prepared) -> onnx.ModelProto:
    """MatMulNBits for the int4 layers, one quantizer pass per group size; a method's layers then get the
    engine's integers written over the quantizer's (GPTQ, HQQ), so the graph computes what was simulated."""
    by_group: dict[int, list[str]] = {}
    for name in names:
        by_group.setdefault(specs[name].group_size, []).extend(mapping[name])
    with quiet_ort():
        for group_size, nodes in sorted(by_group.items()):
            graph = onnx_graph.int4_weight_only(graph, nodes, group_size)
    written = {f"{node}_Q4": prepared.weights[name] for name in names if name in prepared.weights
               for node in mapping[name]}
    if written:
        write_int4(graph, written)
    return graph


def export_onnx(model: nn.Module, tokenizer, plan: PlanLike, out_dir: str | Path, *,
                calibration_texts: Sequence[str] | None = None, prepared: Prepared | None = None,
                card: Callable[[Path], dict] | None = None,
                progress: Callable[[str, float], None] | None = None) -> dict:
    """Write `out_dir` (which must not exist yet): model.onnx, tokenizer and config files, plan.json (the plan on
    runtime onnxruntime), README.md (the model card) and card.json. Returns {"out", "format", "size_bytes",
    "plan", "fp32_size_bytes", "measured"}.

    `calibration_texts` feed ORT's static quantizer (whose activation scales the engine's then replace),
    `prepared` (engine.quant.prepare.prepare, on the ONNX Runtime plan) carries what the plan computed, and
    `card(folder)` returns the figures measured on the finished folder (accuracy, agreement, latency).
    """
    say = progress or (lambda message, fraction: None)
    try:
        plan = as_plan(plan).on(Runtime.ONNXRUNTIME)
        plan = plan.for_cpu(plan.cpu.value)  # the folder's plan.json names the CPU its int8 was written for
        layers = onnx_graph.quantizable_layers(model)
        specs = plan.specs(list(layers))
    except PlanError as error:
        raise ExportError(str(error)) from None
    weight = next(model.parameters(), None)
    if weight is not None and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        raise ExportError(f"export traces the FP32 model on the CPU; this one is {weight.dtype} on {weight.device}")
    target = Path(out_dir).expanduser()
    if target.exists() or target.is_symlink():
        raise ExportError(f"{target} already exists: choose a new folder (nothing was written)")
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: the folder {target.parent} does not exist")
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as error:
        raise ExportError(f"cannot write into {target.parent}: {error.strerror or error}") from None
    try:
        built = _build(model, tokenizer, plan, specs, folder, calibration_texts, prepared or Prepared(), say)
        size = (folder / "model.onnx").stat().st_size
        measured = None
        if card is not None:
            say("measuring accuracy and latency", 0.8)
            measured = card(folder)
        info = onnx_card.build(getattr(model, "name_or_path", None) or type(model).__name__, plan.to_json(),
                               plan.label(), built["rows"], size, built["fp32_size"], measured, plan.cpu)
        (folder / "card.json").write_text(json.dumps(info, indent=1) + "\n")
        (folder / "README.md").write_text(onnx_card.markdown(info))
        if target.exists():
            raise ExportError(f"{target} appeared while exporting: nothing was written")
        os.rename(folder, target)
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(error, ExportError):
            raise
        if isinstance(error, (EngineError, GraphError)):
            raise ExportError(str(error)) from None
        if isinstance(error, OSError):
            raise ExportError(f"cannot write {target}: {error.strerror or error}") from error
        if isinstance(error, Exception):
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise ExportError(f"export of {type(model).__name__} failed: {type(error).__name__}: {first}") from error
        raise
    say("done", 1.0)
    return {"out": str(target), "format": "onnx", "size_bytes": size, "plan": plan.to_json(),
            "fp32_size_bytes": built["fp32_size"], "measured": measured}
