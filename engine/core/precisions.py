"""The precision registry: one entry per precision says how each runtime computes it (to simulate it
exactly) and how many bytes it takes. Adding a precision, or a runtime's numerics for one, is an entry here;
the module that runs it for real on each device is registered apart, in engine.kernels.

Simulated values are the exact values the real kernel computes with, so that simulated accuracy is the
deployed accuracy (torch's int8 numbers are read from torch's own int8 modules, engine.core.torch_int8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.core import torch_int8
from engine.core.numerics import int4_round_trip, quantize_activation, static_qparams
from engine.core.ort_numerics import (ort_int4_table, ort_int4_weight, ort_int8_integers, ort_int8_weight,
                                      ort_quantize_activation, ort_static_qparams, ort_uint8_table)
from engine.core.qmodules import FLOAT_DTYPES
from engine.core.vocabulary import Runtime

Tensor = torch.Tensor


@dataclass(frozen=True)
class Numerics:
    """How one runtime computes a precision. Weights use the Linear convention [out, in]."""

    weight: Callable[[Tensor, int], Tensor]  # (Linear weight, group size) -> the values computed with
    table: Callable[[Tensor, int], Tensor]  # (embedding table, group size) -> the values looked up
    integers: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # integer kernels: (integers, row scales)
    activation: Callable = quantize_activation  # (x, scheme, reduce_range, static) -> (q - zero point, scale)
    static: Callable = static_qparams  # (calibrated low, high, reduce_range) -> (scale, zero point)
    reduce_range: bool = True  # 7-bit activations (torch's x86 kernels)


@dataclass(frozen=True)
class Precision:
    """How one precision is simulated per runtime, and sized."""

    name: str
    description: str
    quantizes_activations: bool
    numerics: dict[str, Numerics]
    weight_bytes: Callable[[int, int, int], int]  # (rows, cols, group size) -> bytes of weights and their scales
    unsupported: dict[str, str] = field(default_factory=dict)  # runtime -> why it cannot run this precision
    # runtime -> its numerics with 7-bit int8 weights (ORT's reduce_range, for CPUs whose int8 GEMM saturates)
    reduced: dict[str, Numerics] = field(default_factory=dict)

    def numerics_for(self, runtime: str, int8_weight_bits: int = 8) -> Numerics:
        """How `runtime` computes this precision with weights of that many bits (Plan.int8_weight_bits)."""
        if int8_weight_bits != 8 and runtime in self.reduced:
            return self.reduced[runtime]
        return self.numerics[runtime]

    def layer_bytes(self, rows: int, cols: int, bias_numel: int, group_size: int) -> int:
        """Bytes of one layer in the real format: weights, scales and offsets, and a float32 bias."""
        return self.weight_bytes(rows, cols, group_size) + 4 * bias_numel


def _same(values: Tensor, _group: int) -> Tensor:
    return values


def _cast(name: str, unsupported: dict[str, str] | None = None) -> Precision:
    dtype = FLOAT_DTYPES[name]
    rounded = Numerics(lambda weight, _group: weight.to(dtype).float(), lambda table, _group: table.to(dtype).float())
    numerics = {runtime: rounded for runtime in Runtime if runtime not in (unsupported or {})}
    return Precision(
        name, f"{name.upper()}: weights, inputs and matmul in {str(dtype).replace('torch.', '')}", False, numerics,
        lambda rows, cols, _group: 2 * rows * cols, unsupported or {})


def _int4_bytes(rows: int, cols: int, group: int) -> int:
    return rows * math.ceil(cols / 2) + rows * math.ceil(cols / group) * 8  # nibbles, fp32 scale and min per group


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "FP32, the reference", False,
              {runtime: Numerics(_same, _same) for runtime in Runtime}, lambda rows, cols, _group: 4 * rows * cols),
    _cast("fp16"),
    _cast("bf16", {Runtime.ONNXRUNTIME: "ONNX Runtime's CPU provider has no bfloat16 MatMul kernel (use fp16, int8 or "
                                          "int4)"}),
    Precision("int8", "INT8 (W8A8): int8 weights per output channel, int8 activations per tensor at run time", True,
              {Runtime.TORCH: Numerics(lambda weight, _group: torch_int8.int8_linear_weight(weight),
                                       lambda table, _group: torch_int8.int8_embedding_table(table),
                                       torch_int8.int8_linear_integers),
               Runtime.ONNXRUNTIME: Numerics(ort_int8_weight, ort_uint8_table, ort_int8_integers,
                                             ort_quantize_activation, ort_static_qparams, reduce_range=False)},
              lambda rows, cols, _group: rows * cols + 8 * rows,
              reduced={Runtime.ONNXRUNTIME: Numerics(lambda weight, _group: ort_int8_weight(weight, weight_bits=7),
                                                     ort_uint8_table, lambda weight: ort_int8_integers(weight, 7),
                                                     ort_quantize_activation, ort_static_qparams, reduce_range=False)}),
    Precision("int4", "INT4 weight-only, group-wise asymmetric", False,
              {Runtime.TORCH: Numerics(int4_round_trip, int4_round_trip),
               Runtime.ONNXRUNTIME: Numerics(ort_int4_weight, ort_int4_table)},
              _int4_bytes),
)}
PRECISION_NAMES = tuple(PRECISIONS)
