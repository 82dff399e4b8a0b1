"""Automatic mixed precision: the smallest plan that meets a budget, built from a sensitivity sweep.

Greedy, in the spirit of AIMET's AMP and NNCF's accuracy-aware quantization: layers are quantized in
order of measured accuracy cost per byte saved (INT4 where it is cheap, INT8 elsewhere, FP32 where
nothing fits). Single-layer drops compound, so no candidate is judged by its predicted drop: every
candidate plan is evaluated for real (on the one evaluation path, starting where it differs from a
plan already run), and the answer is read off the verified candidates' Pareto front.

A sweep with rows by other weight methods (GPTQ, AWQ, HQQ) lets a step set a layer's method too: among a
layer's rows at one precision the cheapest in accuracy is the one its step takes, and the candidates' plans
carry it in their rules.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import nn

from engine.analysis.benchmark import bench
from engine.analysis.sensitivity import COST_ORDER, SWEEP_PRECISIONS, Row, row_key
from engine.core.errors import EngineError
from engine.core.plan import FP32, Plan
from engine.core.rules import Rule
from engine.core.stats import SIGNIFICANCE
from engine.core.vocabulary import BudgetKind, WeightMethod, names
from engine.evaluation.evaluator import Evaluator, Trace
from engine.runtime.size import model_size_bytes

LADDER = 6  # candidates spread evenly over the size range, for the front
MAX_REFINE = 12  # single-step additions tried after the bisection, each verified
KL_POINTS = 1.0  # accuracy points charged per nat of KL: breaks the many ties among whole-sentence drops


class SearchError(EngineError):
    """A budget that no plan can meet, or a sweep that does not fit the model; the message says why."""


@dataclass(frozen=True)
class Budget:
    """What the chosen plan must satisfy: a BudgetKind and its value (none for not_worse)."""

    kind: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in names(BudgetKind):
            raise SearchError(f"budget must be one of {', '.join(names(BudgetKind))}, not {self.kind!r}")
        if self.kind != BudgetKind.NOT_WORSE and (self.value is None or not math.isfinite(self.value)
                                                  or self.value < 0):
            raise SearchError(f"budget {self.kind} needs a finite value >= 0, not {self.value!r}")

    @property
    def accuracy_bound(self) -> bool:
        return self.kind in (BudgetKind.MAX_DROP, BudgetKind.NOT_WORSE)

    def describe(self) -> str:
        return _DESCRIBE[self.kind](self.value)


_DESCRIBE: dict[BudgetKind, Callable[[float | None], str]] = {
    BudgetKind.NOT_WORSE: lambda _value: f"not significantly worse than FP32 (McNemar p >= {SIGNIFICANCE})",
    BudgetKind.MAX_DROP: lambda value: f"accuracy drop at most {value:g} points",
    BudgetKind.TARGET_BYTES: lambda value: f"size at most {value:,.0f} bytes ({value / 1e6:.2f} MB)",
    BudgetKind.LATENCY_MS: lambda value: f"latency (batch 1) at most {value:g} ms",
}


@dataclass
class Candidate:
    """A verified plan: its measured accuracy and size, and the sum of its layers' single-layer drops."""

    plan: Plan
    source: str
    accuracy: float
    ci95: tuple[float, float]
    drop: float  # points against FP32, measured
    predicted_drop: float  # sum of the single-layer drops of its quantized layers
    mcnemar_p: float
    kl: float
    predicted_kl: float  # sum of the single-layer KLs: the less noisy view of compounding
    flips: int
    size_bytes: int
    layers: dict[str, int] = field(default_factory=dict)  # precision -> count
    latency_ms_p50: float | None = None

    @property
    def methods(self) -> dict[str, WeightMethod]:
        """The layers whose rule sets a weight method other than RTN, and that method."""
        return {name: WeightMethod(rule.get("method")) for name, rule in self.plan.rules
                if rule.get("method", WeightMethod.RTN) != WeightMethod.RTN}

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json(), "accuracy": self.accuracy, "ci95": list(self.ci95),
                "size_bytes": self.size_bytes, "latency_ms_p50": self.latency_ms_p50, "drop": self.drop,
                "predicted_drop": self.predicted_drop, "mcnemar_p": self.mcnemar_p, "kl": self.kl,
                "predicted_kl": self.predicted_kl, "flips": self.flips, "layers": self.layers, "source": self.source,
                "methods": {name: method.value for name, method in self.methods.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        """From `to_json()`'s dict (its "methods" are read off the plan); a missing field is a KeyError."""
        return cls(Plan.from_json(data["plan"]), data["source"], data["accuracy"], tuple(data["ci95"]), data["drop"],
                   data["predicted_drop"], data["mcnemar_p"], data["kl"], data["predicted_kl"], data["flips"],
                   data["size_bytes"], dict(data["layers"]), data["latency_ms_p50"])


@dataclass
class SearchOutcome:
    """What `search` found: the chosen plan, the front, every verified candidate and the uniform references
    (the front's, the references' and the chosen plan are among the candidates)."""

    chosen: Candidate
    front: list[Candidate]
    candidates: list[Candidate]
    references: dict[str, Candidate]  # uniform fp32 / int8 / int4
    budget: Budget
    baseline_accuracy: float
    seconds: float
    stopped: bool = False

    @property
    def latency_front(self) -> list[Candidate]:
        return latency_front(self.front)

    def to_json(self) -> dict:
        """The contract's fields (the chosen plan's, at the top), plus everything the page plots."""
        out = {key: value for key, value in self.chosen.to_json().items() if key != "source"}
        out["front"] = [c.to_json() for c in self.front]
        out.update({"budget": {"kind": self.budget.kind, "value": self.budget.value,
                               "text": self.budget.describe()},
                    "baseline_accuracy": self.baseline_accuracy,
                    "references": {name: c.to_json() for name, c in self.references.items()},
                    "candidates": [c.to_json() for c in self.candidates],
                    "latency_front": [c.to_json() for c in self.latency_front],
                    "evaluations": len(self.candidates), "seconds": self.seconds, "stopped": self.stopped})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SearchOutcome:
        """From `to_json()`'s dict. The chosen plan, the front and the references are found among the candidates
        by their plans, so they are the same objects again (the top level has no "source" of its own); a missing
        field or plan is a KeyError."""
        candidates = [Candidate.from_json(c) for c in data["candidates"]]
        by_plan = {c.plan.key(): c for c in candidates}
        find = lambda item: by_plan[Plan.from_json(item["plan"]).key()]
        return cls(find(data), [find(c) for c in data["front"]], candidates,
                   {name: find(c) for name, c in data["references"].items()},
                   Budget(data["budget"]["kind"], data["budget"]["value"]), data["baseline_accuracy"],
                   data["seconds"], data["stopped"])


# ---- pieces ---------------------------------------------------------------------------------
def step_cost(row: Row) -> float:
    """A single-layer row's accuracy cost in points: its drop (never below 0), plus its KL as a tie-break."""
    return max(row.drop, 0.0) + KL_POINTS * row.kl


def _cheapest(rows: Iterable[Row]) -> dict[tuple[str, str], Row]:
    """Per (layer, precision), the single-layer row of least accuracy cost (the cheaper method among equals)."""
    best: dict[tuple[str, str], Row] = {}
    order = lambda row: (step_cost(row), COST_ORDER.index(row.method))
    for r in rows:
        held = best.get((r.layer, r.precision))
        if r.direction == "one" and (held is None or order(r) < order(held)):
            best[(r.layer, r.precision)] = r
    return best


def greedy_steps(rows: Iterable[Row], sizes: dict[tuple[str, str], int],
                 layer_order: Sequence[str]) -> list[tuple]:
    """Steps, cheapest accuracy per byte saved first; each step sets that layer. A step is its row's key
    (`row_key`): (layer, precision) by RTN, or (layer, precision, method) by another method.

    Per layer the choices lie on a lower convex hull: straight to INT4 when that costs no more per
    byte than INT8, else INT8 first and the INT8-to-INT4 step later, priced by its extra cost. Where a
    layer has rows by several methods at one precision, the one of least cost stands for that precision.
    """
    single = _cheapest(rows)
    steps: list[tuple[float, int, str, tuple]] = []
    for index, name in enumerate(layer_order):
        options = [(single[(name, p)].key, step_cost(single[(name, p)]), sizes[(name, "fp32")] - sizes[(name, p)])
                   for p in ("int8", "int4") if (name, p) in single and sizes[(name, "fp32")] > sizes[(name, p)]]
        options.sort(key=lambda o: o[2])  # by bytes saved: int8, then int4
        done_cost, done_saved = 0.0, 0
        while options:
            ratios = [((cost - done_cost) / (saved - done_saved), i) for i, (_, cost, saved) in enumerate(options)]
            ratio, best = min(ratios)
            key, cost, saved = options[best]
            steps.append((max(ratio, 0.0), index, name, key))
            done_cost, done_saved = cost, saved
            options = [o for o in options[best + 1:] if o[2] > saved]
    steps.sort(key=lambda s: (s[0], s[1]))
    return [key for _, _, _, key in steps]


def step_rule(step: tuple) -> Rule:
    """The rule a step gives its layer: the bare precision by RTN, else the precision with its method."""
    precision, method = step[1], step[2] if len(step) > 2 else WeightMethod.RTN
    return Rule(precision, () if method == WeightMethod.RTN else (("method", method),))


def dominated(a: Candidate, b: Candidate) -> bool:
    """Whether b dominates a: no larger, no less accurate, and better in one of the two."""
    return (b.size_bytes <= a.size_bytes and b.accuracy >= a.accuracy
            and (b.size_bytes < a.size_bytes or b.accuracy > a.accuracy))


def pareto_front(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The non-dominated candidates by size and accuracy, smallest first (one per equal point)."""
    pool = list(candidates)
    front: dict[tuple[int, float], Candidate] = {}
    for c in pool:
        if not any(dominated(c, other) for other in pool):
            front.setdefault((c.size_bytes, c.accuracy), c)
    return sorted(front.values(), key=lambda c: c.size_bytes)


def latency_front(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The non-dominated candidates by measured latency and accuracy, fastest first."""
    timed = [c for c in candidates if c.latency_ms_p50 is not None]
    keep = [c for c in timed if not any(o.latency_ms_p50 <= c.latency_ms_p50 and o.accuracy >= c.accuracy
                                        and (o.latency_ms_p50 < c.latency_ms_p50 or o.accuracy > c.accuracy)
                                        for o in timed)]
    return sorted(keep, key=lambda c: c.latency_ms_p50)


# ---- the search -----------------------------------------------------------------------------
class _Verifier:
    """Evaluates candidate plans for real, each from the kept trace that shares most of its work."""

    def __init__(self, evaluator: Evaluator, model: nn.Module, rows: list[Row],
                 should_stop: Callable[[], bool] | None, progress: Callable[[str, int], None] | None):
        self.evaluator, self.model = evaluator, model
        self.names = [layer.name for layer in evaluator.layers]
        self.single = {r.key: r for r in rows if r.direction == "one"}
        self.base = evaluator.baseline.comparison.accuracy
        self.seen: dict[str, Candidate] = {}
        self.traces: dict[str, Trace] = {}
        self.should_stop, self.progress = should_stop, progress

    def stop(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def plan_of(self, assignment: dict[str, Rule]) -> Plan:
        return Plan(rules=tuple((n, assignment[n]) for n in self.names if n in assignment
                                and assignment[n].precision != "fp32"))

    def check(self, plan: Plan, source: str) -> Candidate:
        """The verified candidate for `plan`; when it is run, its trace becomes the "last" one."""
        if plan.key() in self.seen:
            return self.seen[plan.key()]
        options = [self.evaluator.baseline_trace] + list(self.traces.values())
        start = max(options, key=lambda trace: self.evaluator.resume_cut(trace, plan))
        result, trace = self.evaluator.run(plan, source=start, keep=True)
        self.traces["last"] = trace
        specs = plan.specs(self.names, strict=False)
        counts: dict[str, int] = {}
        for spec in specs.values():
            counts[spec.precision] = counts.get(spec.precision, 0) + 1
        c = result.comparison
        keys = [row_key(n, spec.precision, spec.method) for n, spec in specs.items()]
        singles = [self.single[key] for key in keys if key in self.single]
        candidate = Candidate(plan, source, c.accuracy, tuple(c.ci95), 100.0 * (self.base - c.accuracy),
                              sum(r.drop for r in singles), c.mcnemar_p, c.kl, sum(r.kl for r in singles),
                              c.flips, model_size_bytes(self.model, plan), counts)
        self.seen[plan.key()] = candidate
        if self.progress is not None:
            self.progress(f"verified {source}: {c.accuracy:.2%}, {candidate.size_bytes / 1e6:.1f} MB", len(self.seen))
        return candidate

    def keep(self, name: str, plan: Plan) -> None:
        """Keep the last run's trace under `name` when it is `plan`'s (a later run starts from it)."""
        last = self.traces.get("last")
        if last is not None and last.plan.key() == plan.key():
            self.traces[name] = last


_MEETS: dict[BudgetKind, Callable[[float | None, Candidate, float], bool]] = {
    BudgetKind.MAX_DROP: lambda bound, c, _base: c.drop <= bound + 1e-9,
    BudgetKind.NOT_WORSE: lambda _bound, c, base: c.accuracy >= base or c.mcnemar_p >= SIGNIFICANCE,
    BudgetKind.TARGET_BYTES: lambda bound, c, _base: c.size_bytes <= bound,
    BudgetKind.LATENCY_MS: lambda bound, c, _base: c.latency_ms_p50 is not None and c.latency_ms_p50 <= bound,
}  # whether a verified candidate `c` meets the budget's bound, given FP32's accuracy `base`


def meets(budget: Budget, candidate: Candidate, baseline_accuracy: float) -> bool:
    """Whether a verified candidate satisfies the budget."""
    return _MEETS[budget.kind](budget.value, candidate, baseline_accuracy)


def search(evaluator: Evaluator, model: nn.Module, tokenizer, rows: Sequence[Row], budget: Budget,
           latency: bool = True, should_stop: Callable[[], bool] | None = None,
           progress: Callable[[str, int], None] | None = None) -> SearchOutcome:
    """Verified candidates along the greedy order, the Pareto front, and the plan the budget picks.

    Accuracy budgets: bisection along the greedy order for the longest prefix that meets the budget,
    then up to MAX_REFINE further single steps, each kept only if the verified plan still meets it;
    the chosen plan is the smallest verified one that meets it. Size and latency budgets: the most
    accurate verified plan within the target. Latency (real kernels, batch 1) is measured for the
    front's plans (and the chosen one) when `latency` is set, and always for a latency budget.
    """
    started = time.perf_counter()
    rows = [r for r in rows if r.direction == "one"]
    names = [layer.name for layer in evaluator.layers]
    missing = [n for n in names if not any(r.layer == n for r in rows)]
    if missing:
        raise SearchError(f"the sweep has no single-layer row for {missing[0]} ({len(missing)} layers missing)")
    precisions = tuple(p for p in SWEEP_PRECISIONS if any(r.precision == p for r in rows))
    sizes = {(layer.name, p): layer.bytes_at(p) for layer in evaluator.layers for p in ("fp32",) + precisions}
    steps = greedy_steps(rows, sizes, names)
    verifier = _Verifier(evaluator, model, rows, should_stop, progress)
    base = verifier.base

    def assignment(k: int) -> dict[str, Rule]:
        out: dict[str, Rule] = {}
        for step in steps[:k]:
            out[step[0]] = step_rule(step)
        return out

    rest = model_size_bytes(model, FP32) - sum(sizes[(n, "fp32")] for n in names)  # what no plan changes

    def predicted_size(k: int) -> int:
        chosen = assignment(k)
        return rest + sum(sizes[(n, chosen[n].precision if n in chosen else "fp32")] for n in names)

    def at(k: int) -> Candidate:
        candidate = verifier.check(verifier.plan_of(assignment(k)), f"greedy {k}/{len(steps)}")
        if budget.accuracy_bound and meets(budget, candidate, base) and k > best[0]:
            best[0] = k
            verifier.keep("best", candidate.plan)
        return candidate

    best = [0]  # the longest verified prefix meeting an accuracy budget; its trace is kept
    references = {"fp32": verifier.check(FP32, "uniform fp32")}
    for precision in precisions:
        references[precision] = verifier.check(Plan.uniform(precision), f"uniform {precision}")
    prefix_sizes = [predicted_size(k) for k in range(len(steps) + 1)]
    targets = [prefix_sizes[0] - (prefix_sizes[0] - prefix_sizes[-1]) * i / LADDER for i in range(1, LADDER + 1)]
    ladder = sorted({next(k for k, s in enumerate(prefix_sizes) if s <= t) for t in targets})
    passed: dict[int, bool] = {0: True}
    for k in ladder:
        if verifier.stop():
            break
        passed[k] = meets(budget, at(k), base)

    if budget.accuracy_bound:
        lo = best[0]
        hi = min((k for k, good in passed.items() if not good and k > lo), default=None)
        while hi is not None and hi - lo > 1 and not verifier.stop():
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if meets(budget, at(mid), base) else (lo, mid)
        current, tried = assignment(best[0]), 0
        for step in steps[best[0]:]:
            if tried >= MAX_REFINE or verifier.stop():
                break
            name, rule = step[0], step_rule(step)
            trial = verifier.plan_of({**current, name: rule})
            if current.get(name) == rule or trial.key() in verifier.seen:
                continue
            tried += 1
            if meets(budget, verifier.check(trial, f"refined +{name}:{':'.join(step[1:])}"), base):
                current[name] = rule
                verifier.keep("best", trial)
    elif budget.kind == BudgetKind.TARGET_BYTES:
        k = next((k for k, s in enumerate(prefix_sizes) if s <= budget.value), len(steps))
        while k <= len(steps) and not verifier.stop() and at(k).size_bytes > budget.value:
            k += 1

    candidates = list(verifier.seen.values())
    front = pareto_front(candidates)
    if latency or budget.kind == BudgetKind.LATENCY_MS:
        for candidate in front:
            if verifier.stop():
                break
            candidate.latency_ms_p50 = bench(model, tokenizer, candidate.plan, batch=1,
                                             data=evaluator.dataset)["latency_ms_p50"]
    chosen = choose(budget, candidates, base)
    if chosen is None:
        smallest = min(candidates, key=lambda c: c.size_bytes)
        raise SearchError(f"no verified plan meets the budget ({budget.describe()}); the smallest found is "
                          f"{smallest.size_bytes / 1e6:.2f} MB at {smallest.accuracy:.2%}")
    if latency and chosen.latency_ms_p50 is None:
        chosen.latency_ms_p50 = bench(model, tokenizer, chosen.plan, batch=1, data=evaluator.dataset)["latency_ms_p50"]
    return SearchOutcome(chosen, front, candidates, references, budget, base,
                         time.perf_counter() - started, verifier.stop())


def choose(budget: Budget, candidates: Sequence[Candidate], baseline_accuracy: float) -> Candidate | None:
    """Accuracy budgets: the smallest plan meeting it (the more accurate among equals); size and latency
    targets: the most accurate plan within the target (the smaller among equals)."""
    fitting = [c for c in candidates if meets(budget, c, baseline_accuracy)]
    if not fitting:
        return None
    if budget.accuracy_bound:
        return min(fitting, key=lambda c: (c.size_bytes, -c.accuracy))
    return min(fitting, key=lambda c: (-c.accuracy, c.size_bytes))
