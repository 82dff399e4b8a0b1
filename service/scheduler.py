"""One scheduler for the server's CPU work: every browser session's evaluations queue here, and never
more run at once than the machine has cores for (workers x torch threads <= cores).

A waiting session sees its place in the queue and an estimate from the measured duration of recent
jobs of the same kind; a session's newer job of a kind replaces its older queued one (the newest
plan wins), and a session can cancel its own work: a queued job is dropped, a running one stops at
its next check (between batches).

Faults stay with their session: an exception inside a job is that job's error (an unexpected one becomes a
`JobFailed`, one line, its traceback in the server's log) and the worker goes on with the next job. A tagged
job whose session has gone (the thread that submitted or last found it has ended, and no rerun has found it
for `ORPHAN_S`: a browser closed mid-run) is dropped from the queue, and its outcome is not kept for a claim.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.core.errors import EngineError
from engine.core.settings import settings
from engine.evaluation.evaluator import Cancelled

HISTORY = 20
# Jobs that stop when any other kind is submitted: a timing is only worth taking on a quiet machine, and
# must not hold back a click's evaluation (the page times again when the server is quiet).
YIELDING = ("latency",)
# A yielding job starts only once no other work has run or waited for this long, and queued work of other
# kinds goes first: a timing started right after one session's update, as the next clicks arrive, held their
# evaluations back until it reached its first check.
QUIET_S = 1.0
ORPHAN_S = 30.0
REAP_EVERY_S = 1.0
log = logging.getLogger(__name__)


class JobFailed(EngineError):
    """An unexpected exception inside a job, said in one line to the session that asked for it."""


def _as_one_line(job: "Job", failure: BaseException) -> BaseException:
    if isinstance(failure, (EngineError, Cancelled)) or not isinstance(failure, Exception):
        return failure  # a one-line error already, a cancellation, or an interpreter exit
    log.error("job %s of %s failed", job.kind, job.owner, exc_info=failure)
    first = (str(failure).strip().splitlines() or [""])[0][:200]
    what = "ran out of memory" if isinstance(failure, MemoryError) else f"failed: {type(failure).__name__}"
    error = JobFailed(f"{job.label or job.kind} {what}{': ' + first if first else ''}")
    error.__cause__ = failure
    return error


@dataclass(eq=False)
class Job:
    """One unit of CPU work: `run(job)` returns the result; the work asks `job.cancelled()` between batches
    and may leave its progress in `job.progress`."""

    owner: str
    kind: str
    run: Callable[["Job"], Any]
    label: str = ""
    tag: str | None = None
    progress: Any = None  # the latest progress the work reported (shown to the waiting session)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: BaseException | None = None
    cancel_requested: bool = False
    done_event: threading.Event = field(default_factory=threading.Event)
    waiter: threading.Thread = field(default_factory=threading.current_thread)  # who will read the outcome
    orphaned_at: float | None = None

    @property
    def done(self) -> bool:
        return self.done_event.is_set()

    def cancel(self) -> None:
        self.cancel_requested = True

    def cancelled(self) -> bool:
        return self.cancel_requested


@dataclass(frozen=True)
class Load:
    """How busy the server's queue is at one moment."""

    running: int
    queued: int
    workers: int
    threads: int

    @property
    def idle(self) -> bool:
        return not (self.running or self.queued)


class Scheduler:
    """A FIFO queue served by `workers` threads, each running torch with `threads` intra-op threads."""

    def __init__(self, workers: int | None = None, threads: int | None = None):
        cores = os.cpu_count() or 1
        self.workers = max(1, workers or settings().workers)
        self.threads = max(1, threads or settings().threads or cores // self.workers)
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.durations: dict[str, deque[float]] = {}
        self.live: dict[tuple[str, str, str], Job] = {}  # tagged jobs not yet claimed by their session
        self.condition = threading.Condition()
        self.started = False
        self.busy_until = 0.0  # when the last job of a non-yielding kind finished

    def _start(self) -> None:
        if not self.started:
            self.started = True
            for index in range(self.workers):
                threading.Thread(target=self._serve, name=f"engine-worker-{index}", daemon=True).start()
            threading.Thread(target=self._reaper, name="engine-reaper", daemon=True).start()

    def _reaper(self) -> None:
        while True:
            time.sleep(REAP_EVERY_S)
            with self.condition:
                self._reap()

    def submit(self, owner: str, kind: str, run: Callable[[Job], Any], label: str = "", tag: str | None = None,
               supersede: bool = False) -> Job:
        """Queue a job. A tagged job the owner already submitted (queued, running, or done but not yet
        claimed) is returned instead of a new one, so a session that reran finds its work again; with
        `supersede`, the owner's queued jobs of this kind are cancelled first (the newest request wins)."""
        with self.condition:
            self._start()
            if tag is not None and (owner, kind, tag) in self.live:
                found = self.live[(owner, kind, tag)]
                found.waiter, found.orphaned_at = threading.current_thread(), None
                return found
            if supersede:
                for queued in list(self.queue):
                    if queued.owner == owner and queued.kind == kind:
                        self.queue.remove(queued)
                        self._finish(queued, error=Cancelled("superseded by a newer request"))
            job = Job(owner, kind, run, label, tag)
            if tag is not None:
                self.live[(owner, kind, tag)] = job
            if kind not in YIELDING:  # a timing in progress gives way to anyone's evaluation
                for running in self.running:
                    if running.kind in YIELDING:
                        running.cancel()
            self.queue.append(job)
            self.condition.notify()
        return job

    def claim(self, job: Job) -> None:
        """The owner has read a tagged job's outcome: forget it."""
        with self.condition:
            if job.tag is not None and self.live.get((job.owner, job.kind, job.tag)) is job:
                del self.live[(job.owner, job.kind, job.tag)]

    def cancel(self, job: Job) -> None:
        """Drop a queued job at once; a running one stops at its next check."""
        with self.condition:
            job.cancel()
            if job in self.queue:
                self.queue.remove(job)
                self._finish(job, error=Cancelled("cancelled while waiting"))

    def position(self, job: Job) -> int:
        """Jobs that will finish before this one starts (0: running or next)."""
        with self.condition:
            if job in self.running or job.done:
                return 0
            ahead = list(self.queue).index(job) if job in self.queue else 0
            return ahead + max(0, len(self.running) - self.workers + 1)

    def estimate(self, kind: str) -> float | None:
        """Median seconds of the recent jobs of this kind (None before the first one)."""
        with self.condition:
            recent = self.durations.get(kind)
            return statistics.median(recent) if recent else None

    def wait_estimate(self, job: Job) -> float | None:
        """Seconds until this job is done: the rest of the running jobs plus everything queued before it."""
        with self.condition:
            if job.done:
                return 0.0
            ahead = list(self.queue)[:list(self.queue).index(job)] if job in self.queue else []
            pending = [j for j in self.running if j is not job] + ahead + [job]
            total = 0.0
            for other in pending:
                typical = self.estimate_unlocked(other.kind)
                if typical is None:
                    return None
                elapsed = time.monotonic() - other.started if other.started else 0.0
                total += max(0.0, typical - elapsed)
            return total / self.workers

    def estimate_unlocked(self, kind: str) -> float | None:
        recent = self.durations.get(kind)
        return statistics.median(recent) if recent else None

    def _finish(self, job: Job, result=None, error: BaseException | None = None) -> None:
        job.result, job.error, job.finished = result, error, time.monotonic()
        if error is not None and job.tag is not None and self.live.get((job.owner, job.kind, job.tag)) is job:
            del self.live[(job.owner, job.kind, job.tag)]  # a failed or cancelled job is submitted afresh
        job.done_event.set()

    def _orphaned(self, job: Job, now: float) -> bool:
        """A tagged job nobody will read: its waiter has ended and no rerun found it for ORPHAN_S."""
        if job.tag is None or job.waiter.is_alive():
            job.orphaned_at = None
            return False
        job.orphaned_at = job.orphaned_at or now
        return now - job.orphaned_at >= ORPHAN_S

    def reap(self) -> int:
        """Drop the queued jobs and the unclaimed outcomes of sessions that have gone; returns how many."""
        with self.condition:
            return self._reap()

    def _reap(self) -> int:
        now, dropped = time.monotonic(), 0
        for job in [job for job in self.queue if self._orphaned(job, now)]:
            self.queue.remove(job)
            self._finish(job, error=Cancelled("its session has gone"))
            dropped += 1
        for key, job in list(self.live.items()):
            if job.done and self._orphaned(job, now):
                del self.live[key]
                job.result = None  # the states and results it held go with it
                dropped += 1
        return dropped

    def _next(self) -> Job | None:
        """The job to start now (under the lock): the first queued one of a non-yielding kind; else a yielding
        one, once nothing else runs and the queue has been quiet for QUIET_S."""
        self._reap()
        for job in self.queue:
            if job.kind not in YIELDING:
                return job
        busy = any(job.kind not in YIELDING for job in self.running)
        if self.queue and not busy and time.monotonic() - self.busy_until >= QUIET_S:
            return self.queue[0]
        return None

    def _serve(self) -> None:
        # Set here, not by the thread that submitted first: the count is per thread as well as global, and the
        # sessions' own threads keep to one core (engine.runtime.threads).
        torch.set_num_threads(self.threads)
        while True:
            with self.condition:
                while (job := self._next()) is None:
                    self.condition.wait(QUIET_S if self.queue or self.live else None)
                self.queue.remove(job)
                job.started = time.monotonic()
                self.running.append(job)
            try:
                result = job.run(job)
                error = None
            except BaseException as failure:  # the waiting session reports it; the worker lives on
                result, error = None, _as_one_line(job, failure)
            with self.condition:
                self.running.remove(job)
                if job.kind not in YIELDING:
                    self.busy_until = time.monotonic()
                if error is None:
                    self.durations.setdefault(job.kind, deque(maxlen=HISTORY)).append(time.monotonic() - job.started)
                self._finish(job, result, error)

    def load(self) -> Load:
        with self.condition:
            return Load(running=len(self.running), queued=len(self.queue), workers=self.workers,
                        threads=self.threads)


SCHEDULER = Scheduler()
