"""The real kernels, registered per (precision, device type): what `apply_plan(..., kernels="real")` builds.

The precision registry (engine.core.precisions) says how each runtime computes a precision, to simulate it
exactly, and how many bytes it takes; this one says which module runs it for real where. A device type with no
entry for a precision is one clear error, never a quiet fallback to float.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.core.errors import EngineError
from engine.core.qmodules import FLOAT_DTYPES, CastEmbedding, CastLinear, Int4Embedding, Int4Linear
from engine.core.torch_int8 import torch_int8_embedding, torch_int8_linear
from engine.kernels import cuda

Tensor = torch.Tensor


@dataclass(frozen=True)
class RealKernels:
    """How one precision runs on one device type: its Linear and its embedding table."""

    linear: Callable[[Tensor, Tensor | None, int, torch.device], nn.Module]  # (weight, bias, group, device)
    table: Callable[[Tensor, int | None, int, torch.device], nn.Module]  # (table, padding_idx, group, device)


def _float_linear(weight: Tensor, bias: Tensor | None, _group: int, device: torch.device) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=device)
    linear.weight = nn.Parameter(weight.detach().float().to(device), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float().to(device), requires_grad=False)
    return linear


def _float_table(table: Tensor, padding_idx: int | None, _group: int, device: torch.device) -> nn.Module:
    return nn.Embedding(*table.shape, padding_idx=padding_idx, _weight=table.detach().float().to(device))


def _cast(name: str) -> RealKernels:
    dtype = FLOAT_DTYPES[name]
    return RealKernels(
        lambda weight, bias, _group, device: CastLinear(weight.to(device), None if bias is None else bias.to(device),
                                                        dtype),
        lambda table, padding, _group, device: CastEmbedding(table.to(device), padding, dtype))


def _int4_table(table: Tensor, padding_idx: int | None, group: int, device: torch.device) -> nn.Module:
    return Int4Embedding(table.to(device), padding_idx, group)


KERNELS: dict[tuple[str, str], RealKernels] = {
    ("fp32", "cpu"): RealKernels(_float_linear, _float_table),
    ("fp32", "cuda"): RealKernels(_float_linear, _float_table),
    ("fp16", "cpu"): _cast("fp16"),
    ("fp16", "cuda"): _cast("fp16"),
    ("bf16", "cpu"): _cast("bf16"),
    ("bf16", "cuda"): _cast("bf16"),
    ("int8", "cpu"): RealKernels(lambda weight, bias, _group, _device: torch_int8_linear(weight, bias),
                                 lambda table, _padding, _group, _device: torch_int8_embedding(table)),
    ("int8", "cuda"): RealKernels(lambda weight, bias, _group, device: cuda.int8_linear(weight, bias, device),
                                  lambda table, padding, _group, device: cuda.int8_embedding(table, padding, device)),
    ("int4", "cpu"): RealKernels(lambda weight, bias, group, _device: Int4Linear(weight, bias, group), _int4_table),
    ("int4", "cuda"): RealKernels(cuda.int4_linear, _int4_table),
}


def real_kernels(precision: str, device: torch.device) -> RealKernels:
    """The real kernels of `precision` on `device`'s type, or one line saying there are none."""
    found = KERNELS.get((precision, device.type))
    if found is None:
        have = sorted({kind for name, kind in KERNELS if name == precision})
        raise EngineError(f"no real {precision} kernel on {device.type}: registered on {', '.join(have) or 'none'}")
    return found


def kernel_notes(model: nn.Module) -> list[str]:
    """The distinct reasons why some layers of `model` do not run their fast kernel."""
    return sorted({note for module in model.modules() if (note := getattr(module, "kernel_note", None))})
