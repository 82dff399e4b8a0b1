"""`evaluate`, the contract's one call, and the process-wide evaluators behind every page and command."""
from __future__ import annotations

import threading

from cachetools import LRUCache
from torch import nn

from engine.core.data import EvalSet, load_dataset
from engine.core.memo import memo
from engine.core.plan import FP32, PlanLike, as_plan
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
    keeps states serves callers that do not need them too."""
    key = (fingerprint(model), dataset.fingerprint, str(device or "cpu"))
    with _LOCK:
        for wanted in ((True,) if keep_states else (False, True)):
            found = _EVALUATORS.get(key + (wanted,))
            if found is not None:
                return found
    evaluator = Evaluator(model, tokenizer, dataset, device=device, keep_states=keep_states)
    with _LOCK:
        return _EVALUATORS.setdefault(key + (keep_states,), evaluator)


def figures(summary: dict, size_bytes: int, device: str) -> dict:
    """`evaluate`'s figures from a result's summary (what the cache keeps), so that a stored evaluation
    and a fresh one read the same."""
    out = {k: v for k, v in summary.items() if k not in PER_SENTENCE}
    out.update({"size_bytes": size_bytes, "device": device, "seconds": round(summary["seconds"], 3)})
    return out


def evaluate(model: nn.Module, tokenizer, dataset: str | EvalSet = "embedded", plan: PlanLike = FP32,
             kernels: str = Kernels.SIMULATED, limit: int | None = None, device: str | None = "cpu",
             progress: Progress | None = None) -> dict:
    """Accuracy with its 95% CI, agreement and flips against FP32, KL, McNemar p and size of a plan."""
    plan = as_plan(plan)
    plan.resolve(list_layers(model))  # a bad pattern is reported before any work
    data = (load_dataset(dataset) if isinstance(dataset, str) else dataset).head(limit)
    evaluator = get_evaluator(model, tokenizer, data, device)
    result, _ = evaluator.run(plan, kernels, progress=progress)
    out = figures(result.summary(), model_size_bytes(model, plan), str(evaluator.device))
    out["classes"] = list(evaluator.classes.names)
    if plan.needs_calibration:
        out["calibration"] = data.calibration_source
    return out
