"""The layer map's rules: the weight method (and its options) beside the precision a click sets, and how a
cell and the history name a layer's rule. Plain functions, importable without running a page."""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from engine.core.plan import Plan
from engine.core.rules import METHOD_PRECISIONS, QUANTIZED, LayerSpec, Rule
from engine.core.vocabulary import ActScheme, Calibrator, WeightMethod

CYCLE = "cycle"  # the click action that steps FP32 -> INT8 -> INT4 rather than setting one precision
CYCLED = ("int8", "int4")  # the precisions of the cycle a method can apply to
GROUP_SIZES = (16, 32, 64, 128, 256)
state = st.session_state


@dataclass(frozen=True)
class ClickChoice:
    """What a click sets besides its precision. Each option applies only to the precisions that take it, so a
    cycle's FP32 step stays plain FP32 and GPTQ rides along on its INT4 step only."""

    method: WeightMethod = WeightMethod.RTN
    bias_correction: bool = False
    group_size: int | None = None  # int4's; None: the plan's
    act: ActScheme | None = None  # int8's; None: the plan's
    calibration: Calibrator | None = None  # static int8's; None: the plan's

    def rule(self, plan: Plan, precision: str) -> Rule:
        """The rule for `precision`: the chosen options it takes that differ from the plan's own (a rule repeating
        the plan's defaults would only give the same plan another cache key)."""
        act = self.act if self.act is not None else plan.act
        wanted = {
            "method": self.method if precision in METHOD_PRECISIONS[self.method] else None,
            "bias_correction": True if self.bias_correction and precision in QUANTIZED else None,
            "group_size": self.group_size if precision == "int4" else None,
            "act": self.act if precision == "int8" else None,
            "calibration": self.calibration if precision == "int8" and act == ActScheme.STATIC else None,
        }
        return Rule(precision, tuple((name, value) for name, value in wanted.items()
                                     if value is not None and value != getattr(plan, name)))


def method_choices(action: str) -> list[WeightMethod]:
    """The methods a click action's precision takes (the cycle: those that take INT8 or INT4), RTN first."""
    targets = CYCLED if action == CYCLE else (action,)
    return [method for method in WeightMethod if any(p in METHOD_PRECISIONS[method] for p in targets)]


def method_tag(spec: LayerSpec) -> str:
    """The cell's word for a layer's method: empty for round-to-nearest (most cells), else the method's name,
    with "+BC" when the layer's bias is corrected. The other options are in the cell's hover."""
    words = [spec.method.value.upper()] if spec.method != WeightMethod.RTN else []
    return "+".join(words + (["BC"] if spec.bias_correction else []))


def cell_text(precision: str, tag: str) -> str:
    return f"{precision.upper()}·{tag}" if tag else precision.upper()


def click_tags(choice: ClickChoice, plan: Plan, action: str, precisions: list[str]) -> dict[str, str]:
    """For each precision a click can set, the tag its cell shows at once, before the server answers."""
    targets = precisions if action == CYCLE else [action]
    return {p: method_tag(spec_of(plan, choice.rule(plan, p))) for p in targets}


def spec_of(plan: Plan, rule: Rule) -> LayerSpec:
    """What `rule` makes of a layer under `plan`'s options."""
    return plan.with_rules([("*", rule)]).specs(["layer"], strict=False)["layer"]


def _keep_valid(key: str, options: list) -> None:
    """Drop a remembered choice the new options no longer hold (GPTQ after the click switched to INT8)."""
    if key in state and state[key] not in options:
        del state[key]


def method_controls(action: str, plan: Plan) -> ClickChoice:
    """Beside the click's precision: the weight method the precision takes (RTN by default), bias correction,
    INT4's group size, and INT8's activation scheme with, for static activations, its calibrator."""
    methods = method_choices(action)
    quantizes = action == CYCLE or action in QUANTIZED
    columns = st.columns(5, vertical_alignment="bottom")
    _keep_valid("lm_method", methods)
    method = columns[0].selectbox("Method", methods, format_func=lambda m: m.value.upper(), key="lm_method",
                                  disabled=not quantizes,
                                  help="How a click's layer gets its integers: round to nearest, or GPTQ, AWQ, HQQ "
                                       "(a method applies to the precisions it takes: GPTQ and HQQ INT4, AWQ both)")
    group_size = act = calibration = None
    if action in (CYCLE, "int4"):
        group_size = columns[1].number_input("INT4 group size", 1, 4096, plan.group_size, key="lm_group_size",
                                             help="weights sharing one scale and zero point along a row")
    if action in (CYCLE, "int8"):
        act = columns[2].selectbox("INT8 activations", list(ActScheme), index=list(ActScheme).index(plan.act),
                                   key="lm_act", help="dynamic per tensor, static (calibrated), or per token")
        if act == ActScheme.STATIC:
            calibration = columns[3].selectbox("Calibrator", list(Calibrator),
                                               index=list(Calibrator).index(plan.calibration), key="lm_calibration",
                                               help="how the static activation ranges are chosen")
    bias_correction = columns[4].checkbox("bias correction", key="lm_bias_correction", disabled=not quantizes,
                                          help="corrects each output's mean shift from quantization on calibration "
                                               "data")
    return ClickChoice(WeightMethod(method), bias_correction, None if group_size is None else int(group_size),
                       act, calibration)
