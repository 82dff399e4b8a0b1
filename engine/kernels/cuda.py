"""The real kernels on NVIDIA GPUs: torchao's, and what runs where they cannot.

torchao is an optional GPU dependency imported only when a CUDA conversion runs (its import is slow and logs
the kernels this machine lacks):
- int8 Linear: `Int8DynamicActivationInt8WeightConfig` (cuBLAS int8 GEMM), the CPU numerics with one
  more activation bit; cuBLAS needs both dimensions to be multiples of 8, elsewhere the layer runs
  the CPU kernel's numerics in float on the GPU, and says so (`kernel_note`).
- int4 Linear: `Int4WeightOnlyConfig` in the tinygemm tile-packed format (bf16 activations, compute
  capability 8.0+, group size 32/64/128/256 dividing the input width); elsewhere the packed int4
  module unpacked per call, with the reason.
- int8 embedding: torch's quantized Embedding is CPU-only, so the same per-row uint8 table is kept
  on the GPU and only the looked-up rows are dequantized.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.core.qmodules import Int4Linear, Int8Embedding, SimLinear
from engine.core.torch_int8 import float_linear, int8_linear_weight, torch_int8_embedding
from engine.core.vocabulary import ActScheme

log = logging.getLogger(__name__)
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
_REPORTED: set[str] = set()


def _note(module: nn.Module, reason: str) -> nn.Module:
    """Mark a module that is not the fast kernel; each distinct reason is logged once per process."""
    module.kernel_note = reason
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        log.warning(reason)
    return module


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> nn.Module:
    """The int8 (W8A8) Linear on CUDA: torchao's kernel where cuBLAS can run it."""
    out_features, in_features = weight.shape
    if in_features % 8 or out_features % 8:
        simulated = SimLinear(int8_linear_weight(weight.cpu()).to(device),
                              None if bias is None else bias.float().to(device), "int8", ActScheme.DYNAMIC)
        return _note(simulated, f"int8 Linear {out_features}x{in_features}: cuBLAS int8 needs dimensions that are "
                                "multiples of 8; computed in float with int8-rounded weights and activations")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow, PerTensor, quantize_

    config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC,
                                                   granularity=[PerTensor(), PerRow()], set_inductor_config=False)
    linear = float_linear(weight, bias).to(device)
    quantize_(linear, config)
    linear.tokenwise = False
    return linear


def int4_unsupported_reason(in_features: int, group_size: int, device: torch.device) -> str | None:
    """Why torchao's tinygemm int4 kernel cannot take this layer, or None when it can."""
    if group_size not in TINYGEMM_GROUP_SIZES:
        return f"the tinygemm int4 kernel takes group sizes {TINYGEMM_GROUP_SIZES}, not {group_size}"
    if in_features % group_size:
        return f"input width {in_features} is not a multiple of the group size {group_size}"
    if device.type != "cuda":
        return "the tinygemm int4 kernel needs a CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the tinygemm int4 kernel needs compute capability 8.0+, this GPU has {major}.{minor}"
    return None


def int4_linear(weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                     device: torch.device) -> nn.Module:
    """Weight-only int4 Linear on CUDA: torchao's tinygemm kernel on a bf16 copy, else Int4Linear."""
    reason = int4_unsupported_reason(weight.shape[1], group_size, device)
    if reason is None:
        try:
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            linear = float_linear(weight, bias).to(device=device, dtype=torch.bfloat16)
            quantize_(linear, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                                   set_inductor_config=False))
            return linear
        except (RuntimeError, ValueError, AssertionError, ImportError) as error:
            reason = f"torchao int4 failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    fallback = Int4Linear(weight, bias, group_size).to(device)
    return _note(fallback, f"int4 Linear {weight.shape[0]}x{weight.shape[1]}: {reason}; "
                           "packed int4 unpacked per call instead")


def int8_embedding(table: torch.Tensor, padding_idx: int | None, device: torch.device) -> nn.Module:
    """torch's per-row uint8 table, kept on the GPU (identical values to the CPU kernel's)."""
    module = torch_int8_embedding(table.cpu())
    weight = module.weight()
    # clones, taken while `module` lives: the scales are views into its packed weight
    return Int8Embedding(weight.int_repr().clone().to(device), weight.q_per_channel_scales().clone().float().to(device),
                         weight.q_per_channel_zero_points().clone().float().to(device), padding_idx)
