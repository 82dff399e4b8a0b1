"""The local backend: every task in this process, one worker state per (model, set) at a time.

`execute` is also what a Ray actor runs per task: it times the task, stamps the worker that ran it, and
turns a task's own failure into a one-line error in its result rather than an exception.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from engine.core.vocabulary import TaskKind
from engine.grid import work
from engine.grid.tasks import Task, group_tasks

MAX_ERROR_CHARS = 300


def one_line(error: BaseException | str) -> str:
    """An error as one line: its type and the first line of its message."""
    if isinstance(error, str):
        text = error
    else:
        message = str(error).strip().splitlines()
        text = f"{type(error).__name__}: {message[0] if message else 'no message'}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def error_result(error: BaseException | str) -> dict:
    return {"error": one_line(error), "worker": work.worker_id()}


def execute(state: work.WorkerState | None, task: Task, open_error: str | None = None) -> dict:
    """The task's figures, or {"error": one line}; with the worker, the task's time and its wall-clock span."""
    wall, started = time.time(), time.perf_counter()
    if state is None:
        result = error_result(open_error or "no worker state")
    else:
        try:
            result = work.run_task(state, task)
        except Exception as error:  # a task that fails on its own: its row says why, the grid goes on
            result = error_result(error)
    result.update({"worker": work.worker_id(), "task_s": round(time.perf_counter() - started, 4),
                   "_start": wall, "_end": time.time()})
    return result


class LocalBackend:
    """Runs tasks in this process, group by group; `threads` sets torch's threads for the run (None: leave them)."""

    name = "local"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.workers = 1
        self.open_s: list[float] = []

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, dict]]:
        """(task, result) pairs in order; a (model, set) that cannot be opened gives each of its tasks that error."""
        previous = torch.get_num_threads()
        try:
            for group, members in group_tasks(tasks).items():
                keep = any(task.kind == TaskKind.SENSITIVITY for task in members)
                try:
                    state = work.open_state(*group, keep_states=keep, threads=self.threads)
                except Exception as error:
                    for task in members:
                        yield task, execute(None, task, one_line(error))
                    continue
                self.open_s.append(state.open_s)
                try:
                    for task in members:
                        yield task, execute(state, task)
                finally:
                    work.close_state(state)
        finally:
            torch.set_num_threads(previous)
