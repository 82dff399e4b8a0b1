"""Latency: real measurements only. Warm-up, then the median of repeats, with p95, the thread count,
the machine and its load. Plans meant to be compared are timed interleaved, round by round with the
order rotated, so a busy machine slows every plan alike and a ratio between them is fair.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from engine.core.cpu import features_line

from engine.core.stats import median_interval

WARMUP = 3


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS does not say)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine(device: str | torch.device = "cpu") -> dict:
    """Where a timing was taken: processor, cores, torch threads, torch version, device and current load."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_features": features_line(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
            "load_average": load_average()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe(info: Mapping) -> str:
    """One line naming the machine, e.g. 'x86_64, 2 cores, 2 torch threads, load 1.3'."""
    features = f" ({info['cpu_features']})" if info.get("cpu_features") and not info.get("gpu") else ""
    text = f"{info.get('gpu') or info['cpu']}{features}, {info['cores']} cores, {info['threads']} torch threads"
    return text + (f", load {info['load_average']}" if info.get("load_average") is not None else "")


def time_call(fn: Callable[[], object], warmup: int = WARMUP, repeats: int = 20, min_seconds: float = 0.0,
              sync: Callable[[], None] | None = None) -> np.ndarray:
    """Wall times in seconds of `fn()` after `warmup` calls; `sync` (for CUDA) runs before each clock."""
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return np.array(times)


def interleaved(calls: Mapping[str, Callable[[], object]], repeats: int = 20, min_seconds: float = 0.0,
                sync: Callable[[], None] | None = None,
                progress: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
    """Per-call wall times (s), taken round-robin after warm-up; the order rotates every round so that
    any after-effect of one call on the next is spread over all of them. `progress` hears the fraction done
    after every warm-up call and every round (a callback that raises stops the timing there)."""
    labels = list(calls)
    for label in labels:
        time_call(calls[label], repeats=0, sync=sync)
        if progress is not None:
            progress(0.0)
    times: dict[str, list[float]] = {label: [] for label in labels}
    budget, started, rounds = min_seconds * len(labels), time.perf_counter(), 0
    while rounds < repeats or time.perf_counter() - started < budget:
        shift = rounds % len(labels)
        for label in labels[shift:] + labels[:shift]:
            times[label].extend(time_call(calls[label], warmup=0, repeats=1, sync=sync))
        rounds += 1
        if progress is not None:
            progress(min(1.0, rounds / max(repeats, 1), (time.perf_counter() - started) / budget if budget else 1.0))
    return {label: np.array(values) for label, values in times.items()}


def summary(times: np.ndarray, batch: int) -> dict:
    """Median and p95 in ms, throughput per second at the median, and the number of repeats."""
    p50 = float(np.median(times))
    return {"latency_ms_p50": p50 * 1e3, "latency_ms_p95": float(np.percentile(times, 95)) * 1e3,
            "throughput_per_s": batch / p50, "repeats": int(len(times))}


def paired_speedup(reference: np.ndarray, times: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Median of the per-round ratios reference/plan (same round, same load), with its 95% interval."""
    ratios = np.asarray(reference) / np.asarray(times)
    return float(np.median(ratios)), median_interval(ratios)


def bench_inputs(tokenizer, texts: Sequence[str], batch: int, tokens: int, device) -> dict[str, torch.Tensor]:
    """`batch` real sentences, truncated or padded to exactly `tokens` tokens."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset the process's peak resident set size
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(call: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes while `call` runs: process RSS on the CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    tracked = _reset_peak_rss()
    call()
    return _peak_rss_bytes() if tracked else None
