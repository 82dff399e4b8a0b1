"""SmoothQuant as an analysis: W8A8 accuracy at each alpha against W8A8 without smoothing, the FP32
invariant, per-layer automatic alpha, and the outlier view (per-channel ranges and SQNR before and
after). The smoothing itself is engine.quant.smoothing; calibration comes from the evaluated source's
calibration pool (engine.quant.prepare), never from its evaluated rows.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.torch_int8 import int8_linear_weight
from engine.core.numerics import fake_quant_activation, int8_reduce_range, sqnr_db, static_qparams
from engine.core.plan import DEFAULT_CALIB, Plan
from engine.core.qmodules import linear_parts
from engine.core.stats import paired_gain
from engine.core.vocabulary import ActScheme
from engine.evaluation.evaluator import EvalResult, Evaluator
from engine.model.graph import model_graph
from engine.model.inventory import inventory
from engine.quant.calibration import Calibration
from engine.quant.prepare import prepare
from engine.quant.smoothing import EPS, weight_absmax, smooth, smoothing_factor

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
Runner = Callable[[Plan], EvalResult]


def smoothed_plan(alpha: float | dict[str, float] | None, act: str = ActScheme.STATIC, calib: int = DEFAULT_CALIB,
                  precision: str = "int8") -> Plan:
    """Uniform W8A8 (or smoothing alone with precision fp32) with a global or per-layer alpha."""
    alphas = tuple(alpha.items()) if isinstance(alpha, dict) else alpha
    rules = () if precision == "fp32" else (("*", precision),)
    return Plan(rules, act=act if precision == "int8" else ActScheme.DYNAMIC, smooth_alpha=alphas, calib=calib)


def calibration_for(evaluator: Evaluator, calib: int = DEFAULT_CALIB) -> Calibration:
    """The calibration a W8A8 plan with `calib` sentences gets on this evaluator's source."""
    return prepare(evaluator.model, evaluator.tokenizer, smoothed_plan(None, ActScheme.STATIC, calib),
                   evaluator.dataset.calibration, evaluator.dataset.calibration_source).calibration


# ---- per-layer error: SQNR and automatic alpha ----------------------------------------------------
def _error_energy(model: nn.Module, calibration: Calibration, name: str, factor: torch.Tensor | None,
                  act: str) -> tuple[float, float]:
    """(signal energy, error energy) of this layer's W8A8 output on the calibration samples."""
    x = calibration.samples[name]
    weight, bias = linear_parts(model.get_submodule(name))
    weight = weight.float().cpu()
    bias = None if bias is None else bias.float().cpu()
    reference = F.linear(x, weight, bias)
    low, high = calibration.low[name], calibration.high[name]
    if factor is not None:
        x, weight, low, high = x / factor, weight * factor, low / factor, high / factor
    static = static_qparams(low, high, int8_reduce_range()) if act == ActScheme.STATIC else None
    quantized = F.linear(fake_quant_activation(x, act, int8_reduce_range(), static), int8_linear_weight(weight), bias)
    return float(reference.pow(2).sum()), float((reference - quantized).pow(2).sum())


def layer_sqnr(model: nn.Module, calibration: Calibration, name: str, factor: torch.Tensor | None, act: str) -> float:
    """Signal-to-quantization-noise ratio (dB) of this layer's W8A8 output, on calibration inputs."""
    return sqnr_db(*_error_energy(model, calibration, name, factor, act))


_AUTO: dict[tuple, dict[str, float]] = {}


def auto_alphas(model: nn.Module, calibration: Calibration, act: str = ActScheme.STATIC,
                grid: Sequence[float] = ALPHA_GRID,
                progress: Callable[[float], None] | None = None) -> dict[str, float]:
    """Per layer, the alpha in `grid` whose smoothed W8A8 output has the least error on calibration data.

    Layers reading one input (q/k/v) share one divisor, so one alpha: the one minimizing the sum of
    their relative errors. Ties go to the smaller alpha. Memoized per (calibration, act, grid).
    """
    key = (calibration.key, act, tuple(grid))
    if key in _AUTO:
        return dict(_AUTO[key])
    groups = [group.layers for group in model_graph(model).groups if group.layers[0] in calibration.samples]
    chosen: dict[str, float] = {}
    for index, names in enumerate(groups):
        w_absmax = weight_absmax(model, names)
        best, best_error = None, math.inf
        for alpha in grid:
            factor = smoothing_factor(calibration.absmax(names[0]), w_absmax, alpha)
            error = 0.0
            for name in names:
                signal, noise = _error_energy(model, calibration, name, factor, act)
                error += noise / max(signal, 1e-30)
            if error < best_error:
                best, best_error = float(alpha), error
        chosen.update({name: best for name in names})
        if progress is not None:
            progress((index + 1) / len(groups))
    _AUTO[key] = chosen
    return dict(chosen)


def sqnr_table(model: nn.Module, calibration: Calibration, plan: Plan) -> list[dict]:
    """Per Linear: its alpha, the form its smoothing took, and W8A8 SQNR (dB) without and with it."""
    smoothing = smooth(model, plan, calibration)
    rows = []
    for row in smoothing.forms(model):
        name = row["layer"]
        if name not in calibration.samples:
            continue
        factor = smoothing.factor(name)
        before = layer_sqnr(model, calibration, name, None, plan.act)
        after = before if factor is None else layer_sqnr(model, calibration, name, factor, plan.act)
        rows.append({**row, "sqnr_before_db": before, "sqnr_after_db": after})
    return rows


def outlier_view(model: nn.Module, calibration: Calibration, name: str, alpha: float, act: str) -> dict:
    """One layer's per-channel max|X| and max|W| before and after smoothing, and its SQNR before and after."""
    smoothing = smooth(model, Plan(smooth_alpha=alpha), calibration)
    factor = smoothing.factor(name)
    if factor is None:
        raise ValueError(f"layer {name!r} is not a Linear, so it has no smoothing")
    x = calibration.absmax(name)
    weight = linear_parts(model.get_submodule(name))[0].float().cpu()
    role = next(layer.role for layer in inventory(model) if layer.name == name)
    return {"layer": name, "role": role, "form": smoothing.layers[name].form, "alpha": alpha,
            "x_before": x.numpy(), "x_after": (x / factor).numpy(),
            "w_before": weight.abs().amax(0).numpy(), "w_after": (weight * factor).abs().amax(0).numpy(),
            "factor": factor.numpy(), "sqnr_before_db": layer_sqnr(model, calibration, name, None, act),
            "sqnr_after_db": layer_sqnr(model, calibration, name, factor, act)}


def activation_ranges(model: nn.Module, calibration: Calibration) -> dict[int, tuple[list[str], np.ndarray]]:
    """max|X| per channel for each distinct Linear input (layers reading one input share a row), grouped by
    input width: {width: (row labels, matrix [inputs, channels])}, the heatmap of activation ranges."""
    roles = {layer.name: layer for layer in inventory(model)}
    rows: dict[int, tuple[list[str], list[np.ndarray]]] = {}
    for group in model_graph(model).groups:
        first = roles[group.layers[0]]
        if first.name not in calibration.low:
            continue
        where = "head" if first.block is None else str(first.block)
        label = f"{where}·{'/'.join(roles[n].role for n in group.layers)} in"
        absmax = calibration.absmax(first.name).numpy()
        labels, values = rows.setdefault(absmax.shape[0], ([], []))
        labels.append(label)
        values.append(absmax)
    return {width: (labels, np.stack(values)) for width, (labels, values) in rows.items()}


def most_outlying(calibration: Calibration) -> str:
    """The Linear whose input has the largest ratio of its biggest channel range to the median one."""
    def ratio(name: str) -> float:
        absmax = calibration.absmax(name)
        return float(absmax.max() / absmax.median().clamp(min=EPS))
    return max(calibration.low, key=ratio)


# ---- evaluation: the CLI's rows and the page's sweep ----------------------------------------------
def max_logit_diff(evaluator: Evaluator, alpha: float | dict[str, float], calib: int = DEFAULT_CALIB,
                   run: Runner | None = None) -> float:
    """max |logits(smoothing alone) - logits(FP32)| over the evaluator's set: the invariant."""
    run = run or (lambda plan: evaluator.run(plan)[0])
    result = run(smoothed_plan(alpha, calib=calib, precision="fp32"))
    return float(np.abs(result.logits - evaluator.baseline_logits).max())


def alpha_rows(evaluator: Evaluator, alphas: Sequence[float | str], act: str = ActScheme.STATIC,
               calib: int = DEFAULT_CALIB,
               invariant: bool = True, progress: Callable[[float, str], None] | None = None,
               run: Runner | None = None) -> list[dict]:
    """One row per alpha ('auto' = per-layer automatic alpha): W8A8 with that smoothing against W8A8
    without it, the paired gain with its bootstrap interval, and the FP32 invariant.

    `run` evaluates a plan (default: the evaluator's one path; the pages pass a memoized one).
    """
    run = run or (lambda plan: evaluator.run(plan)[0])
    labels = np.asarray(evaluator.labels)
    base = run(smoothed_plan(None, act, calib))
    calibration = calibration_for(evaluator, calib)
    rows = []
    for index, alpha in enumerate(alphas):
        if progress is not None:
            progress(index / len(alphas), f"alpha {alpha}")
        value = auto_alphas(evaluator.model, calibration, act) if alpha == "auto" else float(alpha)
        plan = smoothed_plan(value, act, calib)
        result = run(plan)
        comparison = result.comparison
        difference, interval = paired_gain(labels, base.predictions, result.predictions)
        rows.append({"alpha": alpha if alpha == "auto" else float(alpha), "accuracy": comparison.accuracy,
                     "ci95": list(comparison.ci95), "agreement": comparison.agreement, "kl": comparison.kl,
                     "w8a8_accuracy": base.comparison.accuracy,
                     "fp32_max_logit_diff": max_logit_diff(evaluator, value, calib, run) if invariant else None,
                     "w8a8_ci95": list(base.comparison.ci95), "gain": difference, "gain_ci95": list(interval),
                     "flips": comparison.flips, "n": comparison.n, "act": act, "calib": calibration.n,
                     "calibration": evaluator.dataset.calibration_source, "plan": plan.to_json()})
    if progress is not None:
        progress(1.0, "done")
    return rows


def best_row(rows: Sequence[dict]) -> dict:
    """The row with the highest accuracy (then agreement with FP32, then the smaller alpha)."""
    return max(rows, key=lambda row: (row["accuracy"], row["agreement"],
                                      -float(row["alpha"]) if row["alpha"] != "auto" else 0.0))
