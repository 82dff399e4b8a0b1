"""The one evaluation path: tokenize once, run length-sorted batches, compare with FP32.

`Evaluator` holds one (model, dataset) pair: its tokenized batches and the FP32 baseline (logits,
and optionally the states at every cut). `Evaluator.run` evaluates a plan from any cut of a
previous plan's trace, so the layer map, the sweeps and a plain `evaluate` share one code path,
and the incremental result is the full result, not an approximation of it.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from engine.data import EvalSet, load_dataset
from engine.forward import (EMBEDDING_CUT, Batch, Trace, blocks, capture_calls, check_stages,
                            layer_cuts, run_batch)
from engine.layers import inventory
from engine.measure import Comparison, compare, wilson_interval
from engine.models import fingerprint, positive_index
from engine.plan import FP32, Plan
from engine.quantize import apply_plan

EVAL_BATCH = 32
ENGINE_VERSION = "1"

Progress = Callable[["Partial"], None]


class EvalError(ValueError):
    """An evaluation that cannot run as asked (device, limit, model); the message says why."""


@dataclass(frozen=True)
class Partial:
    """A running estimate while an evaluation is under way."""

    done: int
    total: int
    accuracy: float
    ci95: tuple[float, float]
    agreement: float
    elapsed_s: float


@dataclass
class EvalResult:
    """A plan's outputs on a dataset and how they compare with FP32's."""

    plan: Plan
    kernels: str
    dataset: str
    logits: np.ndarray  # dataset order, columns (negative, positive)
    comparison: Comparison
    seconds: float
    start_cut: int = EMBEDDING_CUT

    @property
    def probs(self) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.logits, dtype=torch.float64), -1).numpy()

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(-1)

    def as_dict(self) -> dict:
        return self.comparison.as_dict()

    def summary(self) -> dict:
        """What the pages keep of a result (and the cache stores): the figures, flips, positive probabilities."""
        return {**self.as_dict(), "flipped": list(self.comparison.flipped),
                "positive_probs": self.probs[:, 1].astype(np.float32).tolist(), "plan": self.plan.to_json(),
                "kernels": self.kernels, "data": self.dataset, "seconds": self.seconds, "start_cut": self.start_cut}


def resolve_device(device: str | None) -> torch.device:
    """A torch device from 'cpu'/'cuda'; asking for CUDA where there is none is a clear error."""
    name = (device or "cpu").lower()
    if name not in ("cpu", "cuda"):
        raise EvalError(f"device must be cpu or cuda, not {device!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("CUDA was selected but this machine has no CUDA device; use --device cpu")
    return torch.device(name)


_ON_DEVICE: dict[tuple[int, str], nn.Module] = {}


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` (a moved copy, kept per process; the CPU model itself is never moved)."""
    if device.type == "cpu":
        return model
    key = (id(model), str(device))
    if key not in _ON_DEVICE:
        # A full copy: .to() moves Parameter objects in place (set_data), so a copy that shared them
        # would move the shared CPU model too. The fingerprint is device-independent.
        _ON_DEVICE[key] = copy.deepcopy(model).to(device)
    return _ON_DEVICE[key]


class Evaluator:
    """Tokenized, length-sorted batches of one dataset for one model, and the FP32 baseline."""

    def __init__(self, model: nn.Module, tokenizer, dataset: EvalSet, batch_size: int = EVAL_BATCH,
                 device: str | None = "cpu", keep_states: bool = False):
        if len(dataset) == 0:
            raise EvalError(f"dataset {dataset.name} is empty")
        self.device = resolve_device(device)
        self.model = model_on(model, self.device)
        self.tokenizer, self.dataset, self.batch_size = tokenizer, dataset, batch_size
        self.keep_states = keep_states
        self.labels = np.asarray(dataset.labels)
        self.layers = inventory(model)
        self.cuts = layer_cuts(model)
        self.n_blocks = len(blocks(model))
        positive = positive_index(model)
        self.columns = [1 - positive, positive]
        self.batches = self._tokenize()
        check_stages(self.model, self.batches[0])
        self.baseline_trace = Trace()
        self.baseline = self._run(FP32, "simulated", None, EMBEDDING_CUT, self.baseline_trace if keep_states else None)
        self.baseline_logits = self.baseline.logits
        self.lock = threading.Lock()

    # ---- setup --------------------------------------------------------------------------
    def _tokenize(self) -> list[Batch]:
        max_length = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 512)
        encoded = self.tokenizer(list(self.dataset.texts), truncation=True, max_length=max_length)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        order = np.argsort(lengths, kind="stable")
        pad_id = self.tokenizer.pad_token_id or 0
        batches = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = int(lengths[rows].max())
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :lengths[row]] = torch.tensor(encoded["input_ids"][row])
                mask[i, :lengths[row]] = 1
            batch = Batch(torch.as_tensor(rows), ids.to(self.device), mask.to(self.device),
                          tokens=int(lengths[rows].sum()))
            capture_calls(self.model, batch)
            batches.append(batch)
        return batches

    def schedule(self) -> list[int]:
        """Batch order for a run: strided over lengths, so the first batches give a fair early estimate."""
        stride = max(1, round(len(self.batches) ** 0.5))
        return [i for offset in range(stride) for i in range(offset, len(self.batches), stride)]

    # ---- running ------------------------------------------------------------------------
    def start_cut(self, old: Plan, new: Plan) -> int | None:
        """The first cut whose state differs between two plans; None when they compute the same thing."""
        if old.key() == new.key():
            return None
        if old.options() != new.options():
            return EMBEDDING_CUT
        names = [layer.name for layer in self.layers]
        before, after = old.resolve(names, strict=False), new.resolve(names, strict=False)
        changed = [self.cuts[name] for name in names if before[name] != after[name]]
        return min(changed) if changed else None

    def run(self, plan: Plan = FP32, kernels: str = "simulated", previous: tuple[Plan, Trace] | None = None,
            keep: bool = False, progress: Progress | None = None) -> tuple[EvalResult, Trace | None]:
        """Evaluate `plan`; with `previous` (a plan and its trace), start where the plans first differ."""
        start = EMBEDDING_CUT
        if previous is not None:
            cut = self.start_cut(previous[0], plan)
            start = 2 * self.n_blocks if cut is None else cut
        trace = Trace() if keep else None
        result = self._run(plan, kernels, previous[1] if previous else None, start, trace, progress)
        return result, trace

    def _run(self, plan: Plan, kernels: str, source: Trace | None, start: int, keep: Trace | None,
             progress: Progress | None = None) -> EvalResult:
        started = time.perf_counter()
        model = self.model if plan.key() == FP32.key() and kernels == "simulated" else \
            apply_plan(self.model, plan, kernels, calibration=self.calibration(plan))
        logits = np.zeros((len(self.dataset), 2), dtype=np.float32)
        states: list[dict[int, torch.Tensor]] = [dict() for _ in self.batches]
        done_rows: list[torch.Tensor] = []
        if source is None or not source.states:
            start = EMBEDDING_CUT
        with torch.inference_mode():
            for step, index in enumerate(self.schedule()):
                batch = self.batches[index]
                kept = states[index] if keep is not None else None
                state = source.states[index].get(start) if start >= 0 else None
                if kept is not None and start >= 0:
                    kept.update({c: t for c, t in source.states[index].items() if c <= start})
                out = run_batch(model, batch, start, state, kept)
                logits[batch.rows.numpy()] = out[:, self.columns].float().cpu().numpy()
                done_rows.append(batch.rows)
                if progress is not None:
                    progress(self._partial(logits, torch.cat(done_rows).numpy(), started))
        if keep is not None:
            keep.states = states
        reference = getattr(self, "baseline_logits", logits)
        return EvalResult(plan, kernels, self.dataset.name, logits, compare(logits, self.labels, reference),
                          time.perf_counter() - started, start)

    def _partial(self, logits: np.ndarray, rows: np.ndarray, started: float) -> Partial:
        predictions = logits[rows].argmax(-1)
        correct = int((predictions == self.labels[rows]).sum())
        reference = getattr(self, "baseline_logits", logits)[rows].argmax(-1)
        return Partial(len(rows), len(self.dataset), correct / len(rows), wilson_interval(correct, len(rows)),
                       float((predictions == reference).mean()), time.perf_counter() - started)

    def calibration(self, plan: Plan) -> dict | None:
        """Calibration statistics when the plan needs them (static scales, smoothing)."""
        if plan.smooth_alpha is None and plan.act != "static":
            return None
        from engine.smoothquant import calibrate

        return calibrate(self.model, self.tokenizer, plan.calib)


_EVALUATORS: dict[tuple, Evaluator] = {}
_EVALUATORS_LOCK = threading.Lock()


def get_evaluator(model: nn.Module, tokenizer, dataset: EvalSet, device: str | None = "cpu",
                  keep_states: bool = False) -> Evaluator:
    """One Evaluator per (weights, dataset, device) in this process, built on first use."""
    key = (fingerprint(model), dataset.fingerprint, str(device), keep_states)
    with _EVALUATORS_LOCK:
        if key not in _EVALUATORS:
            if not keep_states and (key[:3] + (True,)) in _EVALUATORS:
                return _EVALUATORS[key[:3] + (True,)]
            _EVALUATORS[key] = Evaluator(model, tokenizer, dataset, device=device, keep_states=keep_states)
        return _EVALUATORS[key]


def evaluate(model: nn.Module, tokenizer, dataset: str | EvalSet = "embedded", plan: Plan | str | dict = FP32,
             kernels: str = "simulated", limit: int | None = None, device: str | None = "cpu",
             progress: Progress | None = None) -> dict:
    """Accuracy with its 95% CI, agreement and flips against FP32, KL, McNemar p and size of a plan."""
    from engine.measure import model_size_bytes
    from engine.plan import parse_plan

    plan = parse_plan(plan) if isinstance(plan, str) else Plan.from_json(plan) if isinstance(plan, dict) else plan
    plan.resolve([layer.name for layer in inventory(model)])  # validate before any work
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    data = data.head(limit)
    evaluator = get_evaluator(model, tokenizer, data, device)
    result, _ = evaluator.run(plan, kernels, progress=progress)
    out = result.as_dict()
    out.update({"size_bytes": model_size_bytes(model, plan), "plan": plan.to_json(), "kernels": kernels,
                "data": data.name, "device": str(evaluator.device), "seconds": round(result.seconds, 3)})
    return out


@dataclass
class Session:
    """One browser session's current plan and its trace, for incremental updates."""

    evaluator: Evaluator
    plan: Plan = field(default_factory=lambda: FP32)
    trace: Trace | None = None
    result: EvalResult | None = None

    def update(self, plan: Plan, progress: Progress | None = None) -> EvalResult:
        """Evaluate `plan` starting where it first differs from the current plan, then make it current."""
        if self.trace is None:
            self.trace, self.result = self.evaluator.baseline_trace, self.evaluator.baseline
        if self.result is not None and plan.key() == self.plan.key():
            return self.result
        result, trace = self.evaluator.run(plan, "simulated", previous=(self.plan, self.trace), keep=True,
                                           progress=progress)
        self.plan, self.trace, self.result = plan, trace, result
        return result
