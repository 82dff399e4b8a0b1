"""Quantize-dequantize arithmetic, exactly as the kernels that run it round.

- int8 activations (W8A8): asymmetric uint8 per tensor with the range torch's x86 dynamic kernel
  uses (7 bits, `reduce_range`), the kernel's own rounding (zero point added before rounding);
  per token (one range per row); or static (a calibrated per-tensor scale and zero point).
- int4 weights: asymmetric, group-wise along the input dimension: w ~ q * scale + min, q in 0..15,
  so every element is within half a step of its original; stored two values a byte.
- SQNR in dB, the one definition every proxy and view uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.core.vocabulary import ActScheme


def int8_reduce_range() -> bool:
    """Whether the CPU's dynamic int8 kernel uses 7-bit activations (fbgemm, x86 and onednn do)."""
    return torch.backends.quantized.engine in ("fbgemm", "x86", "onednn")


def activation_qmax(reduce_range: bool) -> int:
    return 127 if reduce_range else 255


def static_qparams(low: torch.Tensor, high: torch.Tensor, reduce_range: bool) -> tuple[float, int]:
    """The per-tensor (scale, zero point) torch's observers choose for values in [min(low), max(high)]."""
    scale, zero = torch._choose_qparams_per_tensor(torch.stack([low.min(), high.max()]).float(), reduce_range)
    return float(scale), int(zero)


def quantize_activation(x: torch.Tensor, scheme: str, reduce_range: bool,
                        static_scale: tuple[float, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q - zero point as float integers, scale) of the activations as the int8 kernel quantizes them.

    Asymmetric uint8: per tensor at run time (torch's dynamic kernel, its own rounding: round(x * (1/scale)
    + zero), the zero point added before rounding), per tensor from calibration ("static"), or per token
    (one range per row, including 0, as the kernels do). `scale` broadcasts against the last dimension.
    """
    qmax = activation_qmax(reduce_range)
    x32 = x.float().contiguous()
    if scheme == ActScheme.DYNAMIC:
        scale, zero = torch._choose_qparams_per_tensor(x32, reduce_range)
        q = torch.quantize_per_tensor(x32, scale, zero, torch.quint8).int_repr().float()
        return q - zero, torch.tensor(scale, dtype=torch.float32, device=x.device)
    if scheme == ActScheme.STATIC:
        scale, zero = static_scale
        q = torch.clamp(torch.round(x32 / scale) + zero, 0, qmax)
        return q - zero, torch.tensor(scale, dtype=torch.float32, device=x.device)
    low = x32.amin(-1, keepdim=True).clamp(max=0)
    high = x32.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / qmax).clamp(min=1e-8)
    zero = torch.clamp(torch.round(-low / scale), 0, qmax)
    return torch.clamp(torch.round(x32 / scale) + zero, 0, qmax) - zero, scale


def fake_quant_activation(x: torch.Tensor, scheme: str, reduce_range: bool,
                          static_scale: tuple[float, int] | None = None) -> torch.Tensor:
    """Activations quantize-dequantized as the int8 kernel sees them."""
    q, scale = quantize_activation(x, scheme, reduce_range, static_scale)
    return (q * scale).to(x.dtype)


def int4_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q in 0..15 as uint8 [rows, cols], scale and min [rows, groups]) along the last dimension."""
    rows, cols = weight.shape
    groups = -(-cols // group_size)
    weight = weight.detach().float()
    # A partial last group is padded with its row's last value, which lies inside that group's range:
    # zero padding would widen the range of a group whose elements all share one sign.
    padded = torch.cat((weight, weight[:, -1:].expand(rows, groups * group_size - cols)), dim=1)
    padded = padded.reshape(rows, groups, group_size)
    low = padded.amin(-1, keepdim=True)
    high = padded.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-10)
    q = torch.clamp(torch.round((padded - low) / scale), 0, 15).to(torch.uint8)
    return q.reshape(rows, -1)[:, :cols].contiguous(), scale.squeeze(-1), low.squeeze(-1)


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int) -> torch.Tensor:
    cols = q.shape[-1]

    def per_element(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(group_size, dim=-1)[..., :cols]

    return q.float() * per_element(scale) + per_element(low)


def int4_round_trip(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    return int4_dequantize(*int4_quantize(weight, group_size), group_size)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values a byte along the last dimension (odd widths padded with a zero)."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :cols]


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise): +inf for an exact copy, -inf for a lost signal (zero signal, some noise)."""
    if noise_power == 0.0:
        return math.inf
    return 10.0 * math.log10(signal_power / noise_power) if signal_power > 0 else -math.inf
