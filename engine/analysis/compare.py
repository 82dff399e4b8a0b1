"""Precision comparison: plans side by side on several evaluation sets, accuracy and latency.

Accuracy comes from the one evaluation path, whose simulated kernels reproduce the CPU's real
kernels exactly, with a Wilson interval, McNemar p and a paired bootstrap interval for the change
against FP32. Latency and throughput are measured on real kernels once per plan, all plans
interleaved round by round in one run (engine.analysis.benchmark.bench_against), so a busy machine
slows every plan alike and FP32 stays a fair reference; size is the serialized real format.
"""
from __future__ import annotations

import tempfile
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from engine.analysis.benchmark import bench_against, real_model
from engine.analysis.deploy import Exports
from engine.analysis.presets import display_name
from engine.data.sets import EvalSet, load_dataset
from engine.kernels.registry import kernel_notes
from engine.core.plan import FP32, Plan, PlanError
from engine.core.stats import bootstrap_diff_interval
from engine.core.vocabulary import TIMING_TOKENS, Runtime, names
from engine.evaluation.deployed import evaluate_exported
from engine.evaluation.evaluate import get_evaluator
from engine.evaluation.evaluator import EvalResult
from engine.model.inventory import inventory
from engine.model.loading import label_space
from engine.runtime.device import resolve_device
from engine.runtime.latency import describe, machine

CONTRACT_FIELDS = ("plan", "data", "accuracy", "ci95", "agreement", "flips", "mcnemar_p", "kl", "size_bytes",
                   "latency_ms_p50", "throughput_per_s", "device", "runtime")
THROUGHPUT_BATCH = 32
SHORT_RUNTIME_NAMES = {Runtime.ONNXRUNTIME: "ORT"}  # a variant's name must fit a chart's legend

Progress = Callable[[float, str], None]


@dataclass
class SetOutcome:
    """Every plan's evaluation on one set, with FP32's as the reference."""

    data: EvalSet
    fp32: EvalResult
    classes: tuple[str, ...]
    labels: np.ndarray  # class indices of the set's labels
    results: dict[str, EvalResult] = field(default_factory=dict)


Pair = tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class ComparisonRow:
    """One plan on one set and runtime: the contract's fields first, in the CLI's order, then the intervals,
    FP32's figures, the timing's circumstances and the plan itself. `to_json()` is what `compare --json` prints
    and what the page's cache keeps."""

    plan: str
    data: str
    accuracy: float
    ci95: Pair
    agreement: float
    flips: int
    mcnemar_p: float
    kl: float
    size_bytes: int
    latency_ms_p50: float
    throughput_per_s: float
    device: str
    runtime: str = Runtime.TORCH  # rows stored before ORT variants existed were torch's
    protocol: str | None = None
    n: int
    lost: int
    gained: int
    accuracy_delta: float
    accuracy_delta_ci95: Pair
    fp32_accuracy: float
    latency_ms_p95: float
    fp32_latency_ms_p50: float
    fp32_latency_ms_p95: float
    speedup: float
    speedup_ci95: Pair
    fp32_size_bytes: int
    size_ratio: float
    peak_memory_bytes: int | None = None
    threads: int
    load_average: tuple[float, ...] | None
    tokens: int
    throughput_batch: int
    timing_repeats: int
    machine: str
    kernel_notes: tuple[str, ...] = ()
    plan_json: dict
    cpu_kernel: str | None = None

    def __post_init__(self) -> None:
        # Intervals and lists arrive as lists (from JSON, from the timings): kept as tuples, so a row is a value.
        for name in _TUPLES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def to_json(self) -> dict[str, Any]:
        """The row as JSON values (intervals as lists), keys in the contract's order."""
        return {f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
                for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComparisonRow:
        """A row from `to_json()`'s dict, or from one stored by an older version (its missing optional fields take
        their defaults, keys it no longer has are ignored); ValueError when a required field is missing."""
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise ValueError(f"a comparison row without {', '.join(missing)}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


_TUPLES = ("ci95", "accuracy_delta_ci95", "speedup_ci95", "load_average", "kernel_notes")


@dataclass(frozen=True)
class ComparisonRecord:
    """What a comparison leaves to be shown again: its rows, the examples the plans disagree on (a table's
    lines) and the machine it ran on. `to_json()` is what the page's cache keeps."""

    rows: tuple[ComparisonRow, ...]
    disagreements: tuple[dict, ...]
    machine: str

    def to_json(self) -> dict:
        return {"rows": [row.to_json() for row in self.rows], "disagreements": list(self.disagreements),
                "machine": self.machine}

    @classmethod
    def from_json(cls, stored: dict) -> "ComparisonRecord":
        """Raises ValueError or TypeError for a record whose rows this version cannot read."""
        return cls(tuple(ComparisonRow.from_json(row) for row in stored["rows"]),
                   tuple(stored["disagreements"]), stored["machine"])


@dataclass
class Report:
    """A comparison: its rows (one per plan and set), the raw outcomes and the machine it ran on."""

    rows: list[ComparisonRow]
    outcomes: list[SetOutcome]
    machine: str

    def record(self) -> ComparisonRecord:
        return ComparisonRecord(tuple(self.rows), tuple(disagreements(self.outcomes)), self.machine)


def _unique_labels(plans: Sequence[tuple[str, Plan]]) -> list[tuple[str, Plan]]:
    seen: dict[str, int] = {}
    out = []
    for label, plan in plans:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", plan))
    return out


def variant(label: str, runtime: str) -> str:
    """The name of a plan on a runtime, in a comparison's results and on its page (the plan's label alone on
    torch): `variant(display_name(row.plan), row.runtime)` names a row."""
    return label if runtime == Runtime.TORCH else f"{label} · {SHORT_RUNTIME_NAMES.get(runtime, runtime)}"


def run_comparison(model: nn.Module, tokenizer, plans: Sequence[tuple[str, Plan]],
                   datasets: Sequence[str | EvalSet], device: str = "cpu", limit: int | None = None,
                   progress: Progress | None = None, bench_seconds: float = 1.0,
                   runtimes: Sequence[str] = (Runtime.TORCH,), exports: Exports | None = None) -> Report:
    """Evaluate every plan on every set and runtime, and time every variant once, all in one interleaved
    run; torch FP32 is always the reference. An ONNX Runtime variant is the exported graph itself (exported
    once into `exports`, a temporary folder by default), evaluated and timed as it is deployed."""
    if exports is None and Runtime.ONNXRUNTIME in runtimes:
        with tempfile.TemporaryDirectory(prefix="compare-exports-") as scratch:
            return run_comparison(model, tokenizer, plans, datasets, device, limit, progress, bench_seconds,
                                  runtimes, Exports(scratch))
    target = resolve_device(device)
    if not plans:
        raise PlanError("no plans to compare")
    if not datasets:
        raise PlanError("no evaluation sets to compare on")
    unknown = [runtime for runtime in runtimes if runtime not in names(Runtime)]
    if unknown or not runtimes:
        raise PlanError(f"runtime {unknown[0] if unknown else 'none'!r}: choose among {', '.join(names(Runtime))}")
    if Runtime.ONNXRUNTIME in runtimes and target.type != "cpu":
        raise PlanError("ONNX Runtime variants run on its CPU provider here: compare them with --device cpu")
    layer_names = [layer.name for layer in inventory(model)]
    plans = _unique_labels(plans)
    for _, plan in plans:
        plan.resolve(layer_names)
        if Runtime.ONNXRUNTIME in runtimes:
            plan.on(Runtime.ONNXRUNTIME).resolve(layer_names)
    sets = [(load_dataset(d) if isinstance(d, str) else d).head(limit) for d in datasets]
    classes = label_space(model)
    for data in sets:  # before any export: a set the model cannot be scored on fails at once
        classes.indices(data.labels, data.name)
    timed = plans if any(p.key() == FP32.key() for _, p in plans) else [("fp32 (reference)", FP32)] + plans
    total = len(plans) * len(sets) * len(runtimes) + 2
    done = 0

    def report(fraction: float, text: str) -> None:
        if progress is not None:
            progress(min(1.0, (done + fraction) / total), text)

    folders = {}
    if Runtime.ONNXRUNTIME in runtimes:
        for label, plan in plans:
            report(0.0, f"exporting {display_name(label)} for ONNX Runtime")
            folders[label] = exports.folder(model, tokenizer, plan, sets[0])

    outcomes = []
    for data in sets:
        report(0.0, f"preparing {data.name}: tokenizing and running FP32 once")
        evaluator = get_evaluator(model, tokenizer, data, str(target))
        outcome = SetOutcome(data, evaluator.baseline, evaluator.classes.names, evaluator.labels)
        for label, plan in plans:
            for runtime in runtimes:
                text = f"evaluating {display_name(label)} on {data.name} ({runtime})"
                report(0.0, text)
                if runtime == Runtime.ONNXRUNTIME:
                    result = evaluate_exported(evaluator, folders[label])
                elif plan.key() == FP32.key():
                    result = evaluator.baseline
                else:
                    result, _ = evaluator.run(plan, progress=lambda p, text=text: report(p.done / p.total, text))
                outcome.results[variant(label, runtime)] = result
                done += 1
        outcomes.append(outcome)

    reference = next(label for label, plan in timed if plan.key() == FP32.key())
    calibration_set = sets[0]
    timings = {}
    exported = {variant(label, Runtime.ONNXRUNTIME): folder for label, folder in folders.items()}
    for batch in (1, THROUGHPUT_BATCH):
        text = f"timing {len(timed) + len(exported)} variants at batch {batch}, interleaved"
        timings[batch] = bench_against(model, tokenizer, dict(timed), reference, batch, TIMING_TOKENS, str(target),
                                       repeats=20 if batch == 1 else 10, min_seconds=bench_seconds,
                                       data=calibration_set, progress=lambda f, text=text: report(f, text),
                                       exported=exported)
        done += 1
    report(0.0, "done")
    info = machine(target)
    notes = {label: kernel_notes(real_model(model, tokenizer, plan, target, calibration_set))
             if target.type == "cuda" else [] for label, plan in plans}
    rows = [_row(label, runtime, plan, outcome, timings[1][variant(label, runtime)], timings[1][reference],
                 timings[THROUGHPUT_BATCH][variant(label, runtime)], str(target.type), describe(info), notes[label])
            for label, plan in plans for runtime in runtimes for outcome in outcomes]
    return Report(rows, outcomes, describe(info))


def _row(label: str, runtime: str, plan: Plan, outcome: SetOutcome, single: dict, fp32_single: dict, batched: dict,
         device: str, machine_text: str, notes: list[str]) -> ComparisonRow:
    result, fp32 = outcome.results[variant(label, runtime)], outcome.fp32
    truth = outcome.labels
    correct, fp32_correct = result.predictions == truth, fp32.predictions == truth
    comparison = result.comparison
    return ComparisonRow(
        plan=label, data=outcome.data.name, accuracy=comparison.accuracy, ci95=comparison.ci95,
        agreement=comparison.agreement, flips=comparison.flips, mcnemar_p=comparison.mcnemar_p,
        kl=comparison.kl, size_bytes=single["size_bytes"], latency_ms_p50=single["latency_ms_p50"],
        throughput_per_s=batched["throughput_per_s"], device=device, runtime=runtime,
        protocol=single["protocol"],
        n=comparison.n,
        lost=int(np.sum(fp32_correct & ~correct)), gained=int(np.sum(~fp32_correct & correct)),
        accuracy_delta=comparison.accuracy - fp32.comparison.accuracy,
        accuracy_delta_ci95=bootstrap_diff_interval(fp32_correct, correct),
        fp32_accuracy=fp32.comparison.accuracy,
        latency_ms_p95=single["latency_ms_p95"],
        fp32_latency_ms_p50=fp32_single["latency_ms_p50"], fp32_latency_ms_p95=fp32_single["latency_ms_p95"],
        speedup=single["speedup"], speedup_ci95=single["speedup_ci95"],
        fp32_size_bytes=fp32_single["size_bytes"], size_ratio=single["size_bytes"] / fp32_single["size_bytes"],
        peak_memory_bytes=None, threads=single["threads"], load_average=single["load_average"],
        tokens=TIMING_TOKENS, throughput_batch=THROUGHPUT_BATCH, timing_repeats=single["repeats"],
        machine=machine_text, kernel_notes=notes, plan_json=plan.to_json(),
        cpu_kernel=plan.cpu.kernel if runtime == Runtime.ONNXRUNTIME else None,
    )


def compare_plans(model: nn.Module, tokenizer, plans: Sequence[tuple[str, Plan]], datasets: Sequence[str | EvalSet],
                  device: str = "cpu", progress: Progress | None = None, limit: int | None = None,
                  bench_seconds: float = 1.0, runtimes: Sequence[str] = (Runtime.TORCH,),
                  exports: Exports | None = None) -> list[ComparisonRow]:
    """One row per (plan, set, runtime): the contract's fields plus intervals, p95, speedup, size ratio."""
    return run_comparison(model, tokenizer, plans, datasets, device, limit, progress, bench_seconds, runtimes,
                          exports).rows


def disagreements(outcomes: Sequence[SetOutcome], max_rows: int = 50) -> list[dict]:
    """Examples on which the plans (FP32 included) predict differently, widest spread of the probability
    of FP32's class first."""
    rows = []
    for outcome in outcomes:
        results = {"fp32": outcome.fp32, **{k: v for k, v in outcome.results.items() if k != "fp32"}}
        predictions = np.stack([r.predictions for r in results.values()])
        reference = predictions[0]
        probs = np.stack([r.probs[np.arange(len(reference)), reference] for r in results.values()])
        disputed = np.nonzero((predictions != reference).any(0))[0]
        spread = probs[:, disputed].max(0) - probs[:, disputed].min(0)
        truth = outcome.labels
        for index in disputed[np.argsort(-spread, kind="stable")][:max_rows]:
            row = {"data": outcome.data.name, "index": int(index), "text": outcome.data.texts[index],
                   "label": outcome.classes[truth[index]].lower()}
            for k, label in enumerate(results):
                row[label] = outcome.classes[int(predictions[k, index])].lower()
                row[f"{label} p(fp32 class)"] = round(float(probs[k, index]), 4)
            rows.append(row)
    return rows
