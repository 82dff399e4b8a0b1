"""run_grid: the tasks' rows from the cache, an earlier --out file, or a backend, written as they finish.

Before any work, each task is looked for in an existing JSONL output (a stopped or crashed run's rows)
and then through the injected `lookup`; only the rest goes to the backend. Each row that comes back is
stored (`store`) and appended to the output at once, so an interrupted run keeps everything it
finished; at the end the output is rewritten with one row per task, in task order. Tasks with equal
keys (the same weights, sentences and plan under two names) are computed once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from engine.grid.rows import GridRow, make_row
from engine.grid.tasks import Task

Lookup = Callable[[Task], "dict | None"]
Store = Callable[[Task, dict], None]
Progress = Callable[[int, int, GridRow], None]

log = logging.getLogger(__name__)
WORKER_FIELDS = ("worker", "task_s", "_start", "_end")  # who ran a task, how long it took, when


class Backend(Protocol):
    name: str
    workers: int
    open_s: list[float]

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc) -> None: ...

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, dict]]: ...


class GridRows(list[GridRow]):
    """The rows of a grid in task order; `stats` says how the run went (counts, times, overhead)."""

    stats: dict


def _finite(value):
    """JSON has no NaN or infinity: they become null in the output file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(row: GridRow) -> str:
    return json.dumps(_finite(row.to_json()), ensure_ascii=False)


def read_rows(path: str | os.PathLike | None) -> dict[str, GridRow]:
    """Finished rows of an earlier output file by key; failed rows, a line cut short by a crash and a row
    this version cannot read are skipped (their tasks are run again)."""
    rows: dict[str, GridRow] = {}
    if not path or not Path(path).is_file():
        return rows
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                data = json.loads(line)
                row = GridRow.from_json(data) if isinstance(data, dict) and data.get("key") else None
            except (ValueError, KeyError, TypeError):
                continue
            if row is not None and row.error is None:
                rows[row.key] = row
    return rows


def run_grid(tasks: Sequence[Task], backend: Backend, lookup: Lookup | None = None, store: Store | None = None,
             out_path: str | os.PathLike | None = None, progress: Progress | None = None) -> GridRows:
    """One row per task, in task order; only tasks found neither in `out_path` nor through `lookup` are computed."""
    started = time.perf_counter()
    unique: dict[str, Task] = {}
    for task in tasks:
        unique.setdefault(task.key(), task)
    known = read_rows(out_path)
    results: dict[str, GridRow] = {}
    from_out = from_cache = 0
    for key, task in unique.items():
        if key in known:
            results[key], from_out = replace(known[key].renamed(task), cached=True), from_out + 1
        elif lookup is not None:
            found = _lookup(lookup, task)
            if found is not None:
                results[key], from_cache = make_row(task, found, backend.name, cached=True), from_cache + 1
    todo = [task for key, task in unique.items() if key not in results]
    done = 0
    if progress is not None:
        for row in results.values():
            done += 1
            progress(done, len(unique), row)

    computed: list[dict] = []
    backend_started, backend_wall = time.perf_counter(), time.time()
    output = None
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        output = open(out_path, "a", encoding="utf-8")
    try:
        if todo:
            with backend:
                backend_started, backend_wall = time.perf_counter(), time.time()
                for task, result in backend.run(todo):
                    row = make_row(task, result, backend.name)
                    if row.error is None:
                        _store(store, task, result)
                    if output is not None:
                        output.write(dumps(row) + "\n")
                        output.flush()
                    results[task.key()] = row
                    computed.append({k: result[k] for k in WORKER_FIELDS if k in result} | {"failed": bool(row.error)})
                    done += 1
                    if progress is not None:
                        progress(done, len(unique), row)
    finally:
        if output is not None:
            output.close()
    backend_s = time.perf_counter() - backend_started if todo else 0.0

    rows = GridRows(results[task.key()].renamed(task) for task in tasks)
    if out_path:
        temporary = Path(f"{out_path}.tmp")
        temporary.write_text("".join(dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(temporary, out_path)
    rows.stats = _stats(backend, len(tasks), len(unique), from_out, from_cache, computed, backend_s,
                        time.perf_counter() - started, backend_wall)
    return rows


def _lookup(lookup: Lookup, task: Task) -> dict | None:
    try:
        return lookup(task)
    except Exception as error:  # an unreadable cache only costs recomputation
        log.warning("cache lookup failed for %s (%s); computing it", task.label(), error)
        return None


def _store(store: Store | None, task: Task, row: dict) -> None:
    if store is None:
        return
    try:
        store(task, row)
    except Exception as error:  # a full or locked cache must not lose the run: the row is still in the output
        log.warning("cache write failed for %s (%s)", task.label(), error)


def _stats(backend: Backend, tasks: int, unique: int, from_out: int, from_cache: int, computed: list[dict],
           backend_s: float, total_s: float, backend_wall: float) -> dict:
    """Counts and times of the run, and the per-task overhead: worker time not spent inside tasks."""
    ok = [row for row in computed if not row["failed"]]
    task_s = [row["task_s"] for row in computed if isinstance(row.get("task_s"), (int, float))]
    by_worker: dict[str, list[dict]] = {}
    for row in computed:
        if row.get("worker") and "_start" in row:
            by_worker.setdefault(row["worker"], []).append(row)
    gaps, startup = [], []
    for rows in by_worker.values():
        rows.sort(key=lambda r: r["_start"])
        gaps += [max(0.0, b["_start"] - a["_end"]) for a, b in zip(rows, rows[1:])]
        startup.append(rows[0]["_start"] - backend_wall)  # cluster connection, worker start, model load, FP32 pass
    workers = max(1, getattr(backend, "workers", 1) or 1)
    open_s = list(getattr(backend, "open_s", []) or [])
    stats = {"backend": backend.name, "tasks": tasks, "unique": unique, "from_out": from_out,
             "from_cache": from_cache, "computed": len(computed), "errors": len(computed) - len(ok),
             "workers": workers, "wall_s": round(backend_s, 3), "total_s": round(total_s, 3),
             "task_s_sum": round(sum(task_s), 3),
             "task_s_mean": round(statistics.fmean(task_s), 4) if task_s else None,
             "open_s": [round(s, 3) for s in open_s],
             "startup_s": sorted(round(s, 3) for s in startup),
             "gap_s_median": round(statistics.median(gaps), 5) if gaps else None,
             "tasks_per_s": round(len(computed) / backend_s, 4) if computed and backend_s > 0 else None}
    if computed and backend_s > 0:
        # Everything a worker spends outside a task's own run, per task: start-up (process, imports, model
        # load, tokenizing, the FP32 baseline), dispatch and result transfer, and idle time at the end.
        stats["overhead_per_task_s"] = round((workers * backend_s - sum(task_s)) / len(computed), 4)
    return stats
