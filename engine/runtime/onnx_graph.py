"""From a torch classifier to a quantized ONNX graph: the standard exporter, then ORT's own tools.

Layer -> node mapping. The TorchScript exporter names every node after the module path it ran in:
`/bert/encoder/layer.0/attention/self/query/MatMul`. A node's scope ("bert.encoder.layer.0.attention.
self.query") is therefore the torch module name of the layer that owns it; a module called again gets
a `_<k>` suffix per call (ALBERT's shared layer: `.../query_1/MatMul`), which the mapping strips. A
Linear on a 3-D input exports as MatMul (+ Add); on a 2-D input (BERT's pooler and classifier) and
GPT-2's Conv1D (`addmm`) it exports as Gemm, which ORT's `ONNXModel.replace_gemm_with_matmul` (the
step quantize_dynamic itself runs) turns into `<name>_MatMul` + `<name>_Add` before anything else,
so every layer is quantized as a MatMul. The word-embedding table is the Gather reading its weight.

Precision -> ops: int8 -> DynamicQuantizeLinear + MatMulInteger (quantize_dynamic, per-channel int8
weights), or QuantizeLinear/DequantizeLinear around a MatMul (quantize_static, QDQ, after an Identity gives
that MatMul an input tensor of its own, see own_inputs) with `act: static`;
int4 -> MatMulNBits (MatMulNBitsQuantizer, asymmetric, block = the plan's group size); embedding int8 ->
Gather on a uint8 table + DequantizeLinear (quantize_dynamic); embedding int4 -> GatherBlockQuantized;
fp16 -> the float16 converter of onnxruntime.transformers (casts around the layer); fp32 -> unchanged.
Every file, FP32's included, is saved after ORT's basic offline optimizations (optimize_offline).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from engine.model.inventory import inventory
from engine.quant.apply import shallow_copy

OPSET = 20  # the TorchScript exporter's newest; MatMulNBitsQuantizer relabels it 21 for int4 tables
INPUTS = ("input_ids", "attention_mask")
TRACE_TEXTS = ("a short one", "a somewhat longer second sentence, so the trace sees padding")


class GraphError(ValueError):
    """The exported graph cannot be mapped or quantized as the plan says (one line)."""


# ---- the torch side -------------------------------------------------------------------------
def quantizable_layers(model: nn.Module) -> dict[str, str]:
    """The engine's inventory as {layer name: "embedding" | "linear"}, in forward order."""
    return {layer.name: layer.kind for layer in inventory(model)}


def prepared(model: nn.Module, tokenizer):
    """(model copy, tokenizer copy) ready to trace: eager attention, no cache, a pad token id that
    the tokenizer pads with (decoders pool the last non-pad token: eos when neither has one)."""
    clone, tokenizer = shallow_copy(model).eval(), copy.deepcopy(tokenizer)
    with contextlib.suppress(Exception):
        clone.set_attn_implementation("eager")
    config = clone.config
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if getattr(config, "reference_compile", None):
        config.reference_compile = False  # ModernBERT: no torch.compile inside the traced forward
    if tokenizer.pad_token_id is None:
        eos = tokenizer.eos_token if tokenizer.eos_token is not None else None
        if eos is None:
            raise GraphError("the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = eos
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return clone, tokenizer


def export_fp32(model: nn.Module, tokenizer, path: Path) -> None:
    """The TorchScript exporter, inputs (input_ids, attention_mask) -> logits, batch and length dynamic."""
    sample = tokenizer(list(TRACE_TEXTS), padding=True, return_tensors="pt")
    kwargs = {name: sample[name] for name in INPUTS}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), str(path), kwargs=kwargs, input_names=list(INPUTS), output_names=["logits"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


# ---- mapping --------------------------------------------------------------------------------
def _weight_input(node: onnx.NodeProto) -> int | None:
    return {"MatMul": 1, "Gemm": 1, "Gather": 0}.get(node.op_type)


def module_of(node_name: str, module_names: set[str]) -> str | None:
    """The torch module a node ran in, from its scoped name; None when the scope is not a module path."""
    path = ""
    for segment in node_name.strip("/").split("/")[:-1]:
        for name in (segment, re.sub(r"_\d+$", "", segment)):  # a module called again: `query_1`
            candidate = f"{path}.{name}" if path else name
            if candidate in module_names:
                path = candidate
                break
        else:
            return None
    return path


def layer_nodes(graph: onnx.GraphProto, layers: dict[str, str], module_names: set[str]) -> dict[str, list[str]]:
    """Each layer's weight-reading node names (MatMul for a linear, Gather for the table)."""
    initializers = {init.name for init in graph.initializer}
    found: dict[str, list[str]] = {name: [] for name in layers}
    for node in graph.node:
        index = _weight_input(node)
        if index is None or len(node.input) <= index or node.input[index] not in initializers:
            continue
        owner = module_of(node.name, module_names)
        if owner in found and (node.op_type == "Gather") == (layers[owner] == "embedding"):
            found[owner].append(node.name)
    missing = [name for name, nodes in found.items() if not nodes]
    if missing:
        raise GraphError(f"layer {missing[0]}: no node of the exported graph reads its weight")
    return found


def replace_gemm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm -> MatMul + Add with ORT's own rewrite, unused weights dropped."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    wrapped = ONNXModel(model)
    wrapped.replace_gemm_with_matmul()
    wrapped.clean_initializers()
    return wrapped.model


# ---- ORT's quantization tools ---------------------------------------------------------------
class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "pre-processing" not in message and "already quantized" not in message


@contextlib.contextmanager
def quiet_ort():
    """ORT's quantizers log a pre-processing hint on the root logger and per-node INFO lines."""
    hint, root = _DropPreprocessHint(), logging.getLogger()
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits.level
    root.addFilter(hint)
    nbits.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(hint)
        nbits.setLevel(level)


def _all_of(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type in op_types]


def to_fp16(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """The listed nodes in float16 (weights stored in half), everything else untouched."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = set(nodes)
    blocked = [node.name for node in model.graph.node if node.name not in keep]
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)


def int8_dynamic(src: Path, dst: Path, nodes: list[str], model: onnx.ModelProto, weight_bits: int = 8) -> None:
    """quantize_dynamic on exactly `nodes` (MatMuls and/or the table's Gather): per-channel int8 weights, 7-bit
    (reduce_range) for a CPU whose int8 GEMM saturates (engine.core.cpu); the table's uint8 is never reduced."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = sorted({node.op_type for node in model.graph.node if node.name in set(nodes)})
    others = [name for name in _all_of(model, tuple(types)) if name not in set(nodes)]
    quantize_dynamic(src, dst, op_types_to_quantize=types, per_channel=True, reduce_range=weight_bits == 7,
                     weight_type=QuantType.QInt8, nodes_to_quantize=nodes, nodes_to_exclude=others,
                     extra_options={"MatMulConstBOnly": True})


def own_inputs(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """An Identity in front of each listed MatMul, so that its input is a tensor of its own.

    quantize_static puts one QuantizeLinear/DequantizeLinear pair on an activation *tensor* and rewires
    every consumer to it, so a LayerNorm output feeding a static int8 layer would reach the residual Add
    quantized too. The plan quantizes the layer's input only; no ORT option does that for a tensor with a
    single quantized consumer (DedicatedQDQPair needs several), hence this one small edit. ORT drops the
    Identity when it loads the model, after the pair has been placed."""
    chosen = set(nodes)
    edited = []
    for node in model.graph.node:
        if node.name in chosen:
            own = f"{node.input[0]}::{node.name}"
            edited.append(onnx.helper.make_node("Identity", [node.input[0]], [own], name=f"{node.name}/input"))
            node.input[0] = own
        edited.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(edited)
    return model


def int8_static(src: Path, dst: Path, nodes: list[str], model: onnx.ModelProto, feeds: list[dict],
                weight_bits: int = 8) -> None:
    """quantize_static (QDQ, MinMax calibration on `feeds`) on exactly `nodes`: uint8 activations with a
    calibrated per-tensor scale on the MatMul input (reduce_range leaves them 8-bit), int8 per-channel
    weights (7-bit with reduce_range), the MatMul output left float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    others = [name for name in _all_of(model, ("MatMul",)) if name not in set(nodes)]
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=nodes, nodes_to_exclude=others,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"], "MatMulConstBOnly": True})


def int4_weight_only(model: onnx.ModelProto, nodes: list[str], block_size: int) -> onnx.ModelProto:
    """MatMulNBitsQuantizer on exactly `nodes`: MatMulNBits (and GatherBlockQuantized for the table)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    chosen = set(nodes)
    types = tuple(sorted({node.op_type for node in model.graph.node if node.name in chosen}))
    others = [name for name in _all_of(model, types) if name not in chosen]
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=None,
                                     nodes_to_exclude=others, op_types_to_quantize=types,
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    return quantizer.model.model


def optimize_offline(src: Path, dst: Path) -> None:
    """`src` through ONNX Runtime's basic graph optimizations (constant folding, redundant nodes removed:
    what every ORT session does on load, whatever the provider), saved as a plain ONNX file without the
    inferred shapes of intermediate tensors, which ORT infers again on load. The deployed file is smaller
    and loads faster; its numerics are those of the graph ORT would have run anyway."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(dst))
    model.graph.ClearField("value_info")
    onnx.save(model, str(dst))


# ---- reading an exported graph back ---------------------------------------------------------
_SUFFIXES = ("", "_quant", "_Q4")  # quantize_dynamic renames a MatMul `<name>_quant`, MatMulNBitsQuantizer `<name>_Q4`


def _renamed(nodes: dict[str, onnx.NodeProto], name: str) -> onnx.NodeProto:
    for suffix in _SUFFIXES:
        if name + suffix in nodes:
            return nodes[name + suffix]
    raise GraphError(f"node {name} is gone from the quantized graph")


def layer_ops(model: onnx.ModelProto, mapping: dict[str, list[str]]) -> dict[str, str]:
    """What each layer became in the file: the op reading its weight and that weight's element type."""
    nodes = {node.name: node for node in model.graph.node}
    producers = {out: node for node in model.graph.node for out in node.output}
    types = {init.name: onnx.TensorProto.DataType.Name(init.data_type).lower() for init in model.graph.initializer}
    ops = {}
    for layer, names in mapping.items():
        node = _renamed(nodes, names[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[0] if node.op_type.startswith("Gather") else node.input[1]
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            ops[layer] = f"{node.op_type} ({attrs.get('bits', 4)}-bit, block {attrs['block_size']})"
        elif weight in producers and producers[weight].op_type == "DequantizeLinear":  # QDQ
            ops[layer] = f"DequantizeLinear + {node.op_type} ({types.get(producers[weight].input[0], '?')} weights)"
        elif node.op_type == "MatMulInteger":
            ops[layer] = f"DynamicQuantizeLinear + MatMulInteger ({types.get(weight, '?')} weights)"
        else:
            ops[layer] = f"{node.op_type} ({types.get(weight, '?')} weights)"
    return ops


def low_precision_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Elements of the weight matrices stored below float32 (int8, uint8, int4, float16, ...), by element
    type (scales and zero points aside: ORT shares identical ones)."""
    T = onnx.TensorProto
    totals: dict[str, int] = {}
    for init in model.graph.initializer:
        if len(init.dims) >= 2 and init.data_type in (T.INT8, T.UINT8, T.FLOAT16, T.BFLOAT16, T.INT4, T.UINT4):
            kind = T.DataType.Name(init.data_type).lower()
            totals[kind] = totals.get(kind, 0) + int(np.prod(init.dims))
    return totals


def check_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """The offline optimizations kept every low-precision weight as it was: they may fuse an FP32 MatMul
    and its Add into a Gemm, but must not fold a dequantized weight back into a float constant."""
    old, new = low_precision_weights(before), low_precision_weights(after)
    if old != new:
        raise GraphError(f"ORT's offline optimizations changed the stored low-precision weights ({old} -> {new})")


def static_activation_params(model: onnx.ModelProto, mapping: dict[str, list[str]]) -> dict[str, tuple[float, int]]:
    """The calibrated (scale, zero point) of each QDQ-quantized layer input, read from the graph."""
    nodes = {node.name: node for node in model.graph.node}
    producers = {out: node for node in model.graph.node for out in node.output}
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    params = {}
    for layer, names in mapping.items():
        node = nodes.get(names[0])
        source = producers.get(node.input[0]) if node is not None and node.op_type == "MatMul" else None
        if source is not None and source.op_type == "DequantizeLinear":
            params[layer] = (float(values[source.input[1]]), int(values[source.input[2]]))
    return params
