"""Measurement: accuracy with its Wilson interval, agreement, flips, KL, exact McNemar, size, latency.

Every figure the dashboard shows comes from here, so every page reports the same statistics.
"""
from __future__ import annotations

import io
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (scipy's implementation)."""
    if n <= 0:
        return (0.0, 1.0)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_exact(base_correct: np.ndarray, other_correct: np.ndarray) -> float:
    """Exact McNemar p-value: a two-sided binomial test on the discordant pairs."""
    base_correct = np.asarray(base_correct, dtype=bool)
    other_correct = np.asarray(other_correct, dtype=bool)
    only_base = int(np.sum(base_correct & ~other_correct))
    only_other = int(np.sum(~base_correct & other_correct))
    if only_base + only_other == 0:
        return 1.0
    return float(stats.binomtest(only_base, only_base + only_other, 0.5).pvalue)


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over examples of KL(p_reference || p), from logits, in nats."""
    ref = torch.log_softmax(torch.as_tensor(reference_logits, dtype=torch.float64), -1)
    cur = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    return float(torch.sum(ref.exp() * (ref - cur), -1).mean().clamp_min(0.0))


def bootstrap_diff_interval(base_correct: np.ndarray, other_correct: np.ndarray,
                            confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of accuracy(other) - accuracy(base), via scipy.stats.bootstrap."""
    diff = np.asarray(other_correct, dtype=float) - np.asarray(base_correct, dtype=float)
    if len(diff) < 2 or np.all(diff == diff[0]):
        return (float(diff.mean()) if len(diff) else 0.0,) * 2
    result = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


@dataclass(frozen=True)
class Comparison:
    """How a set of predictions compares with the labels and with FP32's predictions."""

    accuracy: float
    ci95: tuple[float, float]
    n: int
    agreement: float
    flips: int
    flipped: tuple[int, ...]
    kl: float
    mcnemar_p: float

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95), "n": self.n, "agreement": self.agreement,
                "flips": self.flips, "kl": self.kl, "mcnemar_p": self.mcnemar_p}


def compare(logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray) -> Comparison:
    """Accuracy with CI, agreement, flips, KL and McNemar of `logits` against FP32's `reference_logits`.

    `logits` columns are (negative, positive) so that argmax is the label index.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(logits).argmax(-1)
    reference = np.asarray(reference_logits).argmax(-1)
    n = len(labels)
    correct = predictions == labels
    flipped = np.nonzero(predictions != reference)[0]
    return Comparison(
        accuracy=float(correct.mean()) if n else 0.0,
        ci95=wilson_interval(int(correct.sum()), n),
        n=n,
        agreement=float((predictions == reference).mean()) if n else 1.0,
        flips=int(len(flipped)),
        flipped=tuple(int(i) for i in flipped),
        kl=mean_kl(reference_logits, logits) if n else 0.0,
        mcnemar_p=mcnemar_exact(reference == labels, correct),
    )


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict saved with torch.save: the real packed format's size."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def machine() -> dict:
    """Where a timing was taken: processor, torch threads, device."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def time_call(fn, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0,
              sync=None) -> np.ndarray:
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


_SIZES: dict[tuple[str, str], int] = {}


def model_size_bytes(model: nn.Module, plan) -> int:
    """Serialized bytes of `model` with `plan` applied on real kernels (the deployable file's size)."""
    from engine.models import fingerprint
    from engine.quantize import apply_plan

    key = (fingerprint(model), plan.key())
    if key not in _SIZES:
        _SIZES[key] = serialized_bytes(apply_plan(model, plan, "real"))
    return _SIZES[key]


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


def bench_inputs(tokenizer, texts, batch: int, tokens: int, device) -> dict[str, torch.Tensor]:
    """`batch` real sentences, truncated or padded to exactly `tokens` tokens."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def bench(model: nn.Module, tokenizer, plan, batch: int = 1, tokens: int = 32, device: str = "cpu",
          texts=None, min_seconds: float = 1.0) -> dict:
    """Latency p50/p95 and throughput of the plan on real kernels, after warm-up."""
    from engine.data import load_dataset
    from engine.evaluation import model_on, resolve_device
    from engine.quantize import apply_plan

    if batch < 1 or tokens < 2:
        raise ValueError("batch must be at least 1 and tokens at least 2")
    target = resolve_device(device)
    real = apply_plan(model_on(model, target), plan, "real")
    inputs = bench_inputs(tokenizer, texts or load_dataset("embedded").texts, batch, tokens, target)
    sync = torch.cuda.synchronize if target.type == "cuda" else None
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tracked = _reset_peak_rss() if target.type == "cpu" else False
    with torch.inference_mode():
        times = time_call(lambda: real(**inputs), warmup=3, repeats=10 if batch > 1 else 20,
                          min_seconds=min_seconds, sync=sync)
    peak = torch.cuda.max_memory_allocated() if target.type == "cuda" else (_peak_rss_bytes() if tracked else None)
    p50 = float(np.median(times))
    return {"latency_ms_p50": p50 * 1e3, "latency_ms_p95": float(np.percentile(times, 95)) * 1e3,
            "throughput_per_s": batch / p50, "size_bytes": model_size_bytes(model, plan),
            "threads": torch.get_num_threads(), "batch": batch, "tokens": tokens, "device": str(target),
            "repeats": len(times), "peak_memory_bytes": peak, "machine": machine()}
