"""Memoized engine results, the same for every page, the CLI and the grid.

Latency is the exception to "compute once": a timing belongs to the moment and the load it was
taken under, so a cached one carries when and under what load it was measured, and callers show
that (or measure afresh).
"""
from __future__ import annotations

import time
from typing import Callable

from engine.analysis import sensitivity
from engine.analysis.benchmark import bench_against
from engine.analysis.deploy import Exports
from engine.analysis.diagnose import Diagnosis, diagnose, exported_layer_sqnr, sample
from engine.core.plan import Plan
from engine.core.vocabulary import Kernels, Runtime, WeightMethod
from engine.evaluation.evaluator import Cancelled, Evaluator, RunSummary
from engine.runtime.size import model_size_bytes

from cache import cache_dir, keys, lookup, put, remember


def evaluation(evaluator: Evaluator, plan: Plan, kernels: str = Kernels.SIMULATED) -> RunSummary:
    """The plan's summary on the evaluator's set: from the cache, else a full run, stored for every later caller."""
    found = cached_evaluation(evaluator, plan, kernels)
    if found is None:
        found = evaluator.run(plan, kernels)[0].summary()
        store_evaluation(evaluator, plan, found, kernels)
    return found


def cached_evaluation(evaluator: Evaluator, plan: Plan, kernels: str = Kernels.SIMULATED) -> RunSummary | None:
    stored = lookup(keys.evaluator_evaluation(evaluator, plan, kernels))
    return None if stored is None else RunSummary.from_json(stored)


def size(model, plan: Plan) -> int:
    return remember(keys.size(model, plan), lambda: model_size_bytes(model, plan))


def sqnr_proxy(model, tokenizer, evaluator: Evaluator, precisions: tuple[str, ...]) -> dict:
    """The sweep's SQNR proxy on the evaluated source's calibration texts."""
    return remember(keys.sqnr(model, evaluator.dataset.fingerprint, precisions),
                    lambda: sensitivity.sqnr_proxy(model, tokenizer, sensitivity.proxy_texts(evaluator), precisions))


def known_rows(evaluator: Evaluator, precisions, direction: str,
               methods=(WeightMethod.RTN,)) -> dict[tuple, sensitivity.Row]:
    """The rows of a sweep already stored (by any page, the CLI or the grid), keyed by `sensitivity.row_key`:
    RTN's, and those of the other `methods` where they apply (one layer at a time)."""
    out = {}
    for method in methods:
        if method != WeightMethod.RTN and direction != "one":
            continue
        for layer in evaluator.layers:
            for precision in precisions:
                if not sensitivity.applies(layer, precision, method):
                    continue
                found = lookup(keys.sweep_row(evaluator, layer.name, precision, direction, method))
                if found is not None:
                    out[sensitivity.row_key(layer.name, precision, method)] = sensitivity.Row.from_json(found)
    return out


def sweep(evaluator: Evaluator, precisions, direction: str, sqnr: dict | None = None,
          should_stop: Callable[[], bool] | None = None,
          progress: Callable[[sensitivity.SweepProgress], None] | None = None,
          on_row: Callable[[sensitivity.Row], None] | None = None,
          methods=(WeightMethod.RTN,)) -> sensitivity.SweepResult:
    """A sensitivity sweep whose rows (every method's) are memoized one by one: rows computed before (by any
    page, the CLI or the grid) are reused, and a stopped sweep keeps every row it finished."""
    precisions = sensitivity.check_precisions(precisions)
    done = known_rows(evaluator, precisions, direction, methods)

    def store(row: sensitivity.Row) -> None:
        put(keys.sweep_row(evaluator, row.layer, row.precision, row.direction, row.method), row.to_json())
        if on_row is not None:
            on_row(row)

    return sensitivity.sweep(evaluator, precisions, direction, sqnr, done, should_stop, store, progress,
                             methods=tuple(methods))


def latency(model, tokenizer, plan: Plan, reference: Plan, batch: int, tokens: int, device: str = "cpu",
            fresh: bool = False, data=None, cancelled: Callable[[], bool] | None = None) -> dict:
    """The plan's latency and its paired speedup over `reference`, both timed interleaved in one run.

    Cached with the time and load of the measurement; `fresh` measures again (and replaces it). `cancelled` is
    asked between rounds; a cancelled timing raises Cancelled and stores nothing."""
    key = keys.latency(model, plan, reference, batch, tokens, device)
    if not fresh:
        found = lookup(key)
        if found is not None:
            return found
    if plan.runtime == Runtime.ONNXRUNTIME:  # the exported graph itself, timed in the same rounds as torch's reference
        timed = bench_against(model, tokenizer, {"reference": reference}, "reference", batch, tokens, device,
                              data=data, exported={"plan": exports().folder(model, tokenizer, plan, data)},
                              progress=stop_when(cancelled))
    else:
        timed = bench_against(model, tokenizer, {"plan": plan, "reference": reference}, "reference", batch, tokens,
                              device, data=data, progress=stop_when(cancelled))
    value = {**timed["plan"], "reference_latency_ms_p50": timed["reference"]["latency_ms_p50"],
             "measured_at": time.time()}
    put(key, value)
    return value


def diagnosis(model, tokenizer, data, plan: Plan, size: int,
              progress: Callable[[float], None] | None = None) -> Diagnosis:
    """Every op's local and accumulated SQNR under `plan` on a seeded sample of `size` of the set's sentences,
    calibrated on the set's calibration pool (the cache keeps its `to_json()`)."""
    return Diagnosis.from_json(remember(
        keys.diagnosis(model, data.fingerprint, plan, size),
        lambda: diagnose(model, tokenizer, sample(data.texts, size), plan, data.calibration, data.calibration_source,
                         progress).to_json()))


def exported_diagnosis(model, tokenizer, data, plan: Plan, size: int) -> dict[str, float | None]:
    """Each layer's accumulated SQNR measured on the plan's exported graph (ONNX Runtime), on the same sample."""
    return remember(keys.diagnosis(model, data.fingerprint, plan, size, exported=True),
                    lambda: exported_layer_sqnr(model, tokenizer, exports().folder(model, tokenizer, plan, data),
                                                sample(data.texts, size)))


def stop_when(cancelled: Callable[[], bool] | None) -> Callable[[float], None] | None:
    """A progress callback that stops a timing between rounds once `cancelled()` says so."""
    if cancelled is None:
        return None

    def check(_fraction: float) -> None:
        if cancelled():
            raise Cancelled("the timing gave way to an evaluation")
    return check


def store_evaluation(evaluator: Evaluator, plan: Plan, summary: RunSummary,
                     kernels: str = Kernels.SIMULATED) -> None:
    """Kept as its JSON form, which the grid's workers also write under this key."""
    put(keys.evaluator_evaluation(evaluator, plan, kernels), summary.to_json())


def cached_latency(model, plan: Plan, reference: Plan, batch: int, tokens: int, device: str = "cpu") -> dict | None:
    return lookup(keys.latency(model, plan, reference, batch, tokens, device))


def deployed(model, tokenizer, plan: Plan, data, progress: Callable[[str, float], None] | None = None):
    """The plan exported for ONNX Runtime with its card measured on `data`: made once, downloaded by anyone."""
    return exports().deployed(model, tokenizer, plan, data, progress)


def exports() -> Exports:
    """Exported ONNX folders kept beside the cache, reused by every evaluation and timing of a plan on ORT."""
    folder = Exports(cache_dir() / "exports")
    if str(folder.root) not in _swept:  # once per process: what a killed export left behind
        _swept.add(str(folder.root))
        folder.sweep()
    return folder


_swept: set[str] = set()
