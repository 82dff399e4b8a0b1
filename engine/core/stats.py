"""Statistics every figure shares: Wilson intervals, exact McNemar, KL, bootstrap and median intervals,
and the one significance level. Everything is K-class: a prediction is the top class, a flip a change
of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

SIGNIFICANCE = 0.05
CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
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
    """Mean over examples of KL(p_reference || p), from logits over any number of classes, in nats."""
    ref = torch.log_softmax(torch.as_tensor(reference_logits, dtype=torch.float64), -1)
    cur = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    return float(torch.sum(ref.exp() * (ref - cur), -1).mean().clamp_min(0.0))


def bootstrap_diff_interval(base_correct: np.ndarray, other_correct: np.ndarray, confidence: float = CONFIDENCE,
                            resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of accuracy(other) - accuracy(base), via scipy.stats.bootstrap."""
    diff = np.asarray(other_correct, dtype=float) - np.asarray(base_correct, dtype=float)
    if len(diff) < 2 or np.all(diff == diff[0]):
        return (float(diff.mean()) if len(diff) else 0.0,) * 2
    result = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def median_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free interval for a median: order statistics at binomial(n, 1/2) quantiles."""
    ordered, n = np.sort(np.asarray(values, dtype=float)), len(values)
    k = int(stats.binom.ppf((1 - confidence) / 2, n, 0.5))
    if k < 1:
        return float(ordered[0]), float(ordered[-1])
    return float(ordered[k - 1]), float(ordered[n - k])


def paired_gain(labels: np.ndarray, base_predictions: np.ndarray,
                predictions: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Accuracy(predictions) - accuracy(base) on the same examples, with its paired bootstrap interval."""
    base_correct, correct = base_predictions == labels, predictions == labels
    return float(correct.mean() - base_correct.mean()), bootstrap_diff_interval(base_correct, correct)


@dataclass(frozen=True, kw_only=True)
class Figures:
    """What every evaluation result begins with, in this order: accuracy with its 95% Wilson interval over n
    sentences, agreement with FP32's predictions, the flips, the mean KL from FP32 and exact McNemar p against
    FP32 (the results that carry them add their own fields after these)."""

    accuracy: float
    ci95: tuple[float, float]
    n: int
    agreement: float
    flips: int
    kl: float
    mcnemar_p: float


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

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95), "n": self.n, "agreement": self.agreement,
                "flips": self.flips, "kl": self.kl, "mcnemar_p": self.mcnemar_p}


def compare(logits: np.ndarray, labels: np.ndarray, reference_logits: np.ndarray) -> Comparison:
    """Accuracy with CI, agreement, flips, KL and McNemar of `logits` against FP32's `reference_logits`.

    Columns are the model's classes in id2label order and `labels` are class indices.
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
