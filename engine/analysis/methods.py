"""Quantization methods side by side: INT4 weights by RTN, HQQ, AWQ and GPTQ at several group sizes, and W8A8
with static activation ranges from each calibrator, all on the one evaluation path.

Every row carries its Wilson interval, its agreement with FP32 and two exact McNemar tests: against FP32, and
against the same setting's plain choice (RTN at that group size; minmax for a calibrator), which is the question
a method answers: does it change predictions beyond what rounding alone does. Methods apply to the Linear layers;
the embedding table takes the same precision by RTN (no method here has a Hessian or activations for a lookup).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from engine.analysis.sensitivity import COST_ORDER
from engine.core.plan import Plan
from engine.core.rules import DEFAULT_CALIB, METHOD_PRECISIONS, Rule
from engine.core.stats import SIGNIFICANCE, mcnemar_exact
from engine.core.vocabulary import ActScheme, Calibrator, WeightMethod
from engine.evaluation.evaluator import EvalResult, Evaluator
from engine.model.inventory import Layer
from engine.quant.awq import GRID as AWQ_GRID
from engine.quant.calibration import SAMPLE_ROWS

PER_CHANNEL = None  # a group size of None: one group per row (see per_channel_group)
DEFAULT_GROUPS: tuple[int | None, ...] = (PER_CHANNEL, 128, 32)
CURVE_SIZES = (16, 32, 64, 128, 256, 512)
HQQ_ITERATIONS = 20  # half-quadratic steps per group (ONNX Runtime's HQQ quantizer's default)
AWQ_ROWS = 4 * SAMPLE_ROWS  # the calibration token rows a layer's AWQ search runs on (the calibration keeps these)
TEXT_TOKENS = 32.0  # tokens a calibration text has, for the estimate

Progress = Callable[[float, str], None]


# ---- the plans -------------------------------------------------------------------------------
def per_channel_group(layers: Sequence[Layer]) -> int:
    """A group size no row is longer than, so each row is one group (a power of two, for readable plans; a
    shorter row's one group is padded with its last value, inside its range).

    The comparison runs on torch's numerics: per channel is a torch setting. ONNX Runtime's MatMulNBits takes
    power-of-two blocks of the row, and is not asked here to take one longer than the row itself."""
    width = max(layer.shape[1] for layer in layers)
    return 1 << (width - 1).bit_length()


def group_label(group_size: int | None) -> str:
    return "per channel" if group_size is None else f"g{group_size}"


def _embeddings(layers: Sequence[Layer]) -> list[str]:
    return [layer.name for layer in layers if layer.kind == "embedding"]


def int4_plan(layers: Sequence[Layer], method: WeightMethod, group_size: int | None) -> Plan:
    """INT4 on every layer: `method` on the Linears, RTN on the embedding table, `group_size` on all."""
    group = per_channel_group(layers) if group_size is None else group_size
    options = (("group_size", group),) + ((("method", method.value),) if method != WeightMethod.RTN else ())
    rules = [("*", Rule("int4", options))] + [(name, Rule("int4", (("group_size", group),)))
                                             for name in _embeddings(layers)]
    return Plan(rules=tuple(rules))


def static_plan(layers: Sequence[Layer], calibrator: Calibrator, calib: int = DEFAULT_CALIB) -> Plan:
    """W8A8 with static activation ranges chosen by `calibrator` from `calib` texts; the embedding table int8."""
    rule = Rule("int8", (("act", ActScheme.STATIC.value), ("calibration", calibrator.value)))
    rules = [("*", rule)] + [(name, Rule("int8")) for name in _embeddings(layers)]
    return Plan(rules=tuple(rules), calib=calib)


@dataclass(frozen=True)
class MethodPlan:
    """One setting to evaluate: its label, what it varies, and the label of the row it is tested against."""

    label: str
    plan: Plan
    precision: str
    method: WeightMethod
    group_size: int | None  # int4 rows (None: per channel)
    calibrator: Calibrator | None  # W8A8-static rows
    versus: str | None  # the same setting's RTN (or minmax) row; None for that row itself


def method_plans(layers: Sequence[Layer], group_sizes: Sequence[int | None] = DEFAULT_GROUPS,
                 methods: Iterable[WeightMethod] = tuple(WeightMethod),
                 calibrators: Iterable[Calibrator] = tuple(Calibrator)) -> list[MethodPlan]:
    """INT4 by every method that takes INT4 at every group size (RTN always, as the reference), then W8A8-static
    by every calibrator (minmax always, as the reference)."""
    chosen = [m for m in COST_ORDER if m in set(methods) | {WeightMethod.RTN} and "int4" in METHOD_PRECISIONS[m]]
    out = []
    for group in group_sizes:
        reference = f"int4 rtn {group_label(group)}"
        for method in chosen:
            label = f"int4 {method.value} {group_label(group)}"
            out.append(MethodPlan(label, int4_plan(layers, method, group), "int4", method, group, None,
                                  None if label == reference else reference))
    calibs = [c for c in Calibrator if c in set(calibrators) | {Calibrator.MINMAX}]
    for calibrator in calibs:
        label = f"w8a8 static {calibrator.value}"
        out.append(MethodPlan(label, static_plan(layers, calibrator), "int8", WeightMethod.RTN, None, calibrator,
                              None if calibrator == Calibrator.MINMAX else f"w8a8 static {Calibrator.MINMAX.value}"))
    return out


# ---- the results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodRow:
    """One setting measured on the whole set."""

    label: str
    precision: str
    method: WeightMethod
    group_size: int | None
    calibrator: Calibrator | None
    accuracy: float
    ci95: tuple[float, float]
    agreement: float  # share of predictions equal to FP32's
    flips: int
    kl: float
    n: int
    mcnemar_p_fp32: float  # correctness against FP32's, exact McNemar
    versus: str | None
    mcnemar_p_versus: float | None  # correctness against the `versus` row's; None for that row itself
    prepare_s: float  # the method's (or calibrator's) own work: this row's measured seconds beyond its `versus` row's
    seconds: float  # the whole evaluation, building (calibration, the method) included, measured
    plan: Plan

    @property
    def significant(self) -> bool:
        """Whether it predicts differently from its reference row beyond noise."""
        return self.mcnemar_p_versus is not None and self.mcnemar_p_versus < SIGNIFICANCE

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(ci95=list(self.ci95), method=self.method.value, plan=self.plan.to_json(),
                    calibrator=None if self.calibrator is None else self.calibrator.value)
        return data

    @classmethod
    def from_json(cls, stored: dict) -> "MethodRow":
        return cls(**{**stored, "ci95": tuple(stored["ci95"]), "method": WeightMethod(stored["method"]),
                      "plan": Plan.from_json(stored["plan"]),
                      "calibrator": None if stored["calibrator"] is None else Calibrator(stored["calibrator"])})


@dataclass(frozen=True)
class MethodsReport:
    rows: tuple[MethodRow, ...]
    fp32_accuracy: float
    data: str
    n: int
    seconds: float

    def row(self, label: str) -> MethodRow:
        return next(row for row in self.rows if row.label == label)

    def to_json(self) -> dict:
        return {"data": self.data, "n": self.n, "fp32_accuracy": self.fp32_accuracy, "seconds": self.seconds,
                "rows": [row.to_json() for row in self.rows]}

    @classmethod
    def from_json(cls, stored: dict) -> "MethodsReport":
        return cls(rows=tuple(MethodRow.from_json(row) for row in stored["rows"]),
                   fp32_accuracy=stored["fp32_accuracy"], data=stored["data"], n=stored["n"],
                   seconds=stored["seconds"])


@dataclass(frozen=True)
class CurvePoint:
    """W8A8-static accuracy with `texts` calibration texts (fewer than `requested` when the pool is smaller)."""

    calibrator: Calibrator
    requested: int
    texts: int
    accuracy: float
    ci95: tuple[float, float]
    agreement: float
    mcnemar_p_fp32: float
    seconds: float

    def to_json(self) -> dict:
        return {**asdict(self), "calibrator": self.calibrator.value, "ci95": list(self.ci95)}

    @classmethod
    def from_json(cls, stored: dict) -> "CurvePoint":
        return cls(**{**stored, "calibrator": Calibrator(stored["calibrator"]), "ci95": tuple(stored["ci95"])})


def _correct(evaluator: Evaluator, result: EvalResult) -> np.ndarray:
    return result.predictions == evaluator.labels


def compare_methods(evaluator: Evaluator, plans: Sequence[MethodPlan] | None = None,
                    progress: Progress | None = None) -> MethodsReport:
    """Every setting of `plans` (default: `method_plans` of the evaluator's layers), evaluated and tested."""
    started = time.perf_counter()
    plans = list(plans) if plans is not None else method_plans(evaluator.layers)
    names = [layer.name for layer in evaluator.layers]
    for item in plans:  # every plan is checked before any is run: a bad one fails at once
        item.plan.specs(names)
    results: dict[str, EvalResult] = {}
    for index, item in enumerate(plans):
        if progress is not None:
            progress(index / len(plans), f"preparing and evaluating {item.label}")
        results[item.label] = evaluator.run(item.plan)[0]
    if progress is not None:
        progress(1.0, "done")
    rows = []
    for item in plans:
        result = results[item.label]
        c = result.comparison
        # A run builds, then evaluates on the same kernels as its reference row, which rounds (or calibrates
        # by minmax) only: the difference is what the method adds. Timing the build on its own would build twice.
        versus = results.get(item.versus) if item.versus else None
        rows.append(MethodRow(
            item.label, item.precision, item.method, item.group_size, item.calibrator, c.accuracy, tuple(c.ci95),
            c.agreement, c.flips, c.kl, c.n, c.mcnemar_p, item.versus if versus else None,
            mcnemar_exact(_correct(evaluator, versus), _correct(evaluator, result)) if versus else None,
            max(0.0, result.seconds - versus.seconds) if versus else 0.0, result.seconds, item.plan))
    base = evaluator.baseline.comparison
    return MethodsReport(tuple(rows), base.accuracy, evaluator.dataset.name, base.n, time.perf_counter() - started)


def calibration_curve(evaluator: Evaluator, calibrator: Calibrator, sizes: Sequence[int] = CURVE_SIZES,
                      progress: Progress | None = None) -> list[CurvePoint]:
    """W8A8-static accuracy per calibration size; sizes past the calibration pool give one point (all of it)."""
    pool = len(evaluator.dataset.calibration)
    points, seen = [], set()
    for index, size in enumerate(sorted(sizes)):
        texts = min(size, pool)
        if texts in seen:
            continue
        seen.add(texts)
        if progress is not None:
            progress(index / len(sizes), f"{calibrator.value} on {texts} texts")
        result = evaluator.run(static_plan(evaluator.layers, calibrator, texts))[0]
        c = result.comparison
        points.append(CurvePoint(calibrator, size, texts, c.accuracy, tuple(c.ci95), c.agreement, c.mcnemar_p,
                                 result.seconds))
    return points


# ---- what it will cost -----------------------------------------------------------------------
def method_flops(layers: Sequence[Layer], method: WeightMethod, calib: int) -> float:
    """Operations a method's preparation costs on the model's Linears (RTN: none worth counting).

    GPTQ: the Hessian X^T X (tokens x in^2), its inverse (in^3) and the column-by-column update (out x in^2).
    AWQ: AWQ_GRID candidate scales, each a pass of the layer over its sampled calibration rows (2 x rows x in x
    out). HQQ: HQQ_ITERATIONS passes over the weights, about ten operations an element."""
    tokens = calib * TEXT_TOKENS
    total = 0.0
    for layer in layers:
        if layer.kind != "linear":
            continue
        out_f, in_f = layer.shape
        if method == WeightMethod.GPTQ:
            total += tokens * in_f**2 + in_f**3 + out_f * in_f**2
        elif method == WeightMethod.AWQ:
            total += AWQ_GRID * 2 * min(tokens, AWQ_ROWS) * in_f * out_f
        elif method == WeightMethod.HQQ:
            total += HQQ_ITERATIONS * 10 * in_f * out_f
    return total


def machine_flops(size: int = 384, repeats: int = 5) -> float:
    """Float32 operations a second this process's matrix products reach now (a few milliseconds to measure), so an
    estimate follows the machine, its thread count and its load."""
    a = torch.randn(size, size)
    torch.mm(a, a)  # warm-up: the first product pays for allocation
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, a)
    return 2 * size**3 * repeats / max(time.perf_counter() - started, 1e-9)


def estimate_cost(plans: Sequence[MethodPlan], layers: Sequence[Layer], eval_seconds: float, n_examples: int,
                  flops_per_s: float | None = None) -> float:
    """About how many seconds `compare_methods` takes, before running it: one evaluation per plan (from a
    measured one, `eval_seconds` for `n_examples`), a calibration pass per calibrated plan (the same rate per
    text), and each method's own work at `flops_per_s` (default: this machine's, measured)."""
    flops_per_s = flops_per_s or machine_flops()
    total = 0.0
    for item in plans:
        total += eval_seconds
        spec = item.plan.specs([layer.name for layer in layers])
        calibrated = any(s.needs_calibration for s in spec.values())
        if calibrated:
            total += eval_seconds * item.plan.calib / max(n_examples, 1)
        total += method_flops(layers, item.method, item.plan.calib) / flops_per_s
    return total
