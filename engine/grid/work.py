"""The grid's one adapter to the engine: describe a model and a set, open a worker state, run a task.

Every other grid module calls the engine only through these functions, so when the engine's
evaluation moves, only this file changes. A worker state is one model on one set: the model is loaded
and the set tokenized once, with the FP32 baseline (and, for sensitivity rows, its states at every
cut), and then serves many tasks. A task's figures are the ones `eval --json` and `sensitivity --json`
print, computed by the same calls.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, fields

import torch
from torch import nn

from engine.data import EvalSet, load_dataset
from engine.evaluation import EVAL_BATCH, Evaluator
from engine.forward import Trace
from engine.layers import inventory
from engine.measure import bench, model_size_bytes
from engine.models import fingerprint, load_model
from engine.plan import FP32, Plan
from engine.sensitivity import SWEEP_PRECISIONS, Row, layer_plan, sqnr_proxy

__all__ = ["EVAL_BATCH", "SENSITIVITY_FIELDS", "ModelInfo", "WorkerState", "close_state", "data_fingerprint",
           "describe_model", "open_state", "run_task", "sweep_plan_key", "worker_id"]

SENSITIVITY_FIELDS = tuple(f.name for f in fields(Row))
LATENCY_TOKENS = 32
LATENCY_MIN_SECONDS = 0.5

_loaded: dict[str, tuple[nn.Module, object]] = {}  # the last model loaded in this process, by name


@dataclass(frozen=True)
class ModelInfo:
    """What the driver needs of a model: its weights' fingerprint and its layers (name, kind) in forward order."""

    name: str
    fingerprint: str
    layers: tuple[tuple[str, str], ...]


def _load(name: str) -> tuple[nn.Module, object]:
    """load_model, keeping only the last model: the driver describes a model that a local run opens next."""
    if name not in _loaded:
        _loaded.clear()
        _loaded[name] = load_model(name)
    return _loaded[name]


def describe_model(name: str) -> ModelInfo:
    model, _ = _load(name)
    return ModelInfo(name, fingerprint(model), tuple((layer.name, layer.kind) for layer in inventory(model)))


def data_fingerprint(name: str, limit: int | None) -> str:
    return load_dataset(name).head(limit).fingerprint


def sweep_plan_key(layer: str, precision: str) -> str:
    """The plan key of a sensitivity row (the layer alone at the precision), as the sensitivity page keys it."""
    return layer_plan(layer, precision, "one").key()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerState:
    """One model on one set, ready to evaluate plans: built once per worker, used by many tasks."""

    model: nn.Module
    tokenizer: object
    data: EvalSet
    evaluator: Evaluator
    model_fp: str
    data_fp: str
    open_s: float
    sqnr: dict[tuple[str, str], float] | None = None


def open_state(model: str, data: str, limit: int | None = None, device: str = "cpu", keep_states: bool = False,
               threads: int | None = None) -> WorkerState:
    """Load the model, tokenize the set and run its FP32 baseline (keeping every cut's states for
    sensitivity rows); `threads` sets torch's thread count for this process."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    net, tokenizer = _load(model)
    evalset = load_dataset(data).head(limit)
    evaluator = Evaluator(net, tokenizer, evalset, device=device, keep_states=keep_states)
    return WorkerState(net, tokenizer, evalset, evaluator, fingerprint(net), evalset.fingerprint,
                       time.perf_counter() - started)


def close_state(state: WorkerState) -> None:
    """Let go of the state's evaluator (its batches and states): the model stays loaded for the next state."""
    state.evaluator = None  # type: ignore[assignment]
    state.sqnr = None


def run_task(state: WorkerState, task) -> dict:
    """The task's figures: `eval --json`'s fields for an evaluation, a `sensitivity --json` row for a layer."""
    if task.model_fp and task.model_fp != state.model_fp:
        raise ValueError(f"the weights of {task.model} on this worker differ from the driver's "
                         f"(fingerprint {state.model_fp}, expected {task.model_fp})")
    if task.data_fp and task.data_fp != state.data_fp:
        raise ValueError(f"set {task.data} on this worker differs from the driver's")
    if task.kind == "eval":
        return _evaluate(state, task)
    return _sensitivity_row(state, task)


def _evaluate(state: WorkerState, task) -> dict:
    """What engine.evaluation.evaluate returns, on this state's evaluator (no second tokenization)."""
    plan = Plan.from_json(json.loads(task.plan))
    plan.resolve([layer.name for layer in state.evaluator.layers])  # a pattern matching no layer: this task's error
    result, _ = state.evaluator.run(plan, task.kernels)
    out = result.as_dict()
    out.update({"size_bytes": model_size_bytes(state.model, plan), "plan": plan.to_json(), "kernels": task.kernels,
                "data": state.data.name, "device": str(state.evaluator.device), "seconds": round(result.seconds, 3)})
    if task.latency:
        timed = bench(state.model, state.tokenizer, plan, batch=1, tokens=LATENCY_TOKENS, device=task.device,
                      texts=state.data.texts, min_seconds=LATENCY_MIN_SECONDS)
        out.update({k: timed[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s")})
        out["machine"] = {**timed["machine"], "host": socket.gethostname(), "tokens": LATENCY_TOKENS, "batch": 1}
    out["_summary"] = result.summary()  # the layer map page's cached form of an evaluation
    return out


def _sensitivity_row(state: WorkerState, task) -> dict:
    """One row of `sensitivity --direction one`: the layer alone at the precision, from its cut of the FP32 states."""
    evaluator = state.evaluator
    if not evaluator.keep_states:
        raise ValueError("this worker state keeps no FP32 states; open it with keep_states=True for sensitivity rows")
    layer = next((item for item in evaluator.layers if item.name == task.layer), None)
    if layer is None:
        raise ValueError(f"model {task.model} has no layer {task.layer!r}")
    if state.sqnr is None:
        state.sqnr = sqnr_proxy(state.model, state.tokenizer, precisions=SWEEP_PRECISIONS)
    started = time.perf_counter()
    plan = layer_plan(layer.name, task.precision, "one")
    previous: tuple[Plan, Trace] = (FP32, evaluator.baseline_trace)
    evaluated, _ = evaluator.run(plan, previous=previous)
    c = evaluated.comparison
    base = evaluator.baseline.comparison.accuracy
    row = Row(layer.name, layer.block, layer.role, task.precision, "one", c.accuracy, tuple(c.ci95), c.flips, c.kl,
              c.mcnemar_p, state.sqnr.get((layer.name, task.precision)), 100.0 * (base - c.accuracy), c.agreement,
              c.n, evaluated.start_cut, time.perf_counter() - started)
    return row.as_dict()
