"""torch's int8 CPU modules: the real CPU kernels, and where the simulation reads its int8 numbers from.

torch's dynamic int8 Linear (per-channel weights, per-tensor 7-bit activations on x86) and quantized Embedding
(uint8 per row). The simulated int8 weights and table rows are read back from these very modules, so simulated
and real agree by construction; `engine.kernels` registers them as the CPU's real int8 kernels.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import Embedding as QuantEmbedding
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig


@contextlib.contextmanager
def _quiet_ao():
    """torch.ao prints migration notices on every conversion; they say nothing about the numerics."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain CPU Linear holding copies of these float32 weights (the source torch's conversions take)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    linear.weight = nn.Parameter(weight.detach().float().cpu(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float().cpu(), requires_grad=False)
    return linear


def torch_int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """torch's dynamic int8 Linear with per-channel weights (the real CPU kernel)."""
    source = float_linear(weight, bias)
    source.qconfig = per_channel_dynamic_qconfig
    with _quiet_ao():
        module = DynamicLinear.from_float(source)
    module.tokenwise = False  # one activation scale per batch tensor
    return module


def torch_int8_embedding(table: torch.Tensor) -> nn.Module:
    """torch's quantized Embedding: uint8 per row with float scale and offset."""
    source = nn.Embedding(*table.shape)
    source.weight = nn.Parameter(table.detach().float().cpu(), requires_grad=False)
    source.qconfig = float_qparams_weight_only_qconfig
    with _quiet_ao():
        return QuantEmbedding.from_float(source)


def int8_dequantized(module: nn.Module) -> torch.Tensor:
    """The float weight a real int8 module computes with."""
    return module.weight().dequantize() if callable(module.weight) else module.weight.dequantize()


def int8_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """The int8 weight torch's kernel computes with, dequantized, on the weight's device."""
    return int8_dequantized(torch_int8_linear(weight, None)).to(weight.device)


def int8_linear_integers(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the int8 values as float, the per-output-channel scales) of torch's kernel for this weight."""
    module = torch_int8_linear(weight, None)
    packed = module.weight()  # read while `module` lives: the scales are views into its packed weight
    return (packed.int_repr().float().clone().to(weight.device),
            packed.q_per_channel_scales().float().clone().to(weight.device))


def int8_embedding_table(table: torch.Tensor) -> torch.Tensor:
    """Every row as torch's lookup returns it: the kernel computes q * scale + (-zero * scale) in one rounding,
    not the quantized tensor's (q - zero) * scale, which differs by a float32 ulp in over half the entries."""
    return torch_int8_embedding(table)(torch.arange(table.shape[0])).to(table.device)
