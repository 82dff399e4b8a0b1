"""Precision comparison: several plans on several sets, side by side, on the device they run on.

Accuracy comes from the one evaluation path (`Evaluator.run`), whose simulated kernels reproduce
the CPU's real kernels exactly (on CUDA, torchao's int8 kernel keeps one more activation bit: see
engine.cuda), with a Wilson interval, McNemar p and a paired bootstrap interval for the change
against FP32. Latency and throughput are measured on real kernels once per plan, all plans
interleaved round-robin (so that a busy machine slows every plan alike and FP32 stays a fair
reference); size is the serialized real format (`measure.model_size_bytes`). `findings` turns
the rows into sentences whose words (faster, inside the interval, significant) are chosen by the
numbers, never written ahead.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from engine.data import LABEL_NAMES, EvalSet, load_dataset
from engine.evaluation import EvalResult, get_evaluator, model_on, resolve_device
from engine.layers import inventory
from engine.measure import (_peak_rss_bytes, _reset_peak_rss, bench_inputs, bootstrap_diff_interval,
                            model_size_bytes, time_call)
from engine.plan import FP32, Plan, PlanError, parse_plan
from engine.quantize import apply_plan

PRESETS = {
    "fp32": "FP32, the reference",
    "fp16": "every Linear and the embedding table in FP16",
    "bf16": "every Linear and the embedding table in BF16",
    "int8": "INT8 everywhere: W8A8 Linears and the int8 embedding table",
    "int8-linear": "INT8 Linears (W8A8), embedding table kept in FP32",
    "int4": "INT4 weight-only everywhere, group-wise",
}
DISPLAY = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8", "int8-linear": "INT8 (Linear only)",
           "int4": "INT4"}
IN_DOMAIN = "embedded"
OUT_OF_DOMAIN = ("amazon", "tweets", "nyt")
CONTRACT_FIELDS = ("plan", "data", "accuracy", "ci95", "agreement", "flips", "mcnemar_p", "kl", "size_bytes",
                   "latency_ms_p50", "throughput_per_s", "device")
BENCH_TOKENS = 32
THROUGHPUT_BATCH = 32
WARMUP = 3
SIGNIFICANCE = 0.05
Z95 = 1.959964

Progress = Callable[[float, str], None]


# ---- plans ----------------------------------------------------------------------------------
def preset_plan(name: str, model: nn.Module) -> Plan:
    """A preset by name; int8-linear keeps the model's embedding table(s) in FP32."""
    if name == "int8-linear":
        embeddings = [layer.name for layer in inventory(model) if layer.kind == "embedding"]
        return Plan.from_mapping({"*": "int8", **{embedding: "fp32" for embedding in embeddings}})
    if name == "fp32":
        return FP32
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Plan.uniform(name)


def split_plan_list(text: str) -> list[str]:
    """Items of a comma-separated plan list; commas inside inline JSON ({...}) do not split."""
    items, depth, current = [], 0, []
    for char in text:
        depth += (char in "{[") - (char in "}]")
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def resolve_plan_item(item: str, model: nn.Module) -> tuple[str, Plan]:
    """(label, plan) for a preset name, a .json file path or inline JSON, checked against the model."""
    item = item.strip()
    if item in PRESETS:
        label, plan = item, preset_plan(item, model)
    else:
        if not item.startswith("{") and not item.endswith(".json"):
            raise PlanError(f"unknown plan {item!r}: use a preset ({', '.join(PRESETS)}), a .json file or inline JSON")
        plan = parse_plan(item)
        label = Path(item).stem if item.endswith(".json") and not item.startswith("{") else plan.label()
    plan.resolve([layer.name for layer in inventory(model)])
    return label, plan


def display_name(label: str) -> str:
    return DISPLAY.get(label, label)


def _unique_labels(plans: Sequence[tuple[str, Plan]]) -> list[tuple[str, Plan]]:
    seen: dict[str, int] = {}
    out = []
    for label, plan in plans:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", plan))
    return out


# ---- running --------------------------------------------------------------------------------
@dataclass
class SetOutcome:
    """Every plan's evaluation on one set, with FP32's as the reference."""

    data: EvalSet
    fp32: EvalResult
    results: dict[str, EvalResult] = field(default_factory=dict)


@dataclass
class Report:
    """A comparison: its rows (one per plan and set), the raw outcomes and the machine it ran on."""

    rows: list[dict]
    outcomes: list[SetOutcome]
    machine: str


def machine_description(device: str | torch.device = "cpu") -> str:
    """The processor or GPU, cores and torch threads: what a timing means depends on them."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _kernel_notes(model: nn.Module, plan: Plan, device: torch.device) -> list[str]:
    """Why some of the plan's layers do not run their fast kernel on this device (CUDA only)."""
    if device.type != "cuda":
        return []
    from engine.cuda import kernel_notes

    return kernel_notes(apply_plan(model_on(model, device), plan, "real"))


def run_comparison(model: nn.Module, tokenizer, plans: Sequence[tuple[str, Plan]],
                   datasets: Sequence[str | EvalSet], device: str = "cpu", limit: int | None = None,
                   progress: Progress | None = None, bench_seconds: float = 1.0) -> Report:
    """Evaluate every plan on every set and time every plan once; FP32 is always the reference."""
    target = resolve_device(device)
    if not plans:
        raise PlanError("no plans to compare")
    if not datasets:
        raise PlanError("no evaluation sets to compare on")
    names = [layer.name for layer in inventory(model)]
    plans = _unique_labels(plans)
    for _, plan in plans:
        plan.resolve(names)
    sets = [(load_dataset(d) if isinstance(d, str) else d).head(limit) for d in datasets]
    timed = plans if any(p.key() == FP32.key() for _, p in plans) else [("fp32 (reference)", FP32)] + plans
    total = len(plans) * len(sets) + 2 * len(timed)
    done = 0

    def report(fraction: float, text: str) -> None:
        if progress is not None:
            progress(min(1.0, (done + fraction) / total), text)

    outcomes = []
    for data in sets:
        report(0.0, f"preparing {data.name}: tokenizing and running FP32 once")
        evaluator = get_evaluator(model, tokenizer, data, str(target))
        outcome = SetOutcome(data, evaluator.baseline)
        for label, plan in plans:
            text = f"evaluating {display_name(label)} on {data.name}"
            report(0.0, text)
            if plan.key() == FP32.key():
                result = evaluator.baseline
            else:
                result, _ = evaluator.run(plan, progress=lambda p, text=text: report(p.done / p.total, text))
            outcome.results[label] = result
            done += 1
        outcomes.append(outcome)

    reference = next(label for label, plan in timed if plan.key() == FP32.key())
    timings = _measure(model, tokenizer, timed, reference, target, bench_seconds,
                       lambda fraction, text: report(fraction * 2 * len(timed), text))
    done = total
    report(0.0, "done")
    machine = machine_description(target)
    notes = {label: _kernel_notes(model, plan, target) for label, plan in plans}
    rows = [_row(label, plan, outcome, timings[label], timings[reference], str(target.type), machine, notes[label])
            for label, plan in plans for outcome in outcomes]
    return Report(rows, outcomes, machine)


def _interleaved_times(reals: dict[str, nn.Module], inputs: dict, sync, repeats: int, min_seconds: float,
                       progress: Callable[[float], None]) -> dict[str, np.ndarray]:
    """Per-plan wall times (s), taken round-robin after warm-up so that every plan sees the same load.

    Timing plans one after another on a shared machine compares their time windows as much as
    their kernels; rotating the order each round also spreads any after-effect of one plan on the next.
    """
    labels = list(reals)
    with torch.inference_mode():
        for real in reals.values():
            time_call(lambda: real(**inputs), warmup=WARMUP, repeats=0, sync=sync)
        times: dict[str, list[float]] = {label: [] for label in labels}
        budget, started, rounds = min_seconds * len(labels), time.perf_counter(), 0
        while rounds < repeats or time.perf_counter() - started < budget:
            shift = rounds % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label].extend(time_call(lambda: reals[label](**inputs), warmup=0, repeats=1, sync=sync))
            rounds += 1
            progress(min(1.0, rounds / repeats, (time.perf_counter() - started) / budget if budget else 1.0))
    return {label: np.array(values) for label, values in times.items()}


def _peak_memory(real: nn.Module, inputs: dict, device: torch.device) -> int | None:
    """Peak bytes while `real` runs one batch: process RSS on the CPU, allocated memory on CUDA."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            real(**inputs)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        tracked = _reset_peak_rss()
        real(**inputs)
        return _peak_rss_bytes() if tracked else None


def median_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for a median: order statistics at binomial(n, 1/2) quantiles."""
    ordered, n = np.sort(np.asarray(values, dtype=float)), len(values)
    k = int(stats.binom.ppf((1 - confidence) / 2, n, 0.5))
    if k < 1:
        return float(ordered[0]), float(ordered[-1])
    return float(ordered[k - 1]), float(ordered[n - k])


def _measure(model: nn.Module, tokenizer, plans: Sequence[tuple[str, Plan]], reference: str, device: torch.device,
             min_seconds: float, progress: Callable[[float, str], None]) -> dict[str, dict]:
    """Latency at batch 1 (p50, p95) and throughput at batch 32 on real kernels, all plans interleaved;
    the speedup is the median of per-round ratios to the reference (paired: same round, same load),
    with its interval. Then each plan's peak memory at batch 32 with only its own model resident."""
    base = model_on(model, device)
    texts = load_dataset("embedded").texts
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    single, batched = (bench_inputs(tokenizer, texts, batch, BENCH_TOKENS, device) for batch in (1, THROUGHPUT_BATCH))
    reals = {label: apply_plan(base, plan, "real") for label, plan in plans}
    text = f"timing {len(plans)} plans at batch 1, interleaved"
    latency = _interleaved_times(reals, single, sync, 20, min_seconds, lambda f: progress(0.5 * f, text))
    text = f"timing {len(plans)} plans at batch {THROUGHPUT_BATCH}, interleaved"
    throughput = _interleaved_times(reals, batched, sync, 10, min_seconds, lambda f: progress(0.5 + 0.45 * f, text))
    del reals
    out = {}
    for label, plan in plans:
        progress(0.95, f"peak memory of {display_name(label)}")
        times = latency[label]
        ratios = latency[reference] / times
        out[label] = {"speedup": float(np.median(ratios)), "speedup_ci95": list(median_interval(ratios)),
                      "latency_ms_p50": float(np.median(times)) * 1e3,
                      "latency_ms_p95": float(np.percentile(times, 95)) * 1e3,
                      "throughput_per_s": THROUGHPUT_BATCH / float(np.median(throughput[label])),
                      "peak_memory_bytes": _peak_memory(apply_plan(base, plan, "real"), batched, device),
                      "size_bytes": model_size_bytes(model, plan), "threads": torch.get_num_threads(),
                      "repeats": len(times)}
    return out


def _row(label: str, plan: Plan, outcome: SetOutcome, timing: dict, fp32_timing: dict, device: str, machine: str,
         notes: list[str]) -> dict:
    result, fp32 = outcome.results[label], outcome.fp32
    labels = np.asarray(outcome.data.labels)
    correct, fp32_correct = result.predictions == labels, fp32.predictions == labels
    comparison = result.comparison
    return {
        "plan": label, "data": outcome.data.name, "accuracy": comparison.accuracy, "ci95": list(comparison.ci95),
        "agreement": comparison.agreement, "flips": comparison.flips, "mcnemar_p": comparison.mcnemar_p,
        "kl": comparison.kl, "size_bytes": timing["size_bytes"], "latency_ms_p50": timing["latency_ms_p50"],
        "throughput_per_s": timing["throughput_per_s"], "device": device,
        "n": comparison.n,
        "lost": int(np.sum(fp32_correct & ~correct)), "gained": int(np.sum(~fp32_correct & correct)),
        "accuracy_delta": comparison.accuracy - fp32.comparison.accuracy,
        "accuracy_delta_ci95": list(bootstrap_diff_interval(fp32_correct, correct)),
        "fp32_accuracy": fp32.comparison.accuracy,
        "latency_ms_p95": timing["latency_ms_p95"],
        "fp32_latency_ms_p50": fp32_timing["latency_ms_p50"], "fp32_latency_ms_p95": fp32_timing["latency_ms_p95"],
        "speedup": timing["speedup"], "speedup_ci95": timing["speedup_ci95"],
        "fp32_size_bytes": fp32_timing["size_bytes"], "size_ratio": timing["size_bytes"] / fp32_timing["size_bytes"],
        "peak_memory_bytes": timing["peak_memory_bytes"], "threads": timing["threads"],
        "tokens": BENCH_TOKENS, "throughput_batch": THROUGHPUT_BATCH, "timing_repeats": timing["repeats"],
        "machine": machine, "kernel_notes": notes, "plan_json": plan.to_json(),
    }


def compare_plans(model: nn.Module, tokenizer, plans: Sequence[tuple[str, Plan]], datasets: Sequence[str | EvalSet],
                  device: str = "cpu", progress: Progress | None = None, limit: int | None = None,
                  bench_seconds: float = 1.0) -> list[dict]:
    """One row per (plan, set): the contract's fields plus intervals, p95, speedup, size ratio, memory."""
    return run_comparison(model, tokenizer, plans, datasets, device, limit, progress, bench_seconds).rows


def disagreements(outcomes: Sequence[SetOutcome], max_rows: int = 50) -> list[dict]:
    """Examples on which the plans (FP32 included) predict differently, widest probability spread first."""
    rows = []
    for outcome in outcomes:
        results = {"fp32": outcome.fp32, **{k: v for k, v in outcome.results.items() if k != "fp32"}}
        predictions = np.stack([r.predictions for r in results.values()])
        positive = np.stack([r.probs[:, 1] for r in results.values()])
        disputed = np.nonzero((predictions != predictions[0]).any(0))[0]
        spread = positive[:, disputed].max(0) - positive[:, disputed].min(0)
        for index in disputed[np.argsort(-spread, kind="stable")][:max_rows]:
            row = {"data": outcome.data.name, "index": int(index), "text": outcome.data.texts[index],
                   "label": LABEL_NAMES[outcome.data.labels[index]]}
            for k, label in enumerate(results):
                row[label] = LABEL_NAMES[int(predictions[k, index])]
                row[f"{label} p(positive)"] = round(float(positive[k, index]), 4)
            rows.append(row)
    return rows


# ---- findings -------------------------------------------------------------------------------
def _base_set(name: str) -> str:
    return name.split("[", 1)[0]


def _where(row: dict) -> str:
    return "this GPU" if str(row["device"]).startswith("cuda") else "this CPU"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _change(ratio: float, more: str, less: str) -> str:
    """new/reference in words: '6.9x slower' from 1.5x on, else '12% slower' (of the reference)."""
    if ratio >= 1.5:
        return f"{ratio:.1f}x {more}"
    if ratio <= 1 / 1.5:
        return f"{1 / ratio:.1f}x {less}"
    return f"{100 * abs(ratio - 1):.0f}% {more if ratio > 1 else less}"


def speed_finding(row: dict) -> str:
    """Faster or slower only beyond the timing noise: when the paired speedup's interval excludes 1
    (rows without one: when the medians lie outside each other's p50-p95 band)."""
    name, where = display_name(row["plan"]), _where(row)
    a50, a95 = row["latency_ms_p50"], row["latency_ms_p95"]
    b50, b95 = row["fp32_latency_ms_p50"], row["fp32_latency_ms_p95"]
    setting = f"batch 1, {row['tokens']} tokens, {row['threads']} threads"
    interval = row.get("speedup_ci95")
    if interval is not None:
        low, high = interval
        beyond, ratio = not low <= 1 <= high, 1 / row["speedup"]
        evidence = (f"median {a50:.1f} ms vs {b50:.1f} ms at {setting}; paired speedup {row['speedup']:.2f}x "
                    f"[{low:.2f}, {high:.2f}] over {row.get('timing_repeats', '?')} interleaved rounds")
    else:
        beyond, ratio = a50 > b95 or a95 < b50, a50 / b50
        evidence = f"median {a50:.1f} ms vs {b50:.1f} ms, p95 {a95:.1f} vs {b95:.1f} ms at {setting}"
    if beyond:
        return f"{name} is {_change(ratio, 'slower', 'faster')} than FP32 on {where} ({evidence})."
    return f"{name}'s latency is within timing noise of FP32's on {where} ({evidence})."


def size_finding(row: dict) -> str:
    name, size, reference = display_name(row["plan"]), row["size_bytes"], row["fp32_size_bytes"]
    sizes = f"{size / 1e6:.1f} MB vs {reference / 1e6:.1f} MB serialized"
    ratio = size / reference
    if abs(ratio - 1) < 0.005:
        return f"{name} is the same size as FP32 ({sizes})."
    return f"{name} is {_change(ratio, 'larger', 'smaller')} than FP32 ({sizes})."


def accuracy_finding(row: dict) -> str:
    """The change against FP32 with its paired interval and McNemar p; the verdict follows them."""
    name, data, n = display_name(row["plan"]), row["data"], row["n"]
    delta, (low, high), p = row["accuracy_delta"], row["accuracy_delta_ci95"], row["mcnemar_p"]
    numbers = f"{_points(delta)} points [{_points(low)}, {_points(high)}]"
    if row["flips"] == 0:
        return f"{name} makes exactly FP32's prediction on all {n} {data} examples."
    flips = f"{row['flips']} of {n} predictions flipped"
    zero_inside = low <= 0 <= high
    if zero_inside and p >= SIGNIFICANCE:
        return (f"{name}'s accuracy on {data} differs from FP32's by {_points(delta)} points, inside the interval "
                f"[{_points(low)}, {_points(high)}] (McNemar p = {p:.2f}; {flips}).")
    if not zero_inside and p < SIGNIFICANCE:
        direction = "less" if delta < 0 else "more"
        return (f"{name} is significantly {direction} accurate than FP32 on {data}: {numbers} "
                f"(McNemar p = {p:.2g}; {flips}).")
    return (f"{name}'s accuracy on {data} differs from FP32's by {numbers}, McNemar p = {p:.2g}: borderline, "
            f"the interval and the test disagree, so not a finding ({flips}).")


def _delta_se(row: dict) -> float:
    """Standard error of a paired accuracy change from its counts of lost and gained examples."""
    n, lost, gained = row["n"], row["lost"], row["gained"]
    delta = (gained - lost) / n
    return math.sqrt(max((gained + lost) / n - delta * delta, 0.0) / n)


def domain_finding(in_domain: dict, out_domain: dict) -> str | None:
    """Does the plan lose more out of domain than in domain?

    Two views that must agree, as for a single set's change: a normal interval for the difference
    of the two changes (independent sets), and Fisher's exact test on the direction of the flips
    (lost vs gained, in domain vs out), which stays valid for a handful of flips.
    """
    counts = [[in_domain["lost"], in_domain["gained"]], [out_domain["lost"], out_domain["gained"]]]
    if sum(map(sum, counts)) == 0:
        return None
    d_in, d_out = in_domain["accuracy_delta"], out_domain["accuracy_delta"]
    diff, se = d_out - d_in, math.hypot(_delta_se(in_domain), _delta_se(out_domain))
    low, high = diff - Z95 * se, diff + Z95 * se
    p = float(stats.fisher_exact(counts).pvalue)
    name, data = display_name(out_domain["plan"]), out_domain["data"]
    numbers = (f"{_points(d_out)} points on {data} (out of domain) vs {_points(d_in)} on {in_domain['data']} "
               f"(in domain); difference {_points(diff)} [{_points(low)}, {_points(high)}], "
               f"Fisher p = {p:.2g} on which way the flips go")
    interval_says, test_says = not low <= 0 <= high, p < SIGNIFICANCE
    if not interval_says and not test_says:
        return f"{name}: {numbers}: inside the interval, no evidence that out-of-domain text suffers more."
    share = [lost / (lost + gained) if lost + gained else 0.5 for lost, gained in counts]
    if interval_says and test_says and (diff < 0) == (share[1] > share[0]):
        verdict = "loses significantly more" if diff < 0 else "loses significantly less"
        return f"{name} {verdict} on out-of-domain {data} than in domain: {numbers}."
    return f"{name}: {numbers}: borderline, the interval and the test disagree, so not a finding."


def findings(rows: Sequence[dict]) -> list[str]:
    """Plain-language sentences computed from the rows: speed, accuracy, domain shift, size."""
    plans = list(dict.fromkeys(row["plan"] for row in rows))
    first = {row["plan"]: row for row in reversed(rows)}
    quantized = [p for p in plans if first[p]["plan_json"] != {}]
    out = [speed_finding(first[p]) for p in quantized]
    out += [accuracy_finding(row) for row in rows if row["plan"] in quantized]
    for plan in quantized:
        mine = [row for row in rows if row["plan"] == plan]
        home = next((row for row in mine if _base_set(row["data"]) == IN_DOMAIN), None)
        for row in mine:
            if home is not None and _base_set(row["data"]) in OUT_OF_DOMAIN:
                sentence = domain_finding(home, row)
                if sentence:
                    out.append(sentence)
    out += [size_finding(first[p]) for p in quantized]
    return out


# ---- export ---------------------------------------------------------------------------------
def _flat(row: dict) -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            flat[f"{key}_low"], flat[f"{key}_high"] = value
        elif isinstance(value, (list, tuple)):
            flat[key] = "; ".join(str(v) for v in value)
        elif isinstance(value, dict):
            flat[key] = json.dumps(value, sort_keys=True)
        else:
            flat[key] = value
    return flat


def to_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV; intervals become _low/_high columns, plans their JSON."""
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else pattern.format(value)


def _speedup_interval(row: dict) -> str:
    interval = row.get("speedup_ci95")
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def to_markdown(rows: Sequence[dict], sentences: Sequence[str], machine: str) -> str:
    """A short report: the machine, the table and the findings."""
    lines = ["# Precision comparison", "",
             f"Machine: {machine}. Device: {rows[0]['device'] if rows else 'n/a'}. Latency at batch 1 and "
             f"{BENCH_TOKENS} tokens (median and p95 after warm-up, all plans interleaved round-robin; speedup = "
             f"median of the per-round ratios to FP32), throughput at batch {THROUGHPUT_BATCH}; "
             "accuracy with 95% Wilson interval, change against FP32 with a paired bootstrap 95% interval.", "",
             "| Plan | Set | n | Accuracy [95% CI] | Δ vs FP32, points [95% CI] | Agreement | Flips | McNemar p "
             "| KL | Size (MB) | Latency p50 / p95 (ms) | Throughput (/s) | Speedup [95% CI] |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        low, high = row["ci95"]
        d_low, d_high = row["accuracy_delta_ci95"]
        lines.append(
            f"| {display_name(row['plan'])} | {row['data']} | {row['n']} "
            f"| {100 * row['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
            f"| {_points(row['accuracy_delta'])} [{_points(d_low)}, {_points(d_high)}] "
            f"| {100 * row['agreement']:.1f}% | {row['flips']} | {_fmt(row['mcnemar_p'], '{:.2g}')} "
            f"| {_fmt(row['kl'], '{:.2g}')} | {row['size_bytes'] / 1e6:.1f} "
            f"| {row['latency_ms_p50']:.1f} / {row['latency_ms_p95']:.1f} | {row['throughput_per_s']:.0f} "
            f"| {row['speedup']:.2f}x{_speedup_interval(row)} |")
    if sentences:
        lines += ["", "## Findings", ""] + [f"- {sentence}" for sentence in sentences]
    return "\n".join(lines) + "\n"
