"""What a plan's model is built from besides the FP32 weights: everything `engine.quant.prepare.prepare` computes
from calibration data (or, for HQQ, from the weights alone), once, for `apply_plan` and the ONNX export to use.

Keeping it in one value is what makes the simulation equal the export: both read the same integers, scales
and biases instead of computing them twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prepared:
    """A plan's prepared state (all optional: a plan that needs none of it is built from the weights alone).

    calibration: the statistics at the plan's own calibration size (what the SmoothQuant views show);
    smoothing: SmoothQuant's and AWQ's per-input-channel factors (engine.quant.smoothing.Smoothing);
    weights: int4 integers a method chose (GPTQ, HQQ), per layer, on the plan's runtime grid
        (engine.quant.int4_methods.Int4Weights), used verbatim by the simulation, torch's int4 module and
        the exported MatMulNBits;
    biases: bias-corrected biases, per layer (b + (W - Q(W)) E[x] over the calibration inputs);
    ranges: each static int8 layer's calibrated input range (low, high), after smoothing, from its calibrator.
    """

    calibration: object | None = None
    smoothing: object | None = None
    weights: dict[str, object] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def transform_key(self, name: str) -> str | None:
        """Names this layer's smoothed weight for the weight cache; None when smoothing leaves it alone."""
        return self.smoothing.transform_key(name) if self.smoothing is not None else None
