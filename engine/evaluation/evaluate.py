"""`evaluate`, the contract's one call, and the process-wide evaluators behind every page and command."""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any, Mapping

from cachetools import LRUCache
from torch import nn

from engine.data.sets import EvalSet, load_dataset
from engine.core.memo import memo
from engine.core.plan import FP32, PlanLike, as_plan
from engine.core.stats import Figures
from engine.core.vocabulary import Kernels
from engine.evaluation.evaluator import Evaluator, Progress
from engine.model.inventory import list_layers
from engine.model.loading import fingerprint
from engine.runtime.size import model_size_bytes

PER_SENTENCE = ("flipped", "predicted", "confidence", "start_cut")
_LOCK = threading.Lock()
_EVALUATORS: LRUCache = memo("evaluation.evaluators", LRUCache(maxsize=8), _LOCK)


def get_evaluator(model: nn.Module, tokenizer, dataset: EvalSet, device: str | None = "cpu",
                  keep_states: bool = False) -> Evaluator:
    """One Evaluator per (weights, data set, device) in this process, built on first use; one that
    keeps states serves callers that do not need them too. An evaluator whose model was edited in place
    since (its weights no longer those of the key) is dropped, never served for the weights it had."""
    key = (fingerprint(model), dataset.fingerprint, str(device or "cpu"))
    with _LOCK:
        for wanted in ((True,) if keep_states else (False, True)):
            found = _EVALUATORS.get(key + (wanted,))
            if found is not None and fingerprint(found.model) == key[0]:
                return found
            _EVALUATORS.pop(key + (wanted,), None)
    evaluator = Evaluator(model, tokenizer, dataset, device=device, keep_states=keep_states)
    with _LOCK:
        return _EVALUATORS.setdefault(key + (keep_states,), evaluator)


def figures(summary: dict, size_bytes: int, device: str) -> dict:
    """`evaluate`'s figures from a result's summary (what the cache keeps), so that a stored evaluation
    and a fresh one read the same."""
    out = {k: v for k, v in summary.items() if k not in PER_SENTENCE}
    out.update({"size_bytes": size_bytes, "device": device, "seconds": round(summary["seconds"], 3)})
    return out


@dataclass(frozen=True, kw_only=True)
class EvalSummary(Figures):
    """What `evaluate` reports of a plan on a set, in `eval --json`'s order; `to_json()` is that document."""

    plan: dict
    kernels: str
    data: str
    seconds: float
    size_bytes: int
    device: str
    classes: tuple[str, ...]
    calibration: str | None = None  # the calibration texts' source, for a plan that calibrates

    def __post_init__(self) -> None:
        # JSON and the figures give lists: kept as tuples, so a summary is a value.
        object.__setattr__(self, "ci95", tuple(self.ci95))
        object.__setattr__(self, "classes", tuple(self.classes))

    def to_json(self) -> dict[str, Any]:
        """The contract's dict (no "calibration" key for a plan that does not calibrate)."""
        out = {f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
               for f in fields(self)}
        if self.calibration is None:
            del out["calibration"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalSummary:
        """From `to_json()`'s dict; keys it does not know are ignored, a missing field is a TypeError."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def summarize(model: nn.Module, tokenizer, dataset: str | EvalSet = "embedded", plan: PlanLike = FP32,
              kernels: str = Kernels.SIMULATED, limit: int | None = None, device: str | None = "cpu",
              progress: Progress | None = None) -> EvalSummary:
    """Accuracy with its 95% CI, agreement and flips against FP32, KL, McNemar p and size of a plan."""
    plan = as_plan(plan)
    plan.resolve(list_layers(model))  # a bad pattern is reported before any work
    data = (load_dataset(dataset) if isinstance(dataset, str) else dataset).head(limit)
    evaluator = get_evaluator(model, tokenizer, data, device)
    result, _ = evaluator.run(plan, kernels, progress=progress)
    out = figures(result.summary().to_json(), model_size_bytes(model, plan), str(evaluator.device))
    return EvalSummary(**out, classes=evaluator.classes.names,
                       calibration=data.calibration_source if plan.needs_calibration else None)


def evaluate(model: nn.Module, tokenizer, dataset: str | EvalSet = "embedded", plan: PlanLike = FP32,
             kernels: str = Kernels.SIMULATED, limit: int | None = None, device: str | None = "cpu",
             progress: Progress | None = None) -> dict:
    """The contract's call: `summarize`'s figures as the dict that `eval --json` prints."""
    return summarize(model, tokenizer, dataset, plan, kernels, limit, device, progress).to_json()
