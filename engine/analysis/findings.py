"""Findings in plain words, computed from a comparison's rows: faster or slower, more or less accurate,
out of domain worse than in domain, smaller. The words (faster, inside the interval, significant)
are chosen by the numbers, never written ahead; a difference inside its interval is called so.
"""
from __future__ import annotations

import math
from typing import Sequence

from scipy import stats

from engine.analysis.compare import ComparisonRow
from engine.analysis.presets import IN_DOMAIN, OUT_OF_DOMAIN, display_name
from engine.core.stats import SIGNIFICANCE
from engine.core.vocabulary import Runtime

Z95 = 1.959964


def _base_set(name: str) -> str:
    return name.split("[", 1)[0]


def _where(row: ComparisonRow) -> str:
    return "this GPU" if row.device.startswith("cuda") else "this CPU"


def points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _change(ratio: float, more: str, less: str) -> str:
    """new/reference in words: '6.9x slower' from 1.5x on, else '12% slower' (of the reference)."""
    if ratio >= 1.5:
        return f"{ratio:.1f}x {more}"
    if ratio <= 1 / 1.5:
        return f"{1 / ratio:.1f}x {less}"
    return f"{100 * abs(ratio - 1):.0f}% {more if ratio > 1 else less}"


def speed_finding(row: ComparisonRow) -> str:
    """Faster or slower only beyond the timing noise: when the paired speedup's interval excludes 1."""
    name, where = _name(row), _where(row)
    setting = f"batch 1, {row.tokens} tokens, {row.threads} threads"
    low, high = row.speedup_ci95
    beyond, ratio = not low <= 1 <= high, 1 / row.speedup
    evidence = (f"median {row.latency_ms_p50:.1f} ms vs {row.fp32_latency_ms_p50:.1f} ms at {setting}; paired "
                f"speedup {row.speedup:.2f}x [{low:.2f}, {high:.2f}] over {row.timing_repeats} interleaved rounds")
    if beyond:
        return f"{name} is {_change(ratio, 'slower', 'faster')} than FP32 on {where} ({evidence})."
    return f"{name}'s latency is within timing noise of FP32's on {where} ({evidence})."


def size_finding(row: ComparisonRow) -> str:
    name, size, reference = _name(row), row.size_bytes, row.fp32_size_bytes
    sizes = f"{size / 1e6:.1f} MB vs {reference / 1e6:.1f} MB serialized"
    ratio = size / reference
    if abs(ratio - 1) < 0.005:
        return f"{name} is the same size as FP32 ({sizes})."
    return f"{name} is {_change(ratio, 'larger', 'smaller')} than FP32 ({sizes})."


def accuracy_finding(row: ComparisonRow) -> str:
    """The change against FP32 with its paired interval and McNemar p; the verdict follows them."""
    name, data, n = _name(row), row.data, row.n
    delta, (low, high), p = row.accuracy_delta, row.accuracy_delta_ci95, row.mcnemar_p
    numbers = f"{points(delta)} points [{points(low)}, {points(high)}]"
    if row.flips == 0:
        return f"{name} makes exactly FP32's prediction on all {n} {data} examples."
    flips = f"{row.flips} of {n} predictions flipped"
    zero_inside = low <= 0 <= high
    if zero_inside and p >= SIGNIFICANCE:
        return (f"{name}'s accuracy on {data} differs from FP32's by {points(delta)} points, inside the interval "
                f"[{points(low)}, {points(high)}] (McNemar p = {p:.2f}; {flips}).")
    if not zero_inside and p < SIGNIFICANCE:
        direction = "less" if delta < 0 else "more"
        return (f"{name} is significantly {direction} accurate than FP32 on {data}: {numbers} "
                f"(McNemar p = {p:.2g}; {flips}).")
    return (f"{name}'s accuracy on {data} differs from FP32's by {numbers}, McNemar p = {p:.2g}: borderline, "
            f"the interval and the test disagree, so not a finding ({flips}).")


def _delta_se(row: ComparisonRow) -> float:
    """Standard error of a paired accuracy change from its counts of lost and gained examples."""
    n, lost, gained = row.n, row.lost, row.gained
    delta = (gained - lost) / n
    return math.sqrt(max((gained + lost) / n - delta * delta, 0.0) / n)


def domain_finding(in_domain: ComparisonRow, out_domain: ComparisonRow) -> str | None:
    """Does the plan lose more out of domain than in domain?

    Two views that must agree, as for a single set's change: a normal interval for the difference
    of the two changes (independent sets), and Fisher's exact test on the direction of the flips
    (lost vs gained, in domain vs out), which stays valid for a handful of flips.
    """
    counts = [[in_domain.lost, in_domain.gained], [out_domain.lost, out_domain.gained]]
    if sum(map(sum, counts)) == 0:
        return None
    d_in, d_out = in_domain.accuracy_delta, out_domain.accuracy_delta
    diff, se = d_out - d_in, math.hypot(_delta_se(in_domain), _delta_se(out_domain))
    low, high = diff - Z95 * se, diff + Z95 * se
    p = float(stats.fisher_exact(counts).pvalue)
    name, data = _name(out_domain), out_domain.data
    numbers = (f"{points(d_out)} points on {data} (out of domain) vs {points(d_in)} on {in_domain.data} "
               f"(in domain); difference {points(diff)} [{points(low)}, {points(high)}], "
               f"Fisher p = {p:.2g} on which way the flips go")
    interval_says, test_says = not low <= 0 <= high, p < SIGNIFICANCE
    if not interval_says and not test_says:
        return f"{name}: {numbers}: inside the interval, no evidence that out-of-domain text suffers more."
    share = [lost / (lost + gained) if lost + gained else 0.5 for lost, gained in counts]
    if interval_says and test_says and (diff < 0) == (share[1] > share[0]):
        verdict = "loses significantly more" if diff < 0 else "loses significantly less"
        return f"{name} {verdict} on out-of-domain {data} than in domain: {numbers}."
    return f"{name}: {numbers}: borderline, the interval and the test disagree, so not a finding."


def _name(row: ComparisonRow) -> str:
    """The plan's display name, with its runtime when it is not torch."""
    return display_name(row.plan) + ("" if row.runtime == Runtime.TORCH else f" on {row.runtime}")


def _variant(row: ComparisonRow) -> tuple[str, str]:
    return row.plan, row.runtime


def findings(rows: Sequence[ComparisonRow]) -> list[str]:
    """Plain-language sentences computed from the rows: speed, accuracy, domain shift, size; one set per plan
    and runtime (torch FP32 itself, the reference, gets none)."""
    variants = list(dict.fromkeys(_variant(row) for row in rows))
    first = {_variant(row): row for row in reversed(rows)}
    quantized = [v for v in variants if first[v].plan_json != {} or v[1] != Runtime.TORCH]
    out = [speed_finding(first[v]) for v in quantized]
    out += [accuracy_finding(row) for row in rows if _variant(row) in quantized]
    for plan in quantized:
        mine = [row for row in rows if _variant(row) == plan]
        home = next((row for row in mine if _base_set(row.data) == IN_DOMAIN), None)
        for row in mine:
            if home is not None and _base_set(row.data) in OUT_OF_DOMAIN:
                sentence = domain_finding(home, row)
                if sentence:
                    out.append(sentence)
    out += [size_finding(first[p]) for p in quantized]
    return out
