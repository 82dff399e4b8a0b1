"""The grid's one adapter to the engine: describe a model and a set, open a worker state, run a task.

A worker state is one model on one set: the model is loaded and the set tokenized once, with the FP32
baseline (and, for sensitivity rows, its states at every cut), and then serves many tasks. A task's
result is what the pages cache: an evaluation's summary and size (and its latency when asked), or a
sensitivity row, computed by the calls `eval` and `sensitivity` make.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import torch
from torch import nn

from engine.analysis.benchmark import bench
from engine.analysis.sensitivity import SWEEP_PRECISIONS, measure_row, proxy_texts, sqnr_proxy
from engine.data.sets import EvalSet, load_dataset
from engine.core.memo import memo
from engine.core.vocabulary import TIMING_TOKENS, TaskKind
from engine.evaluation.evaluator import Evaluator
from engine.model.inventory import inventory
from engine.model.loading import fingerprint, load_model
from engine.runtime.latency import machine
from engine.runtime.size import model_size_bytes

LATENCY_MIN_SECONDS = 0.5

_loaded: dict[str, tuple[nn.Module, object]] = memo("grid.loaded_model", {})  # the last model loaded here, by name


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs of a model: its weights' fingerprint and its layers in forward order."""

    fingerprint: str
    layers: tuple[str, ...]


def _load(name: str) -> tuple[nn.Module, object]:
    """load_model, keeping only the last model: the driver describes a model that a local run opens next."""
    if name not in _loaded:
        _loaded.clear()
        _loaded[name] = load_model(name)
    return _loaded[name]


def driver_model(name: str) -> nn.Module:
    return _load(name)[0]


def describe(model: nn.Module) -> ModelInfo:
    return ModelInfo(fingerprint(model), tuple(layer.name for layer in inventory(model)))


def data_fingerprint(name: str, limit: int | None) -> str:
    return load_dataset(name).head(limit).fingerprint


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerState:
    """One model on one set, ready to evaluate plans: built once per worker, used by many tasks."""

    model: nn.Module
    tokenizer: object
    data: EvalSet
    evaluator: Evaluator | None
    model_fp: str
    open_s: float
    sqnr: dict[tuple[str, str], float] | None = None


def open_state(model: str, data: str, limit: int | None = None, device: str = "cpu", keep_states: bool = False,
               threads: int | None = None) -> WorkerState:
    """Load the model, tokenize the set and run its FP32 baseline (keeping its states for sensitivity
    rows); `threads` sets torch's thread count for this process."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    net, tokenizer = _load(model)
    evalset = load_dataset(data).head(limit)
    evaluator = Evaluator(net, tokenizer, evalset, device=device, keep_states=keep_states)
    return WorkerState(net, tokenizer, evalset, evaluator, fingerprint(net), time.perf_counter() - started)


def close_state(state: WorkerState) -> None:
    """Let go of the state's evaluator (its batches and states): the model stays loaded for the next state."""
    state.evaluator, state.sqnr = None, None


def run_task(state: WorkerState, task) -> dict:
    """{"summary", "size_bytes"[, "latency"]} for an evaluation, {"row"} for a sensitivity row."""
    if task.model_fp and task.model_fp != state.model_fp:
        raise ValueError(f"the weights of {task.model} on this worker differ from the driver's "
                         f"(fingerprint {state.model_fp}, expected {task.model_fp})")
    if task.data_fp and task.data_fp != state.data.fingerprint:
        raise ValueError(f"set {task.data} on this worker differs from the driver's")
    if task.kind == TaskKind.EVAL:
        return _evaluate(state, task)
    return {"row": _sensitivity_row(state, task).to_json()}


def _evaluate(state: WorkerState, task) -> dict:
    plan = task.plan_object
    plan.resolve([layer.name for layer in state.evaluator.layers])  # a pattern matching no layer: this task's error
    result, _ = state.evaluator.run(plan, task.kernels)
    out = {"summary": result.summary().to_json(), "size_bytes": model_size_bytes(state.model, plan)}
    if task.latency:
        timed = bench(state.model, state.tokenizer, plan, batch=1, tokens=TIMING_TOKENS, device=task.device,
                      min_seconds=LATENCY_MIN_SECONDS, data=state.data)
        out["latency"] = {**{k: timed[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s")},
                          "machine": {**machine(task.device), "host": socket.gethostname(), "tokens": TIMING_TOKENS,
                                      "batch": 1},
                          "measured_at": time.time()}
    return out


def _sensitivity_row(state: WorkerState, task):
    """One row of `sensitivity --direction one`: the layer alone at the precision, from its cut of the FP32 states."""
    evaluator = state.evaluator
    layer = next((item for item in evaluator.layers if item.name == task.layer), None)
    if layer is None:
        raise ValueError(f"model {task.model} has no layer {task.layer!r}")
    if state.sqnr is None:  # the proxy the sensitivity page shows beside each row, once per worker
        state.sqnr = sqnr_proxy(state.model, state.tokenizer, proxy_texts(evaluator), SWEEP_PRECISIONS)
    return measure_row(evaluator, layer, task.precision, "one", evaluator.baseline_trace, state.sqnr)
