"""`apply_plan`: a new model with a plan applied, from the plan and what the caller prepared.

The caller passes calibration statistics (for static activation scales) and smoothing factors (for
SmoothQuant) computed by their own steps (engine.quant.calibration, engine.quant.smoothing): this
module only converts. Every layer's module comes from the precision registry; simulated weights are
kept in one process-wide LRU, so toggling a layer back and forth costs nothing.
"""
from __future__ import annotations

import copy

import torch
from cachetools import LRUCache
from torch import nn

from engine.core.numerics import int8_reduce_range
from engine.core.plan import FP32, PlanError, PlanLike, as_plan
from engine.core.precisions import PRECISIONS
from engine.core.qmodules import Int4Linear, ScaledInput, SimLinear, StaticInt8Linear, linear_parts
from engine.core.rules import LayerSpec
from engine.core.memo import memoized
from engine.core.settings import settings
from engine.core.vocabulary import Kernels, Runtime, WeightMethod
from engine.kernels.registry import real_kernels
from engine.model.facts import facts
from engine.model.inventory import inventory
from engine.model.loading import fingerprint
from engine.quant.prepared import Prepared

PREPARED_METHODS = (WeightMethod.GPTQ, WeightMethod.HQQ)  # methods whose int4 integers `prepare` computes


def shallow_copy(model: nn.Module) -> nn.Module:
    """A new module tree that shares every parameter and buffer tensor with `model`.

    Replacing a submodule of the copy leaves the original untouched, and the copy costs no memory
    for the weights it does not change. The copy has no facts (engine.model.facts) of its own yet.
    """
    return copy.deepcopy(model, {id(t): t for t in list(model.parameters()) + list(model.buffers())})


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def with_tensors(module: nn.Module, **tensors: torch.Tensor) -> nn.Module:
    """A copy of `module` (same class and attributes) holding new parameter tensors; `module` is untouched."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    for name, tensor in tensors.items():
        clone._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    return clone


def _nbytes(value) -> int:
    """Bytes of a cached tensor, tuple of tensors, or a method's integers (their tensors)."""
    parts = value if isinstance(value, tuple) else (value,) if isinstance(value, torch.Tensor) else \
        tuple(t for t in vars(value).values() if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in parts)


# Bounded in bytes, not entries: a DistilBERT-size model's quantized weights at two precisions are half a
# gigabyte, and a shared server must not keep every model's (ENGINE_WEIGHT_CACHE_MB, recomputed in ms).
@memoized("quant.weights", LRUCache(maxsize=int(settings().weight_cache_mb * 2**20), getsizeof=_nbytes),
          key=lambda key, *_: key)
def memoized_weight(key: tuple, compute) -> torch.Tensor:
    # Outside inference mode: a weight computed under it could never become a module's parameter later.
    with torch.inference_mode(False), torch.no_grad():
        return compute()


def simulated_weight(model_key: str, name: str, precision: str, weight: torch.Tensor, group_size: int,
                     embedding: bool = False, transform: str | None = None,
                     runtime: str = Runtime.TORCH) -> torch.Tensor:
    """The values a layer computes with at `precision` on `runtime` (memoized per weights, layer, precision,
    runtime and transform)."""
    numerics = PRECISIONS[precision].numerics[runtime]
    quantize = numerics.table if embedding else numerics.weight
    compute = lambda: quantize(weight, group_size)
    return memoized_weight((model_key, name, precision, runtime, group_size if precision == "int4" else 0, embedding,
                       transform), compute)


def simulated_linear(model_key: str, name: str, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
                     plan, static=None, in_scale=None, transform: str | None = None, values=None) -> SimLinear:
    """The simulated module of one Linear: integer weights and scales where the runtime's kernel sums
    integers, else the quantize-dequantized weight (`values`, when a method computed them)."""
    bits = plan.int8_weight_bits
    precision = spec.precision
    numerics = PRECISIONS[precision].numerics_for(plan.runtime, bits)
    reduce_range = numerics.reduce_range and int8_reduce_range()
    if numerics.integers is not None:
        integers, scales = memoized_weight((model_key, name, precision, plan.runtime, "integers", bits, transform),
                                      lambda: numerics.integers(weight))
        return SimLinear(integers, bias, precision, spec.act, static, in_scale, reduce_range, scales,
                         numerics.activation)
    if values is None:
        values = simulated_weight(model_key, name, precision, weight, spec.group_size, transform=transform,
                                  runtime=plan.runtime)
    return SimLinear(values, bias, precision, spec.act, static, in_scale, reduce_range, quantize=numerics.activation)


def quantized_values(model_key: str, name: str, spec: LayerSpec, weight: torch.Tensor, plan, prepared: Prepared,
                     transform: str | None = None) -> torch.Tensor:
    """The float weight a Linear computes with under `spec` (what bias correction compensates)."""
    if name in prepared.weights:
        return prepared.weights[name].values()
    return simulated_linear(model_key, name, spec, weight, None, plan, transform=transform).dequantized()


def apply_plan(model: nn.Module, plan: PlanLike = FP32, kernels: str = Kernels.SIMULATED, *,
               prepared: Prepared | None = None) -> nn.Module:
    """A new model with `plan` applied; `model` itself stays bit-for-bit unchanged.

    kernels="simulated" computes in float with quantize-dequantized weights (any device); "real" uses the
    device's low-precision kernels. A plan that needs calibration (static activation scales, smoothing, GPTQ,
    AWQ, bias correction) or a method's integers (HQQ) needs `prepared` (engine.quant.prepare.prepare).
    """
    plan = as_plan(plan)
    if kernels not in list(Kernels):
        raise PlanError(f"kernels must be one of {', '.join(Kernels)}, not {kernels!r}")
    if kernels == Kernels.REAL and plan.runtime != Runtime.TORCH:
        raise PlanError(f"real {plan.runtime} kernels run the exported graph (engine.runtime.onnx_export), "
                        "not a torch module: simulate this plan, or export it")
    layers = inventory(model)
    specs = plan.specs([layer.name for layer in layers])
    prepared = prepared if prepared is not None else Prepared()
    smoothing = prepared.smoothing
    for layer in layers:
        spec = specs[layer.name]
        if layer.kind != "linear":
            continue
        method = spec.method in PREPARED_METHODS and spec.precision == "int4"
        missing = [what for what, lacks in (
            (f"{spec.method.value}'s integers", method and layer.name not in prepared.weights),
            ("its smoothing factors (SmoothQuant, AWQ)",
             (spec.smooth_alpha is not None or spec.method == WeightMethod.AWQ) and smoothing is None),
            ("calibrated static activation ranges", spec.static and layer.name not in prepared.ranges)) if lacks]
        if missing:
            raise PlanError(f"layer {layer.name} ({spec.describe()}) needs {' and '.join(missing)}: prepare the plan "
                            "first (engine.quant.prepare.prepare)")
    clone = shallow_copy(model)
    model_key = fingerprint(model)
    device = next(model.parameters()).device
    for layer in layers:
        spec = specs[layer.name]
        precision = spec.precision
        transform = prepared.transform_key(layer.name)
        if precision == "fp32" and transform is None and layer.name not in prepared.biases:
            continue
        original = model.get_submodule(layer.name)
        if layer.kind == "embedding":  # methods apply to Linear layers; a table is rounded to nearest
            table = original.weight.detach()
            if kernels == Kernels.REAL and precision != "fp32":
                real = real_kernels(precision, device)
                replacement = real.table(table, original.padding_idx, spec.group_size, device)
            else:
                values = simulated_weight(model_key, layer.name, precision, table, spec.group_size, embedding=True,
                                          runtime=plan.runtime)
                replacement = with_tensors(original, weight=values)
            set_module(clone, layer.name, replacement.requires_grad_(False))
            continue
        weight, bias = linear_parts(original)
        in_scale = None
        if smoothing is not None and transform is not None:
            weight, bias, in_scale = smoothing.transformed(layer.name, weight, bias)
        bias = prepared.biases.get(layer.name, bias)
        static = None
        if spec.static:
            numerics = PRECISIONS[precision].numerics_for(plan.runtime, plan.int8_weight_bits)
            static = numerics.static(*prepared.ranges[layer.name], numerics.reduce_range and int8_reduce_range())
        method_weights = prepared.weights.get(layer.name) if precision == "int4" else None
        if kernels == Kernels.REAL:
            if static is not None:  # calibrated activation scales: the static kernel, with the same integers
                integers, scales = simulated_linear(model_key, layer.name, spec, weight, None, plan,
                                                    transform=transform).integer_weights()
                module = StaticInt8Linear(integers, scales, bias, static, reduce_range=int8_reduce_range())
            elif method_weights is not None:
                module = Int4Linear.from_integers(method_weights, bias)
            else:
                module = real_kernels(precision, device).linear(weight, bias, spec.group_size, device)
            replacement = module if in_scale is None else ScaledInput(in_scale, module)
        else:
            replacement = simulated_linear(model_key, layer.name, spec, weight, bias, plan, static, in_scale,
                                           transform, None if method_weights is None else method_weights.values())
        set_module(clone, layer.name, replacement.requires_grad_(False))
    if smoothing is not None:
        for norm_name, divisor in smoothing.norms.items():
            norm = model.get_submodule(norm_name)
            folded = {name: norm._parameters[name].detach() / divisor.to(device)
                      for name in ("weight", "bias") if norm._parameters.get(name) is not None}
            set_module(clone, norm_name, with_tensors(norm, **folded))
    facts(clone).plan = (plan, kernels)
    return clone.eval()
