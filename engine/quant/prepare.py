"""Prepare, then convert: everything a plan needs beyond the FP32 weights, computed once per layer from the
caller's calibration texts (a seeded sample of the evaluated source's calibration pool), and the plan's model
built from it. Each layer is prepared as its own rule says (its calibration size, calibrator, method):

- calibration statistics per distinct calibration size (GPTQ's layers also collect X^T X);
- smoothing: SmoothQuant's factors and AWQ's searched scales (engine.quant.smoothing);
- static int8 input ranges from each layer's calibrator (minmax from the statistics, the others from
  engine.quant.calibrators), after smoothing;
- int4 integers of GPTQ (from the smoothed weight and its Hessian) and HQQ (engine.quant.int4_methods);
- bias correction: b + (W - Q(W)) E[x], with Q(W) exactly the weight the layer computes with.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from engine.core.plan import Plan, PlanError
from engine.core.qmodules import linear_parts
from engine.core.vocabulary import Calibrator, WeightMethod
from engine.model.inventory import inventory
from engine.model.loading import fingerprint
from engine.quant.apply import apply_plan, memoized_weight, quantized_values
from engine.quant.calibration import Calibration, calibrate, calibration_texts
from engine.quant.prepared import Prepared
from engine.quant.smoothing import smooth


def prepare(model: nn.Module, tokenizer, plan: Plan, pool: Sequence[str], source: str = "") -> Prepared:
    """Everything `plan` needs for `model`, calibrated on seeded samples of `pool` (each layer's calib texts)."""
    layers = inventory(model)
    specs = plan.specs([layer.name for layer in layers])
    linear = {layer.name: spec for layer in layers if layer.kind == "linear" for spec in (specs[layer.name],)}
    if not any(spec.needs_calibration or spec.method == WeightMethod.HQQ for spec in linear.values()):
        return Prepared()
    sizes = sorted({spec.calib for spec in linear.values() if spec.needs_calibration} | {plan.calib})
    calibrations: dict[int, Calibration] = {}
    for size in sizes:
        gptq = frozenset(name for name, spec in linear.items()
                         if spec.calib == size and spec.method == WeightMethod.GPTQ and spec.precision == "int4")
        calibrations[size] = calibrate(model, tokenizer, calibration_texts(pool, size), source, hessians=gptq)
    return _prepared(model, tokenizer, plan, specs, linear, calibrations, pool, source)


def prepare_with(model: nn.Module, plan: Plan, calibration: Calibration) -> Prepared:
    """`prepare` from a calibration the caller already has (at the plan's size): for plans that need nothing
    else from the texts (no histogram calibrator, no GPTQ Hessian, one calibration size)."""
    layers = inventory(model)
    specs = plan.specs([layer.name for layer in layers])
    linear = {layer.name: specs[layer.name] for layer in layers if layer.kind == "linear"}
    for name, spec in linear.items():
        histogram = spec.static and spec.calibration != Calibrator.MINMAX
        if spec.needs_calibration and (spec.calib != plan.calib or histogram or spec.method == WeightMethod.GPTQ):
            raise PlanError(f"layer {name} ({spec.describe()}) needs its own calibration pass: use prepare()")
    return _prepared(model, None, plan, specs, linear, {plan.calib: calibration}, (), "")


def _prepared(model, tokenizer, plan: Plan, specs, linear, calibrations, pool, source) -> Prepared:
    prepared = Prepared(calibration=calibrations[plan.calib])
    smoothed = {name: spec for name, spec in linear.items()
                if spec.smooth_alpha is not None or spec.method == WeightMethod.AWQ}
    if smoothed:
        smoothing_sizes = {spec.calib for spec in smoothed.values()}
        if len(smoothing_sizes) > 1:
            raise PlanError(f"layers {', '.join(sorted(smoothed)[:3])}...: SmoothQuant and AWQ layers must share one "
                            f"calibration size (the plan gives {', '.join(map(str, sorted(smoothing_sizes)))})")
        prepared.smoothing = smooth(model, plan, calibrations[smoothing_sizes.pop()], specs)
    _static_ranges(model, tokenizer, linear, calibrations, pool, source, prepared)
    _method_weights(model, plan, linear, calibrations, prepared)
    _bias_corrections(model, plan, linear, calibrations, prepared)
    return prepared


def _static_ranges(model, tokenizer, linear, calibrations, pool, source, prepared: Prepared) -> None:
    smoothing = prepared.smoothing
    histograms: dict[int, dict[str, tuple[Calibrator, float]]] = {}
    for name, spec in linear.items():
        if not spec.static:
            continue
        if spec.calibration == Calibrator.MINMAX:
            prepared.ranges[name] = calibrations[spec.calib].input_range(name, smoothing)
        else:
            histograms.setdefault(spec.calib, {})[name] = (spec.calibration, spec.percentile)
    if not histograms:
        return
    from engine.quant.calibrators import static_ranges

    for size, layers in histograms.items():
        divisors = {name: smoothing.factor(name) for name in layers
                    if smoothing is not None and smoothing.factor(name) is not None}
        ranges = static_ranges(model, tokenizer, calibration_texts(pool, size), layers, divisors or None)
        for name, (low, high) in ranges.items():
            prepared.ranges[name] = (torch.tensor([float(low)]), torch.tensor([float(high)]))


def _smoothed_weight(model: nn.Module, name: str, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = linear_parts(model.get_submodule(name))
    if prepared.transform_key(name) is not None:
        weight, bias, _ = prepared.smoothing.transformed(name, weight, bias)
    return weight.float(), None if bias is None else bias.float()


def _method_weights(model, plan: Plan, linear, calibrations, prepared: Prepared) -> None:
    """GPTQ's and HQQ's int4 integers, on the plan's runtime grid, memoized with the simulated weights."""
    chosen = {name: spec for name, spec in linear.items()
              if spec.precision == "int4" and spec.method in (WeightMethod.GPTQ, WeightMethod.HQQ)}
    if not chosen:
        return
    from engine.quant.int4_methods import gptq, hqq

    model_key = fingerprint(model)
    for name, spec in chosen.items():
        weight, _ = _smoothed_weight(model, name, prepared)
        transform = prepared.transform_key(name)
        if spec.method == WeightMethod.HQQ:
            key = (model_key, name, WeightMethod.HQQ, plan.runtime, spec.group_size, transform)
            prepared.weights[name] = memoized_weight(key, lambda: hqq(weight, spec.group_size, plan.runtime))
            continue
        calibration = calibrations[spec.calib]
        hessian = calibration.hessian[name]
        factor = prepared.smoothing.factor(name) if prepared.smoothing is not None else None
        if factor is not None:  # the layer reads x / s: its Hessian is S^-1 H S^-1
            inverse = 1.0 / factor.double()
            hessian = hessian * inverse[:, None] * inverse[None, :]
        key = (model_key, name, WeightMethod.GPTQ, plan.runtime, spec.group_size, spec.damp, spec.act_order,
               calibration.key, calibration.n, transform)
        prepared.weights[name] = memoized_weight(
            key, lambda: gptq(weight, hessian, spec.group_size, plan.runtime, spec.damp, spec.act_order))


def _bias_corrections(model, plan: Plan, linear, calibrations, prepared: Prepared) -> None:
    """b + (W - Q(W)) E[x]: the layer's mean output over the calibration inputs kept as in FP32."""
    model_key = fingerprint(model)
    for name, spec in linear.items():
        if not spec.bias_correction:
            continue
        weight, bias = _smoothed_weight(model, name, prepared)
        mean = calibrations[spec.calib].mean[name].float()
        factor = prepared.smoothing.factor(name) if prepared.smoothing is not None else None
        if factor is not None:
            mean = mean / factor
        quantized = quantized_values(model_key, name, spec, weight, plan, prepared, prepared.transform_key(name))
        shift = (weight - quantized.float()) @ mean.to(weight.device)
        prepared.biases[name] = shift if bias is None else bias + shift


def build(model: nn.Module, tokenizer, plan: Plan, kernels: str, pool: Sequence[str], source: str = "") -> nn.Module:
    """The plan's model (prepared from `pool` when it needs calibration)."""
    return apply_plan(model, plan, kernels, prepared=prepare(model, tokenizer, plan, pool, source))
