"""INT4 weight methods: how a Linear's weights become int4 integers, on one runtime's exact int4 grid.

Each method returns the integers themselves (`Int4Weights`), computed once here and later written verbatim
into the export (ONNX MatMulNBits, engine.runtime.onnx_int4) or the torch module (Int4Linear.from_integers),
so the simulated layer, the deployed graph and the real torch kernel compute the same weights.

- RTN: round to nearest, the precision's own quantizer (engine.core.numerics / ort_numerics).
- GPTQ (Frantar et al., 2022): quantize one input column at a time and push its error onto the columns not
  yet quantized through the Cholesky factor of the damped inverse Hessian of the layer's calibration inputs,
  in lazy blocks of 128 columns. Needs H = X^T X / n.
- HQQ (Badri & Shaji, 2023): keep the min/max scale, optimise each group's zero point by half-quadratic
  splitting of an lp (p = 0.7) weight-error norm. No calibration data. ONNX Runtime's implementation.

The two grids. torch (int4_quantize): a group's own [min, max], w = q * scale + offset, offset = the group
min (any float). ONNX Runtime (MatMulNBits, MLAS's quantizer): the range widened to include 0,
w = (q - offset) * scale, offset = the zero point: an integer for RTN and GPTQ, fractional for HQQ
(MatMulNBits also accepts float zero points of the scales' type; tests/runtime/test_onnx_int4.py runs one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.core.errors import EngineError
from engine.core.numerics import int4_dequantize, int4_quantize
from engine.core.ort_numerics import round_half_away
from engine.core.vocabulary import Runtime

_LAZY_BLOCK = 128  # GPTQ's lazy batch: columns whose updates are applied to the rest of the matrix at once
_QMAX = 15


@dataclass(frozen=True)
class Int4Weights:
    """A Linear's int4 weights [rows = out, cols = in], groups of `group_size` along the input dimension.

    torch's grid: w = q * scale + offset (offset: the group's float minimum, as int4_dequantize).
    ONNX Runtime's grid: w = (q - offset) * scale (offset: the zero point, MatMulNBits' zero_points).
    """

    q: torch.Tensor  # uint8 [rows, cols], 0..15
    scale: torch.Tensor  # float32 [rows, groups]
    offset: torch.Tensor  # float32 [rows, groups]
    group_size: int
    runtime: Runtime

    def values(self) -> torch.Tensor:
        """The float32 weight [rows, cols] the runtime's kernel computes with."""
        if self.runtime == Runtime.TORCH:
            return int4_dequantize(self.q, self.scale, self.offset, self.group_size)
        cols = self.q.shape[1]

        def per_element(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(self.group_size, dim=1)[:, :cols]

        return (self.q.float() - per_element(self.offset)) * per_element(self.scale)


def _grid(block: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) of each group, over the last dimension of float32 `block` [..., group]."""
    if runtime == Runtime.TORCH:  # int4_quantize's arithmetic
        low, high = block.amin(-1), block.amax(-1)
        return ((high - low) / _QMAX).clamp(min=1e-10), low
    # MLAS's block quantizer (ort_int4_weight's arithmetic): the range includes 0, the zero point rounds as roundf
    low, high = block.amin(-1).clamp(max=0), block.amax(-1).clamp(min=0)
    scale = (high - low) / float(_QMAX)
    zero_fp = torch.where(scale != 0, 0.0 - low / scale, low)
    zero = torch.where(zero_fp < 0, 0.0, torch.where(zero_fp > _QMAX, float(_QMAX), round_half_away(zero_fp)))
    return scale, zero


def _integers(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """q in 0..15 (as float) of float32 `w`, with `scale`, `offset` broadcasting against it."""
    if runtime == Runtime.TORCH:
        return torch.clamp(torch.round((w - offset) / scale), 0, _QMAX)
    reciprocal = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.clamp(round_half_away(w * reciprocal + offset), 0, _QMAX)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return q * scale + offset if runtime == Runtime.TORCH else (q - offset) * scale


def _check(weight: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    if weight.dim() != 2:
        raise EngineError(f"int4 weights must be a matrix [out, in], got shape {tuple(weight.shape)}")
    if group_size < 1:
        raise EngineError(f"int4 group size must be a positive integer, got {group_size}")
    rows, cols = weight.shape
    return rows, cols, -(-cols // group_size)


def rtn(weight: torch.Tensor, group_size: int, runtime: Runtime) -> Int4Weights:
    """Round to nearest: the runtime's own int4 quantizer, as integers (values() is bitwise the registry's)."""
    rows, cols, groups = _check(weight, group_size)
    runtime = Runtime(runtime)
    if runtime == Runtime.TORCH:
        q, scale, low = int4_quantize(weight, group_size)
        return Int4Weights(q, scale, low, group_size, runtime)
    # MatMulNBits pads a partial last block with zeros, which lie inside its range (it includes 0)
    padded = F.pad(weight.detach().float(), (0, groups * group_size - cols)).reshape(rows, groups, group_size)
    scale, zero = _grid(padded, runtime)
    q = _integers(padded, scale[..., None], zero[..., None], runtime)
    return Int4Weights(q.reshape(rows, -1)[:, :cols].to(torch.uint8).contiguous(), scale, zero, group_size, runtime)


def hessian_from(inputs: torch.Tensor) -> torch.Tensor:
    """H = X^T X / n in float64 from a layer's inputs [..., in] (every leading index one sample)."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
    return x.T @ x / max(x.shape[0], 1)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so that inverse = U^T U)."""
    dampened = hessian + damp * torch.diagonal(hessian).mean() * torch.eye(len(hessian), dtype=hessian.dtype)
    lower, info = torch.linalg.cholesky_ex(dampened)
    if info.item() != 0:
        raise EngineError(f"GPTQ: the calibration Hessian is not positive definite with damp={damp}; "
                          "raise damp or calibrate on more sentences")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, runtime: Runtime, damp: float = 0.01,
         act_order: bool = False) -> Int4Weights:
    """GPTQ's integers for `weight` [out, in] given H = X^T X / n [in, in] of the layer's calibration inputs.

    Errors propagate in float64. Without act_order, a group's (scale, offset) is chosen when the algorithm
    reaches the group's first column, from the weights as updated by every column quantized so far. The
    reference code (IST-DASLab's gptq.py, AutoGPTQ) reads them from the copy taken at the start of the lazy
    block, which lags behind by the errors of that block's earlier columns; here they are the current
    weights, so the result is the sequential algorithm's whatever the group size (a test checks so).
    With act_order, columns go in decreasing diag(H) order, and every group's grid is fixed up front from
    the original weights ("static groups"): the groups stay the contiguous blocks MatMulNBits stores.
    """
    rows, cols, groups = _check(weight, group_size)
    runtime = Runtime(runtime)
    if tuple(hessian.shape) != (cols, cols):
        raise EngineError(f"GPTQ: the Hessian must be [{cols}, {cols}] for a layer of {cols} inputs, "
                          f"got {tuple(hessian.shape)}")
    w = weight.detach().double().T.contiguous()  # [in, out]: a column of the weight is a contiguous row here
    h = hessian.detach().double().clone()
    dead = torch.nonzero(torch.diagonal(h) == 0).squeeze(1)
    h[dead, dead] = 1.0  # an input that is always 0: its weights contribute nothing, quantize them as 0
    w[dead] = 0.0
    scale = torch.zeros(rows, groups)
    offset = torch.zeros(rows, groups)
    order = torch.arange(cols)
    if act_order:
        for g in range(groups):
            scale[:, g], offset[:, g] = _grid(w[g * group_size:(g + 1) * group_size].T.float(), runtime)
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[order], h[order][:, order]
    factor = _inverse_hessian_factor(h, damp)
    q = torch.zeros(cols, rows)
    for start in range(0, cols, _LAZY_BLOCK):
        end = min(start + _LAZY_BLOCK, cols)
        block = w[start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            g = int(order[column]) // group_size
            if not act_order and column % group_size == 0:
                # the group's current weights: its columns in this block, and those beyond it with this block's
                # errors so far applied (the lazy update applies them only at the block's end)
                beyond = w[end:column + group_size] - factor[start:column, end:column + group_size].T @ errors[:i]
                current = torch.cat((block[i:i + group_size], beyond))
                scale[:, g], offset[:, g] = _grid(current.T.float(), runtime)
            q[column] = _integers(block[i].float(), scale[:, g], offset[:, g], runtime)
            dequantized = _dequantize(q[column], scale[:, g], offset[:, g], runtime).double()
            error = (block[i] - dequantized) / factor[column, column]
            block[i:].addr_(factor[column, column:end], error, alpha=-1)
            errors[i] = error
        w[end:] -= factor[start:end, end:].T @ errors
    q = q[torch.argsort(order)].T
    return Int4Weights(q.to(torch.uint8).contiguous(), scale, offset, group_size, runtime)


def hqq(weight: torch.Tensor, group_size: int, runtime: Runtime) -> Int4Weights:
    """HQQ's integers: ONNX Runtime's HQQWeightOnlyQuantizer (min/max scale, optimised float zero point).

    HQQ quantizes q = round(w / scale + zero), w ~ (q - zero) * scale: ONNX Runtime's grid as it is, with a
    fractional zero point. On torch's grid the offset is float32(-zero * scale), so values() (what Int4Linear
    computes, q * scale + offset) differs from (q - zero) * scale by the rounding of that one product: a few
    float32 ulps of the group's largest value. A partial last group is padded with zeros, as HQQ pads it.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    rows, cols, groups = _check(weight, group_size)
    runtime = Runtime(runtime)
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=group_size, bits=4))
    # axis 1: groups along the input dimension of [out, in], as ONNX Runtime calls it on MatMul's B transposed
    q, scale, zero = quantizer.quantize_internal(weight.detach().float().cpu(), bits=4, group_size=group_size, axis=1)
    q = q[:, :cols].to(torch.uint8).contiguous()
    scale, zero = scale.float().reshape(rows, groups), zero.float().reshape(rows, groups)
    offset = zero if runtime == Runtime.ONNXRUNTIME else -zero * scale
    return Int4Weights(q, scale.contiguous(), offset.contiguous(), group_size, runtime)
