"""Static int8 with the engine's activation scales: quantize_static (QDQ) whose activation (scale, zero point)
on each quantized MatMul's input is the one the engine chose, not the one ORT's calibration would.

ORT's `TensorQuantOverrides` option takes, per tensor, [{"scale": float32, "zero_point": uint8}]; the QDQ
quantizer then writes exactly those into the QuantizeLinear/DequantizeLinear pair (calc_quant_params uses them
as given and ignores the calibrated range). ORT still calibrates every tensor it quantizes, so it still needs
feeds; only the overridden ranges are not used. This is how the engine's percentile, entropy and mse ranges
(engine.quant.calibrators) reach the graph: ORT's own histogram calibrators cannot take one feed per sentence
of different lengths in one run, and it has no MSE calibrator.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx

from engine.runtime.onnx_graph import GraphError

UINT8_MAX = 255


def activation_overrides(model: onnx.ModelProto, nodes: list[str],
                         input_qparams: dict[str, tuple[float, int]]) -> dict[str, list[dict]]:
    """TensorQuantOverrides giving each listed MatMul's input tensor (its own, see onnx_graph.own_inputs) the
    engine's (scale, zero point); GraphError when one is missing or not a uint8 activation's."""
    inputs = {node.name: node.input[0] for node in model.graph.node if node.op_type == "MatMul"}
    overrides = {}
    for name in nodes:
        if name not in inputs:
            raise GraphError(f"no MatMul named {name!r} in the graph")
        if name not in input_qparams:
            raise GraphError(f"no activation scale given for {name!r}")
        scale, zero = input_qparams[name]
        if not (math.isfinite(scale) and scale > 0) or zero != int(zero) or not 0 <= zero <= UINT8_MAX:
            raise GraphError(f"{name}: ({scale}, {zero}) is not a uint8 activation's (scale > 0, zero point 0..255)")
        overrides[inputs[name]] = [{"scale": np.array(scale, dtype=np.float32),
                                    "zero_point": np.array(zero, dtype=np.uint8)}]
    return overrides


def int8_static_exact(src: Path, dst: Path, nodes: list[str], model: onnx.ModelProto, feeds: list[dict],
                      weight_bits: int, input_qparams: dict[str, tuple[float, int]]) -> None:
    """onnx_graph.int8_static with its options (QDQ, uint8 activations, int8 per-channel weights, 7-bit with
    reduce_range, the MatMul output left float), but every listed MatMul's input quantized with
    `input_qparams[node name]` = (scale, zero point). `model` is the graph at `src` (after own_inputs)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    overrides = activation_overrides(model, nodes, input_qparams)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    chosen = set(nodes)
    others = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in chosen]
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_quantize=nodes, nodes_to_exclude=others,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"], "MatMulConstBOnly": True,
                                   "TensorQuantOverrides": overrides})
