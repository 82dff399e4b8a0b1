"""Quantizers and `apply_plan`: simulated (quantize-dequantize in float) and real kernels.

Numerics, shared by both paths so that simulated accuracy is the deployed accuracy:
- int8 (W8A8): weights int8 per output channel, symmetric, as torch's per-channel observer
  chooses them; activations quantized at run time, per tensor, asymmetric uint8 with the
  range torch's dynamic kernel uses (7-bit `reduce_range` on x86's fbgemm/onednn), so the scale
  covers the whole batch tensor exactly as the real kernel's does. Plan option `act` picks
  `token` (per-token dynamic) or `static` (calibrated per-tensor scale) instead.
- int4: weight-only, asymmetric, group-wise along the input dimension (group 64 by default):
  w ~ q * scale + min with q in 0..15, so every element is within half a step of its original.
- fp16/bf16: the layer's weights, input and output rounded to that dtype (matmul in that dtype).
- The word-embedding table: int8 per row (torch's quantized Embedding) or int4 group-wise.

Real kernels on CPU: torch's dynamic int8 Linear and quantized Embedding; int4 is stored packed
(two values a byte) and unpacked per call, since this CPU has no fast int4 GEMM (torch's
`_weight_int4pack_mm_for_cpu` measured 60x slower than FP32 at batch 32); fp16/bf16 run natively.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import inventory
from engine.models import fingerprint
from engine.plan import FP32, Plan

KERNELS = ("simulated", "real")
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def int8_reduce_range() -> bool:
    """Whether the CPU's dynamic int8 kernel uses 7-bit activations (fbgemm/x86/onednn do)."""
    return torch.backends.quantized.engine in ("fbgemm", "x86", "onednn")


# ---- int8 -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_ao():
    """torch.ao prints migration notices on every conversion; they say nothing about our numerics."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def real_int8_linear(linear: nn.Linear) -> nn.Module:
    """torch's dynamic int8 Linear with per-channel weights (the real CPU kernel)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    source = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
    source.weight = nn.Parameter(linear.weight.detach().float().cpu(), requires_grad=False)
    if linear.bias is not None:
        source.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    source.qconfig = per_channel_dynamic_qconfig
    with _quiet_ao():
        return DynamicLinear.from_float(source)


def real_int8_embedding(embedding: nn.Embedding) -> nn.Module:
    """torch's quantized Embedding: uint8 per row with float scale and offset."""
    from torch.ao.nn.quantized import Embedding as QuantEmbedding
    from torch.ao.quantization import float_qparams_weight_only_qconfig

    source = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim)
    source.weight = nn.Parameter(embedding.weight.detach().float().cpu(), requires_grad=False)
    source.qconfig = float_qparams_weight_only_qconfig
    with _quiet_ao():
        return QuantEmbedding.from_float(source)


def int8_dequantized(module: nn.Module) -> torch.Tensor:
    """The float weight a real int8 module computes with."""
    return module.weight().dequantize() if callable(module.weight) else module.weight.dequantize()


def fake_quant_activation(x: torch.Tensor, scheme: str, reduce_range: bool,
                          static_scale: tuple[float, int] | None = None) -> torch.Tensor:
    """Activations quantize-dequantized as the int8 kernel sees them (asymmetric uint8)."""
    qmax = 127 if reduce_range else 255
    if scheme == "dynamic":
        x32 = x.float().contiguous()
        scale, zero = torch._choose_qparams_per_tensor(x32, reduce_range)
        # torch's own quantizer, the kernel's rounding: round(x * (1/scale) + zero), the zero point added
        # before rounding. fake_quantize rounds before adding it and differs on near-ties, moving a
        # token's whole output by one activation step.
        return torch.quantize_per_tensor(x32, scale, zero, torch.quint8).dequantize().to(x.dtype)
    if scheme == "static":
        scale, zero = static_scale
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, qmax)
    # per token: one asymmetric range per row, the range including 0 as the kernels do
    low = x.amin(-1, keepdim=True).clamp(max=0)
    high = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / qmax).clamp(min=1e-8)
    zero = torch.clamp(torch.round(-low / scale), 0, qmax)
    return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale


# ---- int4 -----------------------------------------------------------------------------------
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
    expand = lambda t: t.repeat_interleave(group_size, dim=-1)[..., :cols]  # noqa: E731
    return q.float() * expand(scale) + expand(low)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values a byte along the last dimension (odd widths padded with a zero)."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :cols]


class Int4Linear(nn.Module):
    """Real int4 weight-only Linear: packed nibbles plus per-group scale and min, unpacked per call."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        q, scale, low = int4_quantize(linear.weight, group_size)
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        self.register_buffer("packed", pack_nibbles(q))
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return int4_dequantize(unpack_nibbles(self.packed, self.in_features), self.scale, self.low, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


class Int4Embedding(nn.Module):
    """Real int4 word embeddings: packed rows, unpacked only for the looked-up tokens."""

    def __init__(self, embedding: nn.Embedding, group_size: int):
        super().__init__()
        q, scale, low = int4_quantize(embedding.weight, group_size)
        self.num_embeddings, self.embedding_dim, self.group_size = *embedding.weight.shape, group_size
        self.padding_idx = embedding.padding_idx
        self.register_buffer("packed", pack_nibbles(q))
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = unpack_nibbles(self.packed[ids], self.embedding_dim)
        return int4_dequantize(rows, self.scale[ids], self.low[ids], self.group_size)


class CastLinear(nn.Linear):
    """A Linear whose weights and matmul are in fp16 or bf16 (input cast in, output cast back)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class CastEmbedding(nn.Embedding):
    """Word embeddings stored in fp16 or bf16, looked up and returned as fp32."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype):
        super().__init__(*embedding.weight.shape, padding_idx=embedding.padding_idx,
                         _weight=embedding.weight.detach().to(dtype))
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


# ---- simulated ------------------------------------------------------------------------------
class SimLinear(nn.Module):
    """A Linear that computes in float with quantize-dequantized weights (and activations for int8).

    `in_scale`, when set, divides the input per channel first (SmoothQuant's explicit scale).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str,
                 act: str = "dynamic", static_scale: tuple[float, int] | None = None,
                 in_scale: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.precision, self.act, self.static_scale = precision, act, static_scale
        self.reduce_range = int8_reduce_range()
        self.register_buffer("weight", weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("in_scale", in_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x / self.in_scale
        if self.precision == "int8":
            x = fake_quant_activation(x, self.act, self.reduce_range, self.static_scale)
        elif self.precision in FLOAT_DTYPES:
            dtype = FLOAT_DTYPES[self.precision]
            return F.linear(x.to(dtype).to(x.dtype), self.weight, self.bias).to(dtype).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, precision={self.precision}, act={self.act}"


class _WeightCache:
    """Process-wide LRU of quantize-dequantized weights, so toggling back and forth costs nothing."""

    def __init__(self, capacity: int = 512):
        self.capacity, self.items, self.lock = capacity, OrderedDict(), threading.Lock()

    def get(self, key, compute):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = compute()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return value


WEIGHTS = _WeightCache()


def simulated_weight(model_key: str, name: str, module: nn.Module, precision: str, group_size: int) -> torch.Tensor:
    """The weight a layer computes with at `precision`, identical to the real kernel's."""

    def compute() -> torch.Tensor:
        weight = module.weight.detach()
        if precision == "int8":
            real = real_int8_embedding(module) if isinstance(module, nn.Embedding) else real_int8_linear(module)
            return int8_dequantized(real).to(weight.device)
        if precision == "int4":
            q, scale, low = int4_quantize(weight, group_size)
            return int4_dequantize(q, scale, low, group_size)
        if precision in FLOAT_DTYPES:
            return weight.to(FLOAT_DTYPES[precision]).float()
        return weight

    return WEIGHTS.get((model_key, name, precision, group_size if precision == "int4" else 0), compute)


# ---- apply_plan -----------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def shallow_copy(model: nn.Module) -> nn.Module:
    """A new module tree that shares every parameter and buffer tensor with `model`.

    Replacing a submodule of the copy leaves the original untouched, and the copy costs no
    memory for the weights it does not change.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    clone = copy.deepcopy(model, memo)
    for attribute in ("_engine_fingerprint", "_engine_inventory", "_engine_plan"):
        clone.__dict__.pop(attribute, None)
    return clone


def _real_module(module: nn.Module, precision: str, group_size: int, device: torch.device) -> nn.Module:
    is_embedding = isinstance(module, nn.Embedding)
    if precision in FLOAT_DTYPES:
        return (CastEmbedding if is_embedding else CastLinear)(module, FLOAT_DTYPES[precision])
    if device.type == "cuda":  # torchao's kernels; torch's quantized Embedding is CPU-only
        from engine.cuda import cuda_int4_linear, cuda_int8_embedding, cuda_int8_linear

        if precision == "int4":
            return Int4Embedding(module, group_size).to(device) if is_embedding else cuda_int4_linear(module, group_size)
        return cuda_int8_embedding(module) if is_embedding else cuda_int8_linear(module)
    if precision == "int4":
        return Int4Embedding(module, group_size) if is_embedding else Int4Linear(module, group_size)
    return real_int8_embedding(module) if is_embedding else real_int8_linear(module)


@dataclass(frozen=True)
class LayerInput:
    """What SmoothQuant hands a layer before quantization (see engine.smoothquant.prepare_layers).

    `linear` is the float layer to quantize (smoothed weight, or the original), `in_scale` an
    explicit per-channel divisor of the input, `static_scale` the calibrated activation (scale,
    zero point), and `key` names the weight transform for the weight cache (None: unchanged).
    """

    linear: nn.Linear
    in_scale: torch.Tensor | None = None
    static_scale: tuple[float, int] | None = None
    key: str | None = None


class ScaledInput(nn.Module):
    """A real kernel behind SmoothQuant's explicit input scale: inner(x / in_scale)."""

    def __init__(self, in_scale: torch.Tensor, inner: nn.Module):
        super().__init__()
        self.register_buffer("in_scale", in_scale)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / self.in_scale)


def _replacement(model_key: str, name: str, original: nn.Module, precision: str, plan: Plan, kernels: str,
                 device: torch.device, prepared: LayerInput | None) -> nn.Module:
    """The module that computes layer `name` at `precision` (smoothed and statically scaled if prepared)."""
    source = original if prepared is None else prepared.linear
    if kernels == "real":
        # the real CPU kernel is dynamic per tensor whatever `act` says: its job is size and latency
        module = source if precision == "fp32" else _real_module(source, precision, plan.group_size, device)
        if prepared is not None and prepared.in_scale is not None:
            module = ScaledInput(prepared.in_scale, module)
        return module
    if prepared is not None and precision == "fp32":
        weight = source.weight.detach()  # smoothing alone: nothing to quantize, nothing worth caching
    else:
        weight_name = name if prepared is None or prepared.key is None else f"{name}|{prepared.key}"
        weight = simulated_weight(model_key, weight_name, source, precision, plan.group_size)
    if isinstance(original, nn.Embedding):
        return nn.Embedding(*weight.shape, padding_idx=original.padding_idx, _weight=weight)
    bias = None if source.bias is None else source.bias.detach()
    if prepared is None:
        return SimLinear(weight, bias, precision, plan.act)
    return SimLinear(weight, bias, precision, plan.act, prepared.static_scale, prepared.in_scale)


def apply_plan(model: nn.Module, plan: Plan | str | dict = FP32, kernels: str = "simulated",
               calibration=None) -> nn.Module:
    """A new model with `plan` applied; `model` itself stays bit-for-bit unchanged.

    kernels="simulated" computes in float with quantize-dequantized weights (any device);
    "real" uses the device's low-precision kernels. `calibration` (an engine.smoothquant
    Calibration) serves static activation scales and smoothing; when it is None and the plan
    needs one, it is computed (and memoized) on demand.
    """
    from engine.plan import PlanError, parse_plan

    if isinstance(plan, str):
        plan = parse_plan(plan)
    elif isinstance(plan, dict):
        plan = Plan.from_json(plan)
    if kernels not in KERNELS:
        raise PlanError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    layers = inventory(model)
    resolved = plan.resolve([layer.name for layer in layers])
    prepared: dict[str, LayerInput] = {}
    if plan.smooth_alpha is not None or plan.act == "static":
        from engine.smoothquant import prepare_layers

        prepared = prepare_layers(model, plan, resolved, calibration)
    clone = shallow_copy(model)
    model_key = fingerprint(model)
    device = next(model.parameters()).device
    for layer in layers:
        precision = resolved[layer.name]
        if precision == "fp32" and layer.name not in prepared:
            continue
        original = model.get_submodule(layer.name)
        replacement = _replacement(model_key, layer.name, original, precision, plan, kernels, device,
                                   prepared.get(layer.name))
        _set_module(clone, layer.name, replacement.requires_grad_(False))
    clone.__dict__["_engine_plan"] = (plan, kernels)
    clone.eval()
    return clone
