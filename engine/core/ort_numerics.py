"""ONNX Runtime's quantization numerics, as torch functions: how its quantization tools write the weights
and how its CPU kernels quantize activations, so that a simulated ORT plan is the exported model.

- int8 weights (quantize_dynamic / quantize_static, per_channel=True, QInt8): per output channel,
  symmetric, q in [-127, 127], scale = float32(2 * absmax / 254) computed in float64, q = round-half-even(w / scale);
  with reduce_range (7-bit weights, for CPUs whose int8 GEMM saturates: engine.core.cpu) q in [-64, 64] and
  scale = float32(2 * absmax / 128).
- int8 activations (DynamicQuantizeLinear): uint8 per tensor over [min(0, x), max(0, x)], the full 8 bits,
  scale = (hi - lo) / 255 in float32 (1 when hi == lo), zero point = round-half-even(-lo / scale),
  q = clamp(round-half-even(x / scale) + zp, 0, 255). Static QDQ: the same with a calibrated (scale, zp),
  chosen by ORT's MinMax calibration from the range [min(0, lo), max(0, hi)].
- int4 weights (MatMulNBits, asymmetric): blocks along the input dimension; lo = min(block, 0),
  hi = max(block, 0), scale = (hi - lo) / 15, zp = roundf(-lo / scale), q = clamp(roundf(w / scale + zp), 0, 15),
  roundf rounding halves away from zero (MLAS, C++); a partial last block is padded with zeros.
- int8 embedding table (quantize_dynamic's Gather): uint8 per tensor, asymmetric, scale from float64.
- int4 embedding table (GatherBlockQuantized): blocks along the embedding dimension, numpy's round-half-even.

Where torch's x86 kernel differs: 7-bit activations (`reduce_range`) with fbgemm's rounding
round(x * (1/s) + zp), weights scaled by absmax / 127.5 over [-128, 127], an int8 embedding table per row
(float scale and offset per row) instead of one uint8 scale for the whole table, and int4 groups over each
group's own [min, max] with a float offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.core.vocabulary import ActScheme

_TINY = torch.finfo(torch.float32).tiny


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds halves to even)."""
    trunc = x.trunc()
    return torch.where((x - trunc).abs() == 0.5, trunc + x.sign(), torch.round(x))


def ort_int8_integers(weight: torch.Tensor, weight_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values as float, per-output-channel scales), as quantize_dynamic(per_channel=True) writes them:
    8-bit, or 7-bit with reduce_range ([-64, 64], ORT's reduced symmetric range)."""
    qmax = {8: 127, 7: 64}[weight_bits]
    w = weight.detach().float()
    absmax = torch.maximum(-w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)).double()
    scale64 = 2 * absmax / (2.0 * qmax)
    scale = torch.where(scale64 < _TINY, torch.ones_like(scale64), scale64).float()
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax), scale


def ort_int8_weight(weight: torch.Tensor, _group: int = 0, weight_bits: int = 8) -> torch.Tensor:
    q, scale = ort_int8_integers(weight, weight_bits)
    return q * scale[:, None]


def ort_int4_weight(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """MatMulNBits 4-bit asymmetric blocks along the input dimension, as MLAS's block quantizer computes them."""
    w = weight.detach().float()
    rows, cols = w.shape
    blocks = -(-cols // block_size)
    padded = F.pad(w, (0, blocks * block_size - cols)).reshape(rows, blocks, block_size)
    low = padded.amin(-1, keepdim=True).clamp(max=0)
    high = padded.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / 15.0
    zero_fp = torch.where(scale != 0, 0.0 - low / scale, low)
    zero = torch.where(zero_fp < 0, 0.0, torch.where(zero_fp > 15, 15.0, round_half_away(zero_fp)))
    reciprocal = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.clamp(round_half_away(padded * reciprocal + zero), 0, 15)
    return ((q - zero) * scale).reshape(rows, -1)[:, :cols]


def ort_uint8_table(table: torch.Tensor, _group: int = 0) -> torch.Tensor:
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


def ort_static_qparams(low: torch.Tensor, high: torch.Tensor, _reduce_range: bool = False) -> tuple[float, int]:
    """ORT's MinMax calibration: uint8 over [min(0, low), max(0, high)], scale = range / 255."""
    rmin, rmax = min(float(low.min()), 0.0), max(float(high.max()), 0.0)
    scale = (rmax - rmin) / 255.0 if rmax > rmin else 1.0
    return float(torch.tensor(scale, dtype=torch.float32)), int(round(-rmin / scale))


def ort_quantize_activation(x: torch.Tensor, scheme: str, _reduce_range: bool = False,
                            static_scale: tuple[float, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q - zero point as float integers, scale): DynamicQuantizeLinear, or QuantizeLinear with a calibrated
    (scale, zero point). ORT has no per-token dynamic int8 MatMul."""
    x32 = x.float()
    if scheme == ActScheme.STATIC:
        scale, zero = static_scale
        scale_t = torch.tensor(scale, dtype=torch.float32, device=x.device)
        return torch.clamp(torch.round(x32 / scale_t) + zero, 0, 255) - zero, scale_t
    if scheme != ActScheme.DYNAMIC:
        raise ValueError(f"ONNX Runtime has no {scheme!r} int8 activation scheme")
    low, high = x32.min().clamp(max=0), x32.max().clamp(min=0)
    scale = torch.where(high == low, torch.ones_like(high), (high - low) / 255.0)
    zero = torch.round(torch.clamp(0.0 - low / scale, 0, 255))
    return torch.clamp(torch.round(x32 / scale) + zero, 0, 255) - zero, scale
