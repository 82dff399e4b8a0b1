"""One scheduler for the server's CPU work: every browser session's evaluations queue here, and never
more run at once than the machine has cores for (workers x torch threads <= cores).

A waiting session sees its place in the queue and an estimate from the measured duration of recent
jobs of the same kind; a session's newer job of a kind replaces its older queued one (the newest
plan wins), and a session can cancel its own work: a queued job is dropped, a running one stops at
its next check (between batches).
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.evaluation.evaluator import Cancelled

HISTORY = 20
# Jobs that stop when any other kind is submitted: a timing is only worth taking on a quiet machine, and
# must not hold back a click's evaluation (the page times again when the server is quiet).
YIELDING = ("latency",)
# A yielding job starts only once no other work has run or waited for this long, and queued work of other
# kinds goes first: a timing started right after one session's update, as the next clicks arrive, held their
# evaluations back until it reached its first check.
QUIET_S = 1.0


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

    @property
    def done(self) -> bool:
        return self.done_event.is_set()

    def cancel(self) -> None:
        self.cancel_requested = True

    def cancelled(self) -> bool:
        return self.cancel_requested


class Scheduler:
    """A FIFO queue served by `workers` threads, each running torch with `threads` intra-op threads."""

    def __init__(self, workers: int | None = None, threads: int | None = None):
        cores = os.cpu_count() or 1
        self.workers = max(1, workers or int(os.environ.get("ENGINE_WORKERS", 1)))
        self.threads = max(1, threads or int(os.environ.get("ENGINE_THREADS", 0)) or cores // self.workers)
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

    def submit(self, owner: str, kind: str, run: Callable[[Job], Any], label: str = "", tag: str | None = None,
               supersede: bool = False) -> Job:
        """Queue a job. A tagged job the owner already submitted (queued, running, or done but not yet
        claimed) is returned instead of a new one, so a session that reran finds its work again; with
        `supersede`, the owner's queued jobs of this kind are cancelled first (the newest request wins)."""
        with self.condition:
            self._start()
            if tag is not None and (owner, kind, tag) in self.live:
                return self.live[(owner, kind, tag)]
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

    def _next(self) -> Job | None:
        """The job to start now (under the lock): the first queued one of a non-yielding kind; else a yielding
        one, once nothing else runs and the queue has been quiet for QUIET_S."""
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
                    self.condition.wait(QUIET_S if self.queue else None)
                self.queue.remove(job)
                job.started = time.monotonic()
                self.running.append(job)
            try:
                result = job.run(job)
                error = None
            except BaseException as failure:  # the waiting session reports it; the worker lives on
                result, error = None, failure
            with self.condition:
                self.running.remove(job)
                if job.kind not in YIELDING:
                    self.busy_until = time.monotonic()
                if error is None:
                    self.durations.setdefault(job.kind, deque(maxlen=HISTORY)).append(time.monotonic() - job.started)
                self._finish(job, result, error)

    def load(self) -> dict:
        with self.condition:
            return {"running": len(self.running), "queued": len(self.queue), "workers": self.workers,
                    "threads": self.threads}


SCHEDULER = Scheduler()
