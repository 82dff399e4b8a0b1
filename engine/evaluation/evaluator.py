"""The one evaluation path: tokenize once, run length-sorted batches, compare with FP32.

An `Evaluator` holds one (model, data set) pair: its tokenized batches, the verified cuts of the
model's staged forward, and the FP32 baseline (logits, and optionally the states at every cut).
`Evaluator.run` evaluates a plan from the first cut where it differs from a previous plan whose
states it is given, so the layer map, the sweeps and a plain `evaluate` share one code path and the
incremental result is the full result, not an approximation of it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from engine.data.sets import EvalSet
from engine.core.errors import EngineError
from engine.core.plan import FP32, Plan
from engine.core.settings import settings
from engine.core.stats import Comparison, Figures, compare, wilson_interval
from engine.core.tokens import encode, length_sorted, pad
from engine.core.vocabulary import Kernels, WeightMethod
from engine.model.inventory import inventory
from engine.model.loading import fingerprint, input_limit, label_space
from engine.model.stages import stages_of
from engine.quant.apply import apply_plan
from engine.quant.prepare import build
from engine.runtime.device import model_on, resolve_device

EVAL_BATCH = 32
ENGINE_VERSION = "2"

Progress = Callable[["Partial"], None]


class EvalError(EngineError):
    """An evaluation that cannot run as asked (device, limit, model); the message says why."""


class Cancelled(Exception):
    """The caller asked a running evaluation to stop (between batches)."""


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
class Batch:
    """One length-sorted batch: its rows in the data set and its padded inputs."""

    rows: np.ndarray
    inputs: dict[str, torch.Tensor]
    tokens: int


@dataclass
class Trace:
    """The states one plan produced at every kept cut, per batch."""

    plan: Plan
    states: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def cut_bytes(self, shared: "Trace | None" = None) -> dict[int, int]:
        """Bytes of the states this trace holds at each cut, leaving out those `shared` (the FP32 baseline) also
        holds."""
        seen = {id(t) for batch in (shared.states if shared else ()) for t in batch.values()}
        sizes: dict[int, int] = {}
        for batch in self.states:
            for cut, tensor in batch.items():
                if id(tensor) not in seen:
                    sizes[cut] = sizes.get(cut, 0) + tensor.numel() * tensor.element_size()
        return sizes

    def nbytes(self, shared: "Trace | None" = None) -> int:
        """Bytes of the states this trace holds that `shared` (the FP32 baseline) does not also hold."""
        return sum(self.cut_bytes(shared).values())


@dataclass
class EvalResult:
    """A plan's outputs on a data set and how they compare with FP32's."""

    plan: Plan
    kernels: str
    dataset: str
    logits: np.ndarray  # data set order, columns = the model's classes in id2label order
    comparison: Comparison
    seconds: float
    start_cut: int = 0

    @property
    def probs(self) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.logits, dtype=torch.float64), -1).numpy()

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(-1)

    def to_json(self) -> dict:
        return self.comparison.to_json()

    def summary(self) -> "RunSummary":
        """What the pages keep of a result (and the cache stores): the figures, flips, each row's
        predicted class and its probability."""
        probs = self.probs
        predicted = probs.argmax(-1)
        c = self.comparison
        return RunSummary(accuracy=c.accuracy, ci95=tuple(c.ci95), n=c.n, agreement=c.agreement, flips=c.flips,
                          kl=c.kl, mcnemar_p=c.mcnemar_p, flipped=c.flipped,
                          predicted=tuple(predicted.tolist()),
                          confidence=tuple(probs[np.arange(len(probs)), predicted].astype(np.float32).tolist()),
                          plan=self.plan.to_json(), kernels=self.kernels, data=self.dataset, seconds=self.seconds,
                          start_cut=self.start_cut)


@dataclass(frozen=True, kw_only=True)
class RunSummary(Figures):
    """A plan's figures on a set against FP32, which rows flipped, each row's predicted class index and its
    probability: what a page shows of an evaluation and the cache keeps (as `to_json()`) for every session."""

    flipped: tuple[int, ...]  # rows whose prediction differs from FP32's, in data set order
    predicted: tuple[int, ...]
    confidence: tuple[float, ...]
    plan: dict
    kernels: str
    data: str
    seconds: float
    start_cut: int = 0

    @property
    def comparison(self) -> Comparison:
        return Comparison(accuracy=self.accuracy, ci95=self.ci95, n=self.n, agreement=self.agreement,
                          flips=self.flips, flipped=self.flipped, kl=self.kl, mcnemar_p=self.mcnemar_p)

    @property
    def predictions(self) -> np.ndarray:
        return np.asarray(self.predicted)

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "ci95": list(self.ci95), "n": self.n, "agreement": self.agreement,
                "flips": self.flips, "kl": self.kl, "mcnemar_p": self.mcnemar_p, "flipped": list(self.flipped),
                "predicted": list(self.predicted), "confidence": list(self.confidence), "plan": self.plan,
                "kernels": self.kernels, "data": self.data, "seconds": self.seconds, "start_cut": self.start_cut}

    @classmethod
    def from_json(cls, stored: dict) -> "RunSummary":
        tuples = {"ci95", "flipped", "predicted", "confidence"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in stored.items()})


class Evaluator:
    """Tokenized, length-sorted batches of one data set for one model, and the FP32 baseline."""

    def __init__(self, model: nn.Module, tokenizer, dataset: EvalSet, batch_size: int = EVAL_BATCH,
                 device: str | None = "cpu", keep_states: bool = False, kept_cuts: frozenset[int] | None = None):
        if len(dataset) == 0:
            raise EvalError(f"dataset {dataset.name} is empty")
        self.device = resolve_device(device)
        self.model = model_on(model, self.device)
        self.tokenizer, self.dataset, self.batch_size = tokenizer, dataset, batch_size
        self.classes = label_space(model)
        self.labels = self.classes.indices(dataset.labels, dataset.name)
        self.layers = inventory(model)
        self.batches = self._tokenize()
        self.stages = stages_of(self.model)
        with _VERIFY_LOCK:
            if not self.stages.verified:
                self.stages.verify(apply_plan(self.model, FP32), self.batches[0].inputs)
        self.cuts = {layer.name: self.stages.cut_of(layer.name) for layer in self.layers}
        self.keep_states = keep_states
        self.kept_cuts = kept_cuts if kept_cuts is not None or not keep_states else self.affordable_cuts()
        self.lock = threading.Lock()
        baseline, trace = self.run(FP32, keep=keep_states)
        self.baseline, self.baseline_trace = baseline, trace or Trace(FP32)
        self.baseline_logits = baseline.logits

    # ---- setup --------------------------------------------------------------------------------
    def _tokenize(self) -> list[Batch]:
        encoded = encode(self.tokenizer, self.dataset.texts, input_limit(self.model, self.tokenizer))
        lengths = encoded.lengths
        pad_id = self.tokenizer.pad_token_id or 0
        batches = []
        for rows in length_sorted(lengths, self.batch_size):
            ids, mask = pad([encoded.ids[i] for i in rows], pad_id)
            batches.append(Batch(rows, {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)},
                                 int(lengths[rows].sum())))
        return batches

    def affordable_cuts(self, budget_mb: float | None = None) -> frozenset[int] | None:
        """The cuts whose FP32 states fit the baseline budget (None: all of them).

        A cut's states cost tokens x hidden x 4 bytes, or rows x hidden x 4 where only the first row goes on
        (a [CLS]-pooled head's input): those small ones are kept first, latest first, then as many token-wide
        cuts as the rest of the budget holds, spread evenly from the last. A large set keeps fewer cuts, and
        an update resumes from the latest kept cut before the change: slower, never wrong.
        """
        budget = settings().baseline_budget_mb if budget_mb is None else budget_mb
        probe: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            self.stages.staged(apply_plan(self.model, FP32))(self.batches[0].inputs, keep=probe)
        if not probe:
            return None
        first = self.batches[0]
        tokens = sum(batch.inputs["input_ids"].numel() for batch in self.batches)
        token_ratio = tokens / first.inputs["input_ids"].numel()
        row_ratio = len(self.dataset) / len(first.rows)
        per_cut = {cut: state.numel() * state.element_size() * (token_ratio if state.shape[1] > 1 else row_ratio)
                   for cut, state in probe.items()}
        if sum(per_cut.values()) <= budget * 1024**2:
            return None
        left = budget * 1024**2
        kept = set()
        for cut in sorted((c for c, state in probe.items() if state.shape[1] == 1), reverse=True):
            if per_cut[cut] <= left:
                kept.add(cut)
                left -= per_cut[cut]
        wide = sorted(c for c, state in probe.items() if state.shape[1] > 1)
        affordable = min(len(wide), int(left // max(per_cut[c] for c in wide))) if wide else 0
        step = len(wide) / affordable if affordable else float("inf")
        return frozenset(kept | {wide[len(wide) - 1 - int(i * step)] for i in range(affordable)})

    def schedule(self) -> list[int]:
        """Batch order for a run: strided over lengths, so the first batches give a fair early estimate."""
        stride = max(1, round(len(self.batches) ** 0.5))
        return [i for offset in range(stride) for i in range(offset, len(self.batches), stride)]

    @property
    def last_cut(self) -> int:
        return self.stages.last_cut

    # ---- running ------------------------------------------------------------------------------
    def start_cut(self, old: Plan, new: Plan) -> int | None:
        """The first cut whose state differs between two plans; None when they compute the same thing."""
        if old.key() == new.key():
            return None
        if old.options() != new.options():
            return 0
        names = [layer.name for layer in self.layers]
        before, after = old.specs(names, strict=False), new.specs(names, strict=False)
        changed = [name for name in names if before[name] != after[name]]
        # smoothing (SmoothQuant, AWQ) may fold into an op before the layer's own block: start from the input
        if any(spec.smooth_alpha is not None or spec.method == WeightMethod.AWQ
               for name in changed for spec in (before[name], after[name])):
            return 0
        return min(self.cuts[name] for name in changed) if changed else None

    def resume_cut(self, source: Trace | None, plan: Plan) -> int:
        """Where a run of `plan` can start from `source`'s states: the latest kept cut at or before the
        first cut where the plans differ (0 without states)."""
        if source is None or not source.states:
            return 0
        cut = self.start_cut(source.plan, plan)
        cut = self.last_cut if cut is None else cut
        kept = source.states[0].keys() | {0}
        return max(c for c in kept if c <= cut)

    def build(self, plan: Plan, kernels: str = Kernels.SIMULATED) -> nn.Module:
        """The plan's model, calibrated on this set's calibration pool when the plan needs it."""
        if plan.key() == FP32.key() and kernels == Kernels.SIMULATED:
            return apply_plan(self.model, FP32)
        return build(self.model, self.tokenizer, plan, kernels, self.dataset.calibration,
                     self.dataset.calibration_source)

    def run(self, plan: Plan = FP32, kernels: str = Kernels.SIMULATED, source: Trace | None = None, keep: bool = False,
            kept_cuts: frozenset[int] | None = None, progress: Progress | None = None,
            cancelled: Callable[[], bool] | None = None) -> tuple[EvalResult, Trace | None]:
        """Evaluate `plan`; with `source` (a trace of another plan), start where the plans first differ.

        With `keep`, return the plan's trace: `source`'s states up to the start cut (shared, not copied)
        and the new states after it, at `kept_cuts` (default: the evaluator's). `cancelled` is asked between
        batches and stops the run (Cancelled).
        """
        started = time.perf_counter()
        start = self.resume_cut(source, plan)
        net = self.stages.staged(self.build(plan, kernels))
        logits = np.zeros((len(self.dataset), len(self.classes)), dtype=np.float32)
        states: list[dict[int, torch.Tensor]] = [dict() for _ in self.batches]
        done_rows: list[np.ndarray] = []
        with torch.inference_mode():
            for index in self.schedule():
                if cancelled is not None and cancelled():
                    raise Cancelled(f"evaluation of {plan.label()} stopped")
                batch = self.batches[index]
                kept = states[index] if keep else None
                state = None
                if start > 0:
                    previous = source.states[index]
                    state = previous[start]
                    if kept is not None:
                        kept.update({c: t for c, t in previous.items() if c <= start})
                out = net(batch.inputs, start, state, kept, self.kept_cuts if kept_cuts is None else kept_cuts)
                logits[batch.rows] = out.float().cpu().numpy()
                done_rows.append(batch.rows)
                if progress is not None:
                    progress(self._partial(logits, np.concatenate(done_rows), started))
        reference = getattr(self, "baseline_logits", logits)
        result = EvalResult(plan, kernels, self.dataset.name, logits, compare(logits, self.labels, reference),
                            time.perf_counter() - started, start)
        return result, Trace(plan, states) if keep else None

    def _partial(self, logits: np.ndarray, rows: np.ndarray, started: float) -> Partial:
        predictions = logits[rows].argmax(-1)
        correct = int((predictions == self.labels[rows]).sum())
        reference = getattr(self, "baseline_logits", logits)[rows].argmax(-1)
        return Partial(len(rows), len(self.dataset), correct / len(rows), wilson_interval(correct, len(rows)),
                       float((predictions == reference).mean()), time.perf_counter() - started)

    @property
    def key(self) -> tuple:
        return fingerprint(self.model), self.dataset.fingerprint, str(self.device)


_VERIFY_LOCK = threading.Lock()
