"""Real low-precision kernels on NVIDIA GPUs: torchao's int8 and int4 Linear, and an int8 embedding table.

- int8 Linear: torchao's `Int8DynamicActivationInt8WeightConfig` (cuBLAS int8 GEMM). Weights per
  output channel, symmetric: the same int8 weights as torch's CPU kernel (scale max|w|/127.5).
  Activations per tensor, asymmetric, as on the CPU, but with the full 8 bits where the x86 kernel
  keeps 7 (`reduce_range`); torchao's reduce_range would also halve the weights' range, so the GPU
  kernel is the CPU numerics with one more activation bit. cuBLAS int8 needs both dimensions to
  be multiples of 8; elsewhere (the 2-way classifier) torchao would copy to the CPU per call, so
  such a layer runs the CPU kernel's numerics in float on the GPU instead, and says so.
- int4 Linear: torchao's `Int4WeightOnlyConfig` in the tile-packed format of the tinygemm kernel
  (bf16 activations, compute capability 8.0+, group size 32/64/128/256 dividing the input width);
  where that does not hold, engine.quantize.Int4Linear (unpacked per call) with the reason.
- int8 embedding: torch's quantized Embedding is CPU-only, so the same per-row uint8 table is kept
  on the GPU and only the looked-up rows are dequantized (identical values).

A module that is not the fast kernel carries `kernel_note`; `kernel_notes(model)` collects them.
torchao is imported only here and only when a conversion runs (its import is slow and noisy).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

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


def kernel_notes(model: nn.Module) -> list[str]:
    """The distinct reasons why some layers of `model` do not run their fast kernel."""
    return sorted({note for module in model.modules() if (note := getattr(module, "kernel_note", None))})


def torchao_int8_linear(linear: nn.Linear, device: torch.device | str | None = None) -> nn.Module:
    """A copy of `linear` on `device` (default: its own) with torchao int8 weights and dynamic int8 activations."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow, PerTensor, quantize_

    config = Int8DynamicActivationInt8WeightConfig(act_mapping_type=MappingType.ASYMMETRIC,
                                                   granularity=[PerTensor(), PerRow()],
                                                   set_inductor_config=False)
    clone = copy.deepcopy(linear).float().requires_grad_(False)
    quantize_(clone.to(device or linear.weight.device), config)
    return clone


def cuda_int8_linear(linear: nn.Linear) -> nn.Module:
    """The int8 (W8A8) Linear for a CUDA model: torchao's kernel where cuBLAS can run it."""
    from engine.quantize import SimLinear, int8_dequantized, real_int8_linear

    device = linear.weight.device if linear.weight.device.type == "cuda" else torch.device("cuda")
    if linear.in_features % 8 or linear.out_features % 8:
        weight = int8_dequantized(real_int8_linear(linear)).to(device)
        bias = None if linear.bias is None else linear.bias.detach().float().to(device)
        return _note(SimLinear(weight, bias, "int8", "dynamic"),
                     f"int8 Linear {linear.out_features}x{linear.in_features}: cuBLAS int8 needs dimensions "
                     "that are multiples of 8; computed in float with int8-rounded weights and activations")
    return torchao_int8_linear(linear, device)


def int4_unsupported_reason(linear: nn.Linear, group_size: int) -> str | None:
    """Why torchao's tinygemm int4 kernel cannot take this layer, or None when it can."""
    if group_size not in TINYGEMM_GROUP_SIZES:
        return f"the tinygemm int4 kernel takes group sizes {TINYGEMM_GROUP_SIZES}, not {group_size}"
    if linear.in_features % group_size:
        return f"input width {linear.in_features} is not a multiple of the group size {group_size}"
    if linear.weight.device.type != "cuda":
        return "the tinygemm int4 kernel needs a CUDA device"
    major, minor = torch.cuda.get_device_capability(linear.weight.device)
    if major < 8:
        return f"the tinygemm int4 kernel needs compute capability 8.0+, this GPU has {major}.{minor}"
    return None


def cuda_int4_linear(linear: nn.Linear, group_size: int) -> nn.Module:
    """Weight-only int4 Linear on CUDA: torchao's tinygemm kernel on a bf16 copy, else Int4Linear."""
    from engine.quantize import Int4Linear

    reason = int4_unsupported_reason(linear, group_size)
    if reason is None:
        try:
            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            clone = copy.deepcopy(linear).to(torch.bfloat16).requires_grad_(False)
            quantize_(clone, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                                  set_inductor_config=False))
            return clone
        except (RuntimeError, ValueError, AssertionError, ImportError) as error:
            reason = f"torchao int4 failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    fallback = Int4Linear(linear, group_size).to(linear.weight.device)
    return _note(fallback, f"int4 Linear {linear.out_features}x{linear.in_features}: {reason}; "
                           "packed int4 unpacked per call instead")


class Int8Embedding(nn.Module):
    """Per-row uint8 word embeddings (torch's CPU format) on any device; rows dequantized on lookup."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        from engine.quantize import real_int8_embedding

        real = real_int8_embedding(embedding)
        weight = real.weight()
        device = embedding.weight.device
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = embedding.padding_idx
        # clones: the scales are views into the packed weight, which dies with `real`
        self.register_buffer("q", weight.int_repr().clone().to(device))
        self.register_buffer("scale", weight.q_per_channel_scales().clone().float().to(device))
        self.register_buffer("zero", weight.q_per_channel_zero_points().clone().float().to(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.q[ids].float() - self.zero[ids].unsqueeze(-1)) * self.scale[ids].unsqueeze(-1)


def cuda_int8_embedding(embedding: nn.Embedding) -> nn.Module:
    """The int8 embedding table for a CUDA model."""
    return Int8Embedding(embedding)
