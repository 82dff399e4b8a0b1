"""The quantized modules that stand in for a Linear or an embedding table.

Each says whether it is token-wise (every token's output depends on that token alone): a per-tensor
dynamic int8 input scale covers the whole batch tensor, so such a layer is not, and the staged
forward may compute a token-wise block for the one row the head reads. `is_tokenwise` asks the
modules rather than testing their classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.numerics import int4_dequantize, int4_quantize, pack_nibbles, quantize_activation, unpack_nibbles
from engine.core.vocabulary import ActScheme, Runtime

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_TOKENWISE_LEAVES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.Identity)
_TOKENWISE_NAMES = ("RMSNorm", "LayerNorm", "Conv1D")  # transformers' own norms and GPT-2's Linear


def linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of a Linear, or of transformers' Conv1D (which stores [in, out])."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t(), module.bias.detach()
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def is_tokenwise(module: nn.Module) -> bool:
    """True when no part of `module` mixes tokens through an activation range (unknown parameterised
    modules count as mixing, to stay on the safe side)."""
    for part in module.modules():
        flag = getattr(part, "tokenwise", None)
        if flag is not None:
            if not flag:
                return False
            continue
        owns = any(True for _ in part.parameters(recurse=False)) or any(True for _ in part.buffers(recurse=False))
        if owns and not isinstance(part, _TOKENWISE_LEAVES) and not type(part).__name__.endswith(_TOKENWISE_NAMES):
            return False
    return True


class SimLinear(nn.Module):
    """A Linear that computes in float with the weights (and for int8 the activations) a kernel computes with.

    int8 computes as the integer kernel does: the activations' integers (q - zero point) times the weight's
    integers, summed (exact in float32 while the sums stay below 2^24), then scaled by the activation scale
    times each output channel's weight scale, then the bias: so a near-tie rounds as the real kernel's does.
    `weight_scale` holds those per-channel scales (int8 only; `weight` then holds the integers).
    `in_scale`, when set, divides the input per channel first (SmoothQuant's explicit scale).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str, act: str = ActScheme.DYNAMIC,
                 static_scale: tuple[float, int] | None = None, in_scale: torch.Tensor | None = None,
                 reduce_range: bool = True, weight_scale: torch.Tensor | None = None, quantize=quantize_activation):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.precision, self.act, self.static_scale, self.reduce_range = precision, act, static_scale, reduce_range
        self.quantize = quantize
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        if bias is not None and precision in FLOAT_DTYPES:  # a half-precision kernel adds a half-precision bias
            bias = bias.to(FLOAT_DTYPES[precision]).to(bias.dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("in_scale", in_scale)

    @property
    def tokenwise(self) -> bool:
        return not (self.precision == "int8" and self.act == ActScheme.DYNAMIC)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with."""
        return self.weight if self.weight_scale is None else self.weight * self.weight_scale[:, None]

    def integer_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the int8 values, the per-output-channel scales) of an int8 layer whose kernel sums integers."""
        if self.weight_scale is None:
            raise ValueError(f"a {self.precision} layer simulated in float has no integer weights")
        return self.weight, self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x / self.in_scale
        if self.precision == "int8":
            q, scale = self.quantize(x, self.act, self.reduce_range, self.static_scale)
            if self.weight_scale is None:
                return F.linear((q * scale).to(x.dtype), self.weight, self.bias)
            # the kernel's epilogue is one fused multiply-add (a single rounding): emulated in float64, where
            # the product of an exact integer sum and a float32 scale is exact
            out = F.linear(q, self.weight).double() * (scale * self.weight_scale).double()
            return (out if self.bias is None else out + self.bias.double()).to(x.dtype)
        if self.precision in FLOAT_DTYPES:
            dtype = FLOAT_DTYPES[self.precision]
            return F.linear(x.to(dtype).to(x.dtype), self.weight, self.bias).to(dtype).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, precision={self.precision}, act={self.act}"


class StaticInt8Linear(nn.Module):
    """Real static W8A8: the input quantized with its calibrated (scale, zero point), an int8 x int8 -> int32 GEMM
    (torch._int_mm), then the kernel's epilogue (one rounding, as SimLinear's). With 7-bit activations
    (reduce_range, torch's x86 engines) q - zero point fits int8; otherwise, and off the CPU, the integer sums
    are computed in float (exact below 2^24) and the module says so (`kernel_note`)."""

    tokenwise = True

    def __init__(self, integers: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 static_scale: tuple[float, int], reduce_range: bool):
        super().__init__()
        self.out_features, self.in_features = integers.shape
        self.static_scale, self.reduce_range = static_scale, reduce_range
        self.register_buffer("weight_t", integers.to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scales.float())
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        if not reduce_range or integers.device.type != "cpu":
            self.kernel_note = "static int8 sums computed in float (exact): no int8 GEMM for 8-bit activations here"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_activation(x, ActScheme.STATIC, self.reduce_range, self.static_scale)
        rows = q.reshape(-1, self.in_features)
        if getattr(self, "kernel_note", None) is None:
            sums = torch._int_mm(rows.to(torch.int8), self.weight_t)
        else:
            sums = rows @ self.weight_t.float()
        out = sums.double() * (scale * self.weight_scale).double()
        out = out if self.bias is None else out + self.bias.double()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Real int4 weight-only Linear: packed nibbles plus per-group scale and min, unpacked per call."""

    tokenwise = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        super().__init__()
        q, scale, low = int4_quantize(weight, group_size)
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.register_buffer("packed", pack_nibbles(q))
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    @classmethod
    def from_integers(cls, weights, bias: torch.Tensor | None) -> Int4Linear:
        """The module computing a weight method's integers (engine.quant.int4_methods.Int4Weights on torch's
        grid, w = q * scale + offset) instead of rounding a float weight itself: it computes weights.values().
        `weights` goes untyped because engine.core sits below engine.quant."""
        if weights.runtime != Runtime.TORCH:
            raise ValueError(f"Int4Linear computes torch's int4 grid, not {Runtime(weights.runtime).label}'s")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = weights.q.shape
        module.group_size = weights.group_size
        module.register_buffer("packed", pack_nibbles(weights.q))
        module.register_buffer("scale", weights.scale.float().contiguous())
        module.register_buffer("low", weights.offset.float().contiguous())
        module.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        return module

    def dequantized(self) -> torch.Tensor:
        return int4_dequantize(unpack_nibbles(self.packed, self.in_features), self.scale, self.low, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


class Int4Embedding(nn.Module):
    """Real int4 word embeddings: packed rows, unpacked only for the looked-up tokens."""

    def __init__(self, table: torch.Tensor, padding_idx: int | None, group_size: int):
        super().__init__()
        q, scale, low = int4_quantize(table, group_size)
        self.num_embeddings, self.embedding_dim = table.shape
        self.group_size, self.padding_idx = group_size, padding_idx
        self.register_buffer("packed", pack_nibbles(q))
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = unpack_nibbles(self.packed[ids], self.embedding_dim)
        return int4_dequantize(rows, self.scale[ids], self.low[ids], self.group_size)


class Int8Embedding(nn.Module):
    """Per-row uint8 word embeddings (torch's quantized format) on any device; rows dequantized on lookup."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.q[ids].float() - self.zero[ids].unsqueeze(-1)) * self.scale[ids].unsqueeze(-1)


class CastLinear(nn.Module):
    """A Linear whose weights and matmul are in fp16 or bf16 (input cast in, output cast back)."""

    tokenwise = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class CastEmbedding(nn.Module):
    """Word embeddings stored in fp16 or bf16, looked up and returned as fp32."""

    def __init__(self, table: torch.Tensor, padding_idx: int | None, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight", table.to(dtype).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class ScaledInput(nn.Module):
    """A real kernel behind SmoothQuant's explicit input scale: inner(x / in_scale)."""

    def __init__(self, in_scale: torch.Tensor, inner: nn.Module):
        super().__init__()
        self.register_buffer("in_scale", in_scale)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / self.in_scale)

