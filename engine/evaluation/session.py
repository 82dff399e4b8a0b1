"""A browser session's incremental state, within one process-wide memory budget.

A session keeps the states its current plan produced (sharing, not copying, the FP32 states before
its first changed cut). States are what memory goes to (1,056 sentences x ~25 tokens x hidden x 4
bytes per cut), so every session's own states count against one budget; when the budget is
exceeded, the sessions used least recently lose theirs and their next update starts from the FP32
states instead: slower once, never wrong.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Callable

from engine.core.plan import FP32, Plan
from engine.core.settings import settings
from engine.evaluation.evaluator import EvalResult, Evaluator, Progress, Trace


class StateBudget:
    """The bytes all sessions' own states may hold in this process (ENGINE_STATE_BUDGET_MB)."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit = int(settings().state_budget_mb * 1024**2) if limit_bytes is None else limit_bytes
        # Weak references: a browser session that ends takes its Session, and its states, with it.
        self.sessions: dict[int, tuple[weakref.ref, float]] = {}
        self.lock = threading.Lock()

    def _alive(self) -> dict[int, tuple["Session", float]]:
        alive = {key: (ref(), used) for key, (ref, used) in self.sessions.items()}
        self.sessions = {key: self.sessions[key] for key, (s, _) in alive.items() if s is not None}
        return {key: entry for key, entry in alive.items() if entry[0] is not None}

    def touch(self, session: "Session") -> None:
        """`session` was just used: record it, then drop the least recently used sessions' states
        while the total exceeds the budget (never the session just used)."""
        with self.lock:
            self.sessions[id(session)] = (weakref.ref(session), time.monotonic())
            self._make_room(session, 0)

    def reserve(self, session: "Session", nbytes: int) -> None:
        """Make room for `nbytes` of new states before `session` computes them, so that the states alive at
        once, the new ones included, stay within the budget."""
        with self.lock:
            self._make_room(session, nbytes)

    def _make_room(self, session: "Session", nbytes: int) -> None:
        alive = self._alive()
        held = {key: s.owned_bytes() for key, (s, _) in alive.items()}
        total = sum(held.values()) + nbytes
        for key, (other, _) in sorted(alive.items(), key=lambda item: item[1][1]):
            if total <= self.limit:
                break
            if other is not session and held[key]:
                other.drop_states()
                total -= held[key]

    def forget(self, session: "Session") -> None:
        with self.lock:
            self.sessions.pop(id(session), None)

    def used_bytes(self) -> int:
        with self.lock:
            return sum(s.owned_bytes() for s, _ in self._alive().values())


BUDGET = StateBudget()


class Session:
    """One browser session's current plan, its result and the trace its next update resumes from."""

    def __init__(self, evaluator: Evaluator, budget: StateBudget | None = None):
        self.evaluator = evaluator
        self.budget = budget or BUDGET
        self.plan: Plan = FP32
        self.trace: Trace | None = None
        self.result: EvalResult | None = evaluator.baseline
        self.lock = threading.Lock()

    def owned_bytes(self) -> int:
        trace = self.trace
        return 0 if trace is None else trace.nbytes(self.evaluator.baseline_trace)

    def drop_states(self) -> None:
        self.trace = None

    def source_for(self, plan: Plan) -> Trace:
        """The trace to resume `plan` from: this session's own or the FP32 one, whichever starts later."""
        baseline = self.evaluator.baseline_trace
        own = self.trace
        if own is None:
            return baseline
        return own if self.evaluator.resume_cut(own, plan) >= self.evaluator.resume_cut(baseline, plan) else baseline

    def _cuts_within_budget(self, source: Trace, start: int) -> tuple[frozenset[int] | None, int]:
        """The cuts after `start` this session may keep (None: all the evaluator keeps) and their bytes: the
        latest ones, as many as the whole budget holds next to what it keeps from its own trace before `start`.
        Sizes are FP32's: a quantized run can keep a [CLS]-pooled head's input token-wide where FP32 keeps its
        first row (per-tensor activation scales read every row), which `_trim` settles after the run."""
        baseline = self.evaluator.baseline_trace
        sizes = {cut: size for cut, size in baseline.cut_bytes().items() if cut > start}
        own_before = sum(size for cut, size in source.cut_bytes(baseline).items() if cut <= start) \
            if source is self.trace else 0
        room = self.budget.limit - own_before
        if sum(sizes.values()) <= room:
            return None, sum(sizes.values())
        kept, used = set(), 0
        for cut in sorted(sizes, reverse=True):
            if used + sizes[cut] <= room:
                kept.add(cut)
                used += sizes[cut]
        return frozenset(kept), used

    def _trim(self, trace: Trace) -> None:
        """Drop this session's own states, earliest cut first, until they fit the budget: one session's states
        never exceed it, however large the set; an update past them resumes from an earlier cut, slower, never
        wrong."""
        owned = trace.cut_bytes(self.evaluator.baseline_trace)
        total = sum(owned.values())
        for cut in sorted(owned):
            if total <= self.budget.limit:
                break
            for states in trace.states:
                states.pop(cut, None)
            total -= owned[cut]

    def update(self, plan: Plan, progress: Progress | None = None,
               cancelled: Callable[[], bool] | None = None) -> EvalResult:
        """Evaluate `plan` from the latest cut any kept states allow, then make it current."""
        with self.lock:
            if self.result is not None and plan.key() == self.plan.key():
                return self.result
            source = self.source_for(plan)
            if source is not self.trace:
                self.trace = None  # not resumed from: free it before the run allocates the new states
            start = self.evaluator.resume_cut(source, plan)
            kept, new_bytes = self._cuts_within_budget(source, start)
            self.budget.reserve(self, new_bytes)
            result, trace = self.evaluator.run(plan, source=source, keep=True, kept_cuts=kept, progress=progress,
                                               cancelled=cancelled)
            self._trim(trace)
            self.plan, self.trace, self.result = plan, trace, result
        self.budget.touch(self)
        return result

    def close(self) -> None:
        self.budget.forget(self)
        self.trace = None
