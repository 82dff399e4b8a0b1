"""Prepare, then convert: the calibration and smoothing a plan needs, from the caller's calibration
texts, and the plan's model built from them. Plans that need neither are built directly."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from engine.core.plan import Plan
from engine.quant.apply import apply_plan
from engine.quant.calibration import Calibration, calibrate, calibration_texts
from engine.quant.smoothing import Smoothing, smooth


def prepare(model: nn.Module, tokenizer, plan: Plan, pool: Sequence[str],
            source: str = "") -> tuple[Calibration | None, Smoothing | None]:
    """(calibration, smoothing) for `plan`: calibrated on a seeded sample of `pool` (plan.calib texts)."""
    if not plan.needs_calibration:
        return None, None
    calibration = calibrate(model, tokenizer, calibration_texts(pool, plan.calib), source)
    return calibration, smooth(model, plan, calibration) if plan.smooth_alpha is not None else None


def build(model: nn.Module, tokenizer, plan: Plan, kernels: str, pool: Sequence[str], source: str = "") -> nn.Module:
    """The plan's model (prepared from `pool` when it needs calibration)."""
    calibration, smoothing = prepare(model, tokenizer, plan, pool, source)
    return apply_plan(model, plan, kernels, calibration=calibration, smoothing=smoothing)
