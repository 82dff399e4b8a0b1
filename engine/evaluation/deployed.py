"""The exported model itself on the one evaluation path: ONNX Runtime runs the evaluator's own fixed,
length-sorted batches (an int8 activation scale covers a whole batch, so the batches decide the numbers),
and its logits are compared with torch FP32's, as every other plan's are."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from engine.core.plan import Plan
from engine.core.stats import compare
from engine.core.vocabulary import Runtime
from engine.evaluation.evaluator import EvalResult, Evaluator
from engine.runtime.onnx_session import OrtClassifier


def evaluate_exported(evaluator: Evaluator, folder: str | Path, threads: int | None = None) -> EvalResult:
    """The exported folder's predictions on the evaluator's set, against the torch FP32 baseline."""
    started = time.perf_counter()
    classifier = OrtClassifier(folder, threads)
    logits = np.zeros_like(evaluator.baseline_logits)
    for batch in evaluator.batches:
        logits[batch.rows] = classifier.logits(batch.inputs["input_ids"].cpu().numpy(),
                                               batch.inputs["attention_mask"].cpu().numpy())
    plan = Plan.from_json(json.loads((Path(folder) / "plan.json").read_text()))
    return EvalResult(plan, Runtime.ONNXRUNTIME, evaluator.dataset.name, logits,
                      compare(logits, evaluator.labels, evaluator.baseline_logits), time.perf_counter() - started)
