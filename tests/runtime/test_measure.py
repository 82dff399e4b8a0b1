"""Measurement: Wilson intervals and exact McNemar against known values, KL, compare(), sizes, timing."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from engine.analysis.benchmark import bench, bench_against
from engine.core.plan import FP32, Plan
from engine.core.stats import (bootstrap_diff_interval, compare, mcnemar_exact, mean_kl, median_interval,
                               wilson_interval)
from engine.runtime.latency import interleaved, paired_speedup, time_call
from engine.runtime.size import serialized_bytes


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n, expected", [
    (8, 10, (0.4902, 0.9433)),   # published Wilson 95% values, to 4 places
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (1, 2, (0.0945, 0.9055)),
])
def test_wilson_known_values(k, n, expected):
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected[0], abs=5e-5)
    assert high == pytest.approx(expected[1], abs=5e-5)


@pytest.mark.parametrize("k, n", [(0, 1), (3, 7), (850, 1000), (999, 1056), (500, 1000)])
def test_wilson_matches_the_formula(k, n):
    low, high = wilson_interval(k, n)
    by_hand = _wilson_by_hand(k, n)
    assert low == pytest.approx(max(0.0, by_hand[0]), abs=1e-9)
    assert high == pytest.approx(min(1.0, by_hand[1]), abs=1e-9)
    assert low <= k / n <= high


def test_wilson_empty_and_narrowing():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    small = wilson_interval(85, 100)
    large = wilson_interval(850, 1000)
    assert large[1] - large[0] < small[1] - small[0]


def _pairs(only_base: int, only_other: int, both: int = 3, neither: int = 2) -> tuple[np.ndarray, np.ndarray]:
    base = [True] * only_base + [False] * only_other + [True] * both + [False] * neither
    other = [False] * only_base + [True] * only_other + [True] * both + [False] * neither
    return np.array(base), np.array(other)


@pytest.mark.parametrize("only_base, only_other, expected", [
    (0, 5, 0.0625),      # 2 * 0.5**5
    (5, 0, 0.0625),
    (1, 4, 0.375),       # 2 * (1 + 5) / 32
    (3, 3, 1.0),
    (0, 0, 1.0),         # no discordant pairs: no evidence of a difference
    (2, 10, 2 * sum(math.comb(12, i) for i in range(3)) / 2 ** 12),
])
def test_mcnemar_exact_hand_cases(only_base, only_other, expected):
    base, other = _pairs(only_base, only_other)
    p = mcnemar_exact(base, other)
    assert p == pytest.approx(expected, rel=1e-9)
    if only_base + only_other:
        assert p == pytest.approx(stats.binomtest(only_base, only_base + only_other, 0.5).pvalue, rel=1e-12)


def test_mcnemar_ignores_concordant_pairs():
    a = mcnemar_exact(*_pairs(2, 9, both=0, neither=0))
    b = mcnemar_exact(*_pairs(2, 9, both=500, neither=300))
    assert a == b


def test_mean_kl():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 2))
    assert mean_kl(logits, logits) == 0.0
    assert mean_kl(logits, logits + 7.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant: same probabilities
    other = logits + rng.normal(size=(50, 2))
    kl = mean_kl(logits, other)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    q = np.exp(other) / np.exp(other).sum(-1, keepdims=True)
    assert kl > 0
    assert kl == pytest.approx(float(np.mean(np.sum(p * np.log(p / q), -1))), rel=1e-9)


def test_compare_fields():
    labels = np.array([1, 0, 1, 1, 0, 0])
    reference = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0], [0, 1]], dtype=float)  # FP32: 4/6 correct
    logits = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0], [1, 0]], dtype=float)     # plan: 5/6 correct
    result = compare(logits, labels, reference)
    assert result.n == 6
    assert result.accuracy == pytest.approx(5 / 6)
    assert result.ci95 == pytest.approx(wilson_interval(5, 6))
    assert result.flipped == (2, 3, 5)
    assert result.flips == 3
    assert result.agreement == pytest.approx(3 / 6)
    assert result.kl == pytest.approx(mean_kl(reference, logits))
    # FP32 right and plan wrong: 1 (row 3); FP32 wrong and plan right: 2 (rows 2, 5)
    assert result.mcnemar_p == pytest.approx(stats.binomtest(1, 3, 0.5).pvalue)
    data = result.to_json()
    assert set(data) == {"accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p"}
    assert isinstance(data["ci95"], list) and len(data["ci95"]) == 2


def test_compare_with_itself():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 2))
    labels = rng.integers(0, 2, 40)
    result = compare(logits, labels, logits)
    assert (result.agreement, result.flips, result.flipped, result.kl, result.mcnemar_p) == (1.0, 0, (), 0.0, 1.0)


def test_bootstrap_diff_interval():
    rng = np.random.default_rng(2)
    base = rng.random(400) < 0.8
    other = base.copy()
    other[:40] = ~other[:40]
    low, high = bootstrap_diff_interval(base, other)
    observed = float(other.mean() - base.mean())
    assert low <= observed <= high
    assert high - low < 0.1
    assert bootstrap_diff_interval(base, other) == (low, high)  # seeded: reproducible
    assert bootstrap_diff_interval(base, base) == (0.0, 0.0)


def test_serialized_bytes_counts_the_weights():
    small, large = nn.Linear(10, 10), nn.Linear(100, 100)
    assert 440 <= serialized_bytes(small) < 440 + 4096
    assert serialized_bytes(large) - serialized_bytes(small) == pytest.approx((10100 - 110) * 4, rel=0.05)
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(large, nn.ReLU(), small), {nn.Linear})
    saved = io.BytesIO()
    torch.save(quantized.state_dict(), saved)
    assert serialized_bytes(quantized) == saved.getbuffer().nbytes  # counted, never held, and exact


def test_time_call_counts():
    calls = []
    times = time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(times) == 5 and len(calls) == 7
    assert np.all(times >= 0)
    times = time_call(lambda: None, warmup=0, repeats=1, min_seconds=0.05)
    assert times.sum() <= 0.05 + 0.05 and len(times) > 1


def test_bench_fields(tiny_bert, tokenizer):
    result = bench(tiny_bert, tokenizer, Plan.uniform("int8"), batch=2, tokens=16, min_seconds=0.0)
    for key in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s", "size_bytes", "threads", "batch",
                "tokens", "runtime", "device", "peak_memory_bytes", "machine"):
        assert key in result, key
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p95"]
    assert result["throughput_per_s"] == pytest.approx(2 / (result["latency_ms_p50"] / 1e3))
    assert (result["batch"], result["tokens"], result["device"]) == (2, 16, "cpu")
    assert result["threads"] == torch.get_num_threads()
    assert result["size_bytes"] > 0 and result["runtime"] == "torch"
    assert result["machine"]["load_average"] is None or result["machine"]["load_average"] >= 0
    with pytest.raises(ValueError):
        bench(tiny_bert, tokenizer, Plan.uniform("int8"), batch=0)


def test_interleaved_timing_rotates_and_pairs_rounds():
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=4)
    assert all(len(t) == 4 for t in times.values())
    timed = order[6:]  # after three warm-up calls each
    assert timed[:2] == ["a", "b"] and timed[2:4] == ["b", "a"]  # the order rotates every round
    speedup, (low, high) = paired_speedup(np.array([2.0, 2.0, 2.2, 1.8]), np.array([1.0, 1.0, 1.1, 0.9]))
    assert speedup == pytest.approx(2.0) and low <= 2.0 <= high


def test_median_interval_covers_the_median():
    values = np.arange(1.0, 101.0)
    low, high = median_interval(values)
    assert low < np.median(values) < high and (low, high) == (40.0, 61.0)  # the textbook ranks for n = 100


def test_bench_against_measures_both_in_one_run(tiny_bert, tokenizer):
    out = bench_against(tiny_bert, tokenizer, {"fp32": FP32, "int8": Plan.uniform("int8")}, "fp32", batch=1,
                        tokens=8, repeats=5, min_seconds=0.0)
    assert out["fp32"]["speedup"] == 1.0 and out["int8"]["repeats"] == out["fp32"]["repeats"] >= 5
    low, high = out["int8"]["speedup_ci95"]
    assert low <= out["int8"]["speedup"] <= high and len(out["int8"]["load_average"]) == 2
