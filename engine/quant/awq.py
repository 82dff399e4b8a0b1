"""AWQ (Lin et al. 2023, activation-aware weight quantization): per input channel s = mean|X|^a, normalised by
sqrt(max(s) * min(s)), weights times s and inputs divided by s, the exponent a searched so that the quantized
layers' outputs stay closest to the float ones on calibration rows. Channels that carry large inputs get larger
weights, hence a smaller relative rounding error where it matters most.

This module only searches; `engine.quant.smoothing.smooth` records the factor in a `Smoothing` (folded where
SmoothQuant folds), so apply_plan and the ONNX export apply AWQ with no path of their own.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from engine.core.precisions import PRECISIONS
from engine.core.rules import LayerSpec
from engine.core.vocabulary import WeightMethod
from engine.model.graph import model_graph

GRID = 20  # exponents a = 0, 1/20, ..., 19/20: a = 0 (s = 1, plain rounding) is always a candidate

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def exponents() -> list[float]:
    return [i / GRID for i in range(GRID)]


def awq_scale(x_mean: torch.Tensor, exponent: float) -> torch.Tensor:
    """mean|X|^a per input channel over sqrt(max * min) of it, so the weights' overall scale stays put.
    `x_mean` must be positive (the caller floors dead channels)."""
    s = x_mean.float().pow(exponent)
    return s / (s.max() * s.min()).sqrt()


def weight_quantizer(spec: LayerSpec, runtime: str, int8_weight_bits: int) -> Quantizer:
    """The values a layer with `spec` computes with on `runtime`: its precision's own weight quantizer."""
    weight = PRECISIONS[spec.precision].numerics_for(runtime, int8_weight_bits).weight
    return lambda w: weight(w, spec.group_size)


def output_error(samples: torch.Tensor, weights: Sequence[torch.Tensor], quantizers: Sequence[Quantizer],
                 factor: torch.Tensor) -> float:
    """sum over layers of || (X / s) Q(W * s)^T - X W^T ||^2 on the sample rows X (biases cancel)."""
    x = samples.float()
    scaled = x / factor
    total = 0.0
    for weight, quantize in zip(weights, quantizers):
        reference = x @ weight.T
        total += float((scaled @ quantize(weight * factor).float().T - reference).double().pow(2).sum())
    return total


def search(x_mean: torch.Tensor, samples: torch.Tensor, weights: Sequence[torch.Tensor],
           quantizers: Sequence[Quantizer]) -> tuple[float, torch.Tensor]:
    """(a, s) with the least summed output error over the grid; the first (smallest) a wins a tie, so a = 0
    (plain rounding) is kept unless scaling really helps on these rows."""
    weights = [w.detach().float().cpu() for w in weights]
    best = None
    for exponent in exponents():
        factor = awq_scale(x_mean, exponent)
        error = output_error(samples, weights, quantizers, factor)
        if best is None or error < best[0]:
            best = (error, exponent, factor)
    return best[1], best[2]


def awq_groups(model: nn.Module, specs: Mapping[str, LayerSpec]) -> list[tuple[str, ...]]:
    """The groups of layers reading one input in which some layer's method is AWQ (they share one s)."""
    return [group.layers for group in model_graph(model).groups
            if any(specs[name].method == WeightMethod.AWQ for name in group.layers if name in specs)]


def awq_search_cost(model: nn.Module, specs: Mapping[str, LayerSpec]) -> int:
    """Candidate evaluations AWQ's search makes under `specs`: per AWQ group, one quantize-and-multiply of each of
    its layers per grid exponent (what a page multiplies by a per-layer time to estimate the wait)."""
    return sum(GRID * len(names) for names in awq_groups(model, specs))
