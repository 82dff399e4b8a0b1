"""Export any plan to an ONNX Runtime folder: model.onnx, tokenizer and config, the plan, a model card.

`export_onnx(model, tokenizer, plan, out_dir)` traces the FP32 model with the standard (TorchScript)
exporter and quantizes exactly the plan's layers with ORT's own tools (see engine.runtime.onnx_graph for
the layer -> node mapping and the ops each precision becomes). Layers the plan keeps at fp32 stay fp32.
Everything is written into a temporary folder beside the target and renamed at the end, so a failure
leaves nothing behind; every failure is one `ExportError` with a one-line message.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from engine.plan import Plan, PlanError, parse_plan
from engine.quantize import shallow_copy
from engine.runtime import onnx_card, onnx_graph
from engine.runtime.onnx_graph import GraphError, quiet_ort
from engine.runtime.onnx_session import OrtClassifier, max_length
from engine.smoothquant import calibration_texts as default_calibration_texts
from engine.smoothquant import prepare_layers

FORMATS = ("onnx",)
# what layer_ops must show for each precision once the tools have run
_EXPECTED = {"fp32": ("(float weights)",), "fp16": ("(float16 weights)",),
             "int8": ("MatMulInteger", "DequantizeLinear + MatMul", "Gather (uint8"),
             "int4": ("MatMulNBits", "GatherBlockQuantized")}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message is one line and names the reason."""


def coerce_plan(plan: Plan | str | dict | None) -> Plan:
    try:
        if plan is None or isinstance(plan, Plan):
            return plan or Plan()
        return Plan.from_json(plan) if isinstance(plan, dict) else parse_plan(plan)
    except PlanError as error:
        raise ExportError(str(error)) from None


def check_plan(plan: Plan, resolved: dict[str, str]) -> None:
    """Reject, before any work, what ONNX Runtime's CPU provider cannot run as the plan says."""
    used = set(resolved.values())
    if "bf16" in used:
        layer = next(name for name, p in resolved.items() if p == "bf16")
        raise ExportError(f"layer {layer}: bf16 cannot be exported: ONNX Runtime's CPU provider has no bfloat16 "
                          "MatMul kernel (use fp16, int8 or int4)")
    if "int4" in used and (plan.group_size < 16 or plan.group_size & (plan.group_size - 1)):
        raise ExportError(f"int4 group_size {plan.group_size}: ORT's MatMulNBits needs a power of two of at least 16")
    if "int8" in used and plan.act == "token":
        raise ExportError("int8 with act 'token': ONNX Runtime has no per-token dynamic int8 MatMul "
                          "(use act 'dynamic' or 'static')")


class _ScaledLinear(nn.Module):
    """A smoothed layer: F.linear(x / s, W * s, b) in the layer's own scope, so its MatMul maps as usual."""

    def __init__(self, linear: nn.Linear, in_scale: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.register_buffer("in_scale", in_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x if self.in_scale is None else x / self.in_scale, self.weight, self.bias)


def smoothed(model: nn.Module, plan: Plan, resolved: dict[str, str]) -> nn.Module:
    """The float model with the plan's SmoothQuant applied (engine.smoothquant's factors), or `model`."""
    if plan.smooth_alpha is None:
        return model
    try:
        prepared = prepare_layers(model, plan, resolved)
    except ValueError as error:
        raise ExportError(f"smooth_alpha: {str(error).splitlines()[0]}") from None
    clone = shallow_copy(model)
    for name, layer in prepared.items():
        if layer.key is None and layer.in_scale is None:
            continue  # only a static scale: the float layer is unchanged
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent) if parent else clone, child, _ScaledLinear(layer.linear, layer.in_scale))
    return clone


def _calibration_feeds(tokenizer, texts: list[str], limit: int) -> list[dict]:
    """One feed per sentence (no padding in the calibrated ranges)."""
    feeds = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
        feeds.append({"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)})
    return feeds


def _build(model, tokenizer, plan: Plan, resolved: dict[str, str], folder: Path, calibration_texts, say) -> dict:
    """Everything the folder holds but the card; returns what the card needs."""
    work = folder / ".work"
    work.mkdir()
    layers = onnx_graph.quantizable_layers(model)
    source, tokenizer = onnx_graph.prepared(smoothed(model, plan, resolved), tokenizer)
    say("exporting the FP32 graph", 0.1)
    onnx_graph.export_fp32(source, tokenizer, work / "fp32.onnx")
    fp32_size = (work / "fp32.onnx").stat().st_size
    graph = onnx_graph.replace_gemm(onnx.load(str(work / "fp32.onnx")))
    mapping = onnx_graph.layer_nodes(graph.graph, layers, {name for name, _ in source.named_modules()})
    chosen = lambda precision: [n for name in layers if resolved[name] == precision for n in mapping[name]]
    limit = max_length(tokenizer, source.config.to_dict())
    if chosen("fp16"):
        say("fp16 layers", 0.3)
        graph = onnx_graph.to_fp16(graph, chosen("fp16"))
    if chosen("int8"):
        graph = _int8(graph, chosen("int8"), layers, mapping, plan, work, tokenizer, limit, calibration_texts, say)
    if chosen("int4"):
        say("int4 layers: MatMulNBits", 0.6)
        with quiet_ort():
            graph = onnx_graph.int4_weight_only(graph, chosen("int4"), plan.group_size)
    ops = onnx_graph.layer_ops(graph, mapping)
    for name, op in ops.items():
        if not any(mark in op for mark in _EXPECTED[resolved[name]]):
            raise GraphError(f"layer {name} should be {resolved[name]} but reads its weight with {op}")
    onnx.save(graph, str(folder / "model.onnx"))
    tokenizer.save_pretrained(folder)
    source.config.save_pretrained(folder)
    (folder / "plan.json").write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    sample = tokenizer(list(onnx_graph.TRACE_TEXTS), padding=True, return_tensors="np")
    OrtClassifier(folder, threads=1).logits(sample["input_ids"], sample["attention_mask"])  # it loads and runs
    shutil.rmtree(work)
    static = onnx_graph.static_activation_params(graph, mapping)
    rows = [{"layer": name, "precision": resolved[name], "onnx": ops[name], "nodes": mapping[name],
             **({"act_scale_zero_point": list(static[name])} if name in static else {})} for name in layers]
    return {"rows": rows, "fp32_size": fp32_size, "reference": onnx_graph.prepared(model, tokenizer)[0]}


def _int8(graph: onnx.ModelProto, nodes: list[str], layers: dict, mapping: dict[str, list[str]], plan: Plan,
          work: Path, tokenizer, limit: int, calibration_texts, say) -> onnx.ModelProto:
    """The int8 layers: quantize_dynamic, or quantize_static (QDQ) for the linears when `act` is static
    (the table's Gather is always dynamic: a weight-only uint8 table)."""
    owner = {node: layer for layer, names in mapping.items() for node in names}
    table = [n for n in nodes if isinstance(layers[owner[n]], nn.Embedding)]
    linear = [n for n in nodes if n not in table]
    if plan.act == "static" and linear:
        graph = onnx_graph.own_inputs(graph, linear)
    onnx.save(graph, str(work / "stage.onnx"))
    with quiet_ort():
        if plan.act == "static" and linear:
            say("int8 layers: static QDQ, calibrating", 0.4)
            texts = list(calibration_texts) if calibration_texts is not None else default_calibration_texts(plan.calib)
            onnx_graph.int8_static(work / "stage.onnx", work / "static.onnx", linear, graph,
                                   _calibration_feeds(tokenizer, texts, limit))
            if not table:
                return onnx.load(str(work / "static.onnx"))
            linear, graph = [], onnx.load(str(work / "static.onnx"))
            onnx.save(graph, str(work / "stage.onnx"))
        say("int8 layers: dynamic", 0.45)
        onnx_graph.int8_dynamic(work / "stage.onnx", work / "int8.onnx", linear + table, graph)
    return onnx.load(str(work / "int8.onnx"))


def export_onnx(model: nn.Module, tokenizer, plan: Plan | str | dict, out_dir: str | Path, *,
                calibration_texts=None, card: dict | bool | None = None,
                progress: Callable[[str, float], None] | None = None) -> dict:
    """Write `out_dir` (which must not exist yet): model.onnx, tokenizer and config files, plan.json,
    README.md (the model card) and card.json. Returns {"out", "format", "size_bytes", "plan", ...}.

    `card`: None measures on the embedded evaluation set (accuracy with CI, agreement with FP32 torch,
    latency at batch 1 and 32 tokens); False measures nothing; a dict picks {"data", "limit", "latency",
    "threads", "notes"} or supplies figures already measured under "measured". `calibration_texts` feed
    the static int8 calibration (default: the engine's calibration sentences, plan option `calib`).
    """
    say = progress or (lambda message, fraction: None)
    plan = coerce_plan(plan)
    weight = next(model.parameters(), None)
    if weight is not None and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        raise ExportError(f"export traces the FP32 model on the CPU; this one is {weight.dtype} on {weight.device}")
    layers = onnx_graph.quantizable_layers(model)
    try:
        resolved = plan.resolve(list(layers))
    except PlanError as error:
        raise ExportError(str(error)) from None
    check_plan(plan, resolved)
    options = card if isinstance(card, dict) else {}
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
        built = _build(model, tokenizer, plan, resolved, folder, calibration_texts, say)
        size = (folder / "model.onnx").stat().st_size
        measured = options.get("measured")
        if measured is None and card is not False:
            say("measuring accuracy and latency", 0.8)
            measured = onnx_card.measure(folder, built["reference"], options.get("data", "embedded"),
                                         options.get("limit"), options.get("latency", True), options.get("threads"))
        info = onnx_card.build(getattr(model, "name_or_path", None) or type(model).__name__, plan.to_json(),
                               plan.label(), built["rows"], size, built["fp32_size"], measured, options.get("notes"))
        (folder / "card.json").write_text(json.dumps(info, indent=1) + "\n")
        (folder / "README.md").write_text(onnx_card.markdown(info))
        if target.exists():
            raise ExportError(f"{target} appeared while exporting: nothing was written")
        os.rename(folder, target)
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(error, ExportError):
            raise
        if isinstance(error, (GraphError, PlanError)):
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
