"""ONNX Runtime's quantization numerics as plain torch functions: the simulated path of an ORT plan.

Each `ort_*` function takes a float tensor (a weight in the Linear convention [out, in], an embedding
table [vocab, dim] or an activation) and returns the quantize-dequantized float tensor that ORT computes
with: weights as ORT's own quantization tools write them, activations as its CPU kernels quantize them
at run time. A model whose layers use them agrees with the exported ORT model (tests/test_onnx.py).

- int8 weights (quantize_dynamic / quantize_static, per_channel=True, QInt8): per output channel,
  symmetric, q in [-127, 127], scale = float32(2 * absmax / 254) computed in float64, q = round-half-even(w / scale).
- int8 activations (DynamicQuantizeLinear, fused or not): uint8 per tensor over [min(0, x), max(0, x)],
  scale = (hi - lo) / 255 in float32 (1 when hi == lo), zero point = round-half-even(-lo / scale),
  q = clamp(round-half-even(x / scale) + zp, 0, 255). Static QDQ: the same with the calibrated (scale, zp).
- int4 weights (MatMulNBits via MatMulNBitsQuantizer, asymmetric): blocks of `block_size` along the
  input dimension; lo = min(block, 0), hi = max(block, 0), scale = (hi - lo) / 15, zp = roundf(-lo / scale),
  q = clamp(roundf(w * (1 / scale) + zp), 0, 15), where roundf rounds halves away from zero (MLAS, C++).
- int8 embedding table (quantize_dynamic's Gather): uint8 per tensor, asymmetric, scale from float64.
- int4 embedding table (GatherBlockQuantized): blocks along the embedding dimension, numpy's round-half-even.
- fp16: the tensor rounded to half precision (ORT's float16 converter; x86 computes in fp32 after a cast).

Each function is bit-exact against ORT (tests/test_onnx.py). A whole int8 model cannot be: a per-tensor
activation scale turns ulp-level differences in the float parts (LayerNorm, softmax, GELU, summation
order) into whole quantization steps. On the embedded model's 1,056 test sentences, the float32 and
float64 products of the same fake-quantized tensors disagree on 5-7 predictions, and ORT with graph
optimizations on and off disagrees with itself on 2-3; OrtSimLinear therefore multiplies int8 layers
in float64 (the closest float to ORT's exact integer accumulation) and agrees with ORT on 99.5-99.7%.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.quantize import shallow_copy

_TINY = torch.finfo(torch.float32).tiny


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds halves to even)."""
    trunc = x.trunc()
    return torch.where((x - trunc).abs() == 0.5, trunc + x.sign(), torch.round(x))


# ---- weights --------------------------------------------------------------------------------
def ort_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel symmetric int8 [-127, 127], as quantize_dynamic(per_channel=True) writes it."""
    w = weight.detach().float()
    low = w.amin(1, keepdim=True).clamp(max=0)
    high = w.amax(1, keepdim=True).clamp(min=0)
    absmax = torch.maximum(-low, high).double()
    scale64 = 2 * absmax / 254.0
    scale = torch.where(scale64 < _TINY, torch.ones_like(scale64), scale64).float()
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def ort_int4_weight(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """MatMulNBits 4-bit asymmetric blocks along the input dimension, as MLAS's block quantizer computes them."""
    w = weight.detach().float()
    rows, cols = w.shape
    blocks = -(-cols // block_size)
    padded = F.pad(w, (0, blocks * block_size - cols)).reshape(rows, blocks, block_size)  # ORT pads with zeros
    low = padded.amin(-1, keepdim=True).clamp(max=0)
    high = padded.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / 15.0
    zero_fp = torch.where(scale != 0, 0.0 - low / scale, low)
    zero = torch.where(zero_fp < 0, 0.0, torch.where(zero_fp > 15, 15.0, round_half_away(zero_fp)))
    reciprocal = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.clamp(round_half_away(padded * reciprocal + zero), 0, 15)
    return ((q - zero) * scale).reshape(rows, -1)[:, :cols]


def ort_uint8_table(table: torch.Tensor) -> torch.Tensor:
    """The embedding table as quantize_dynamic quantizes a Gather: uint8 per tensor, asymmetric."""
    t = table.detach().float()
    low, high = t.min().clamp(max=0), t.max().clamp(min=0)
    scale64 = (high.double() - low.double()) / 255.0
    if scale64 < _TINY:
        return torch.clamp(torch.round(t), 0, 255)
    zero = torch.round(0.0 - low.double() / scale64).clamp(0, 255).float()
    scale = scale64.float()
    return (torch.clamp(torch.round(t / scale) + zero, 0, 255) - zero) * scale


def ort_int4_table(table: torch.Tensor, block_size: int) -> torch.Tensor:
    """GatherBlockQuantized 4-bit asymmetric blocks along the embedding dimension (ORT's numpy quantizer)."""
    t = table.detach().float()
    out = torch.empty_like(t)
    for start in range(0, t.shape[1], block_size):  # a partial last block stays short, as in ORT
        block = t[:, start:start + block_size]
        low = block.amin(1, keepdim=True).clamp(max=0)
        high = block.amax(1, keepdim=True).clamp(min=0)
        scale = (high - low) / 15.0
        zero = torch.where(scale == 0, 8.0, torch.round(-low / scale)).clamp(0, 15)
        q = torch.where(scale == 0, 8.0, torch.round(block / scale + zero)).clamp(0, 15)
        out[:, start:start + block_size] = (q - zero) * scale
    return out


def ort_fp16(x: torch.Tensor) -> torch.Tensor:
    """A tensor stored in half precision by ORT's float16 converter, read back as float32."""
    return x.detach().half().float()


# ---- activations ----------------------------------------------------------------------------
def ort_dynamic_uint8_activation(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: uint8 per tensor over [min(0, x), max(0, x)], round-half-even."""
    x32 = x.float()
    low, high = x32.min().clamp(max=0), x32.max().clamp(min=0)
    scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255.0)
    zero = torch.round(torch.clamp(0.0 - low / scale, 0, 255))
    return ((torch.clamp(torch.round(x32 / scale) + zero, 0, 255) - zero) * scale).to(x.dtype)


def ort_static_uint8_activation(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """QuantizeLinear/DequantizeLinear with a calibrated per-tensor uint8 (scale, zero point)."""
    x32 = x.float()
    scale_t = torch.tensor(scale, dtype=torch.float32)
    return ((torch.clamp(torch.round(x32 / scale_t) + zero_point, 0, 255) - zero_point) * scale_t).to(x.dtype)


# ---- a simulated model (used by the tests; the engine's precision registry will own this) -----------------
class OrtSimLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) computing with ORT's numerics: weight [out, in] already quantize-dequantized,
    the input fake-quantized first for int8 ("dynamic" or a static (scale, zp)), fp16 rounding for "fp16"."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act=None,
                 in_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act = act
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        integer = act == "dynamic" or isinstance(act, tuple)
        self.register_buffer("weight64", weight.double() if integer else None, persistent=False)
        self.register_buffer("in_scale", in_scale)  # SmoothQuant's explicit divisor, applied first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x / self.in_scale
        if self.act == "dynamic" or isinstance(self.act, tuple):
            x = ort_dynamic_uint8_activation(x) if self.act == "dynamic" else ort_static_uint8_activation(x, *self.act)
            # ORT accumulates the integer products exactly: float64 is the float product closest to that (float32
            # accumulation alone moves ~0.5% of int8 predictions, since a per-tensor scale amplifies tiny differences)
            y = F.linear(x.double(), self.weight64).to(x.dtype)
        elif self.act == "fp16":
            y = ort_fp16(F.linear(ort_fp16(x), self.weight))
        else:
            y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in the Linear convention [out, in] (GPT-2's Conv1D stores [in, out])."""
    weight = module.weight.detach().float()
    return weight.t().contiguous() if isinstance(module, Conv1D) else weight


def simulated_layer(module: nn.Module, precision: str, group_size: int, act=None) -> nn.Module:
    """The module that computes one layer at `precision` with ORT's numerics (`act`: "dynamic" or (scale, zp))."""
    if isinstance(module, nn.Embedding):
        table = module.weight.detach().float()
        new = {"int8": ort_uint8_table, "fp16": ort_fp16}.get(precision)
        table = ort_int4_table(table, group_size) if precision == "int4" else new(table) if new else table
        clone = copy.copy(module)  # keeps the class and its forward (e.g. a scaled embedding)
        clone._parameters = dict(module._parameters)  # its own dict, so the original keeps its weight
        clone.weight = nn.Parameter(table, requires_grad=False)
        return clone
    weight, bias, scale = _linear_weight(module), getattr(module, "bias", None), getattr(module, "in_scale", None)
    if precision == "int8":
        return OrtSimLinear(ort_int8_weight(weight), bias, act or "dynamic", scale)
    if precision == "int4":
        return OrtSimLinear(ort_int4_weight(weight, group_size), bias, None, scale)
    if precision == "fp16":
        return OrtSimLinear(ort_fp16(weight), bias, "fp16", scale)
    return OrtSimLinear(weight, bias, None, scale)


def simulate_plan(model: nn.Module, resolved: dict[str, str], group_size: int,
                  static_params: dict[str, tuple[float, int]] | None = None) -> nn.Module:
    """A copy of `model` whose layers compute with ORT's numerics; `model` itself is left unchanged.

    `resolved` maps layer names to precisions (Plan.resolve); `static_params` gives the calibrated
    (scale, zero point) of int8 layers exported with `act: static` (onnx_export.static_activation_params).
    """
    clone = shallow_copy(model)
    for name, precision in resolved.items():
        if precision == "fp32":
            continue
        act = (static_params or {}).get(name)
        replacement = simulated_layer(model.get_submodule(name), precision, group_size, act).requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent) if parent else clone, child, replacement)
    return clone.eval()
