"""The grid's rows: what one task gave, as the command line named it, in `grid --json`'s order.

An `EvalRow` carries `eval --json`'s figures (and the worker's timing when asked), a `SensitivityRow` a
`sensitivity --json` row; a failed task's row has its one-line `error` and no figures. `to_json()` is the
contract's object, which the --out file keeps and `GridRow.from_json` reads back to resume a run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from engine.core.vocabulary import TaskKind
from engine.evaluation.evaluate import figures as evaluation_figures
from engine.grid.tasks import Task

LATENCY = ("latency_ms_p50", "latency_ms_p95", "throughput_per_s", "machine", "measured_at")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class GridRow:
    """What every row holds: the task's names, who ran it, and its error when it failed."""

    kind: ClassVar[TaskKind]
    NAMES: ClassVar[tuple[str, ...]]  # the task's fields naming what was computed, after model, set and limit
    FIGURES: ClassVar[tuple[str, ...]]  # the result's fields, in the contract's order

    model: str
    data: str
    limit: int | None
    worker: str | None = None  # None: answered by the cache, or its worker was lost
    task_s: float | None = None  # the task's own time on its worker; None when not run there
    backend: str
    key: str
    cached: bool = False
    error: str | None = None

    def __post_init__(self) -> None:
        if isinstance(getattr(self, "ci95", None), list):  # JSON gives a list: kept as a tuple, so a row is a value
            object.__setattr__(self, "ci95", tuple(self.ci95))

    def figure_names(self) -> tuple[str, ...]:
        """The result fields this row prints (an evaluation has latency fields only where it was timed)."""
        return self.FIGURES

    def to_json(self) -> dict[str, Any]:
        """`grid --json`'s object: figures only for a task that finished, the worker only for one a worker ran."""
        out: dict[str, Any] = {"kind": self.kind, "model": self.model, "data": self.data, "limit": self.limit}
        out.update({name: getattr(self, name) for name in self.NAMES})
        if self.error is None:
            out.update({name: _plain(getattr(self, name)) for name in self.figure_names()})
        # A failed row always says which worker it failed on (null when the worker itself was lost).
        if self.worker is not None or self.error is not None:
            out["worker"] = self.worker
        if self.task_s is not None:
            out["task_s"] = self.task_s
        out.update({"backend": self.backend, "key": self.key})
        if self.cached:
            out["cached"] = True
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GridRow:
        """From `to_json()`'s dict, as the row type of its "kind"; keys it does not know are ignored."""
        row_type = ROW_TYPES[TaskKind(data["kind"])] if cls is GridRow else cls
        return row_type(**{f.name: data[f.name] for f in fields(row_type) if f.name in data})

    def renamed(self, task: Task) -> GridRow:
        """This row under `task`'s names: tasks with equal keys (the same work under other names) share one row."""
        return dataclasses.replace(self, model=task.model, data=task.data,
                                   **{name: getattr(task, name) for name in self.NAMES})


@dataclass(frozen=True, kw_only=True)
class EvalRow(GridRow):
    """An evaluation of a plan: `eval --json`'s figures, with the latency on the worker that ran it when asked."""

    kind: ClassVar[TaskKind] = TaskKind.EVAL
    NAMES: ClassVar[tuple[str, ...]] = ("plan_name",)
    FIGURES: ClassVar[tuple[str, ...]] = ("accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p", "plan",
                                          "kernels", "seconds", "size_bytes", "device")

    plan_name: str | None
    accuracy: float | None = None
    ci95: tuple[float, float] | None = None
    n: int | None = None
    agreement: float | None = None
    flips: int | None = None
    kl: float | None = None
    mcnemar_p: float | None = None
    plan: dict | None = None
    kernels: str | None = None
    seconds: float | None = None
    size_bytes: int | None = None
    device: str | None = None
    latency_ms_p50: float | None = None  # the latency fields: only for a task that asked for them
    latency_ms_p95: float | None = None
    throughput_per_s: float | None = None
    machine: dict | None = None  # where it was timed: the worker's CPU, threads, host, tokens and batch
    measured_at: float | None = None

    def figure_names(self) -> tuple[str, ...]:
        return self.FIGURES + (LATENCY if self.machine is not None else ())


@dataclass(frozen=True, kw_only=True)
class SensitivityRow(GridRow):
    """One layer alone at one precision: a `sensitivity --json` row."""

    kind: ClassVar[TaskKind] = TaskKind.SENSITIVITY
    NAMES: ClassVar[tuple[str, ...]] = ("layer", "precision")
    FIGURES: ClassVar[tuple[str, ...]] = ("block", "role", "direction", "accuracy", "ci95", "flips", "kl",
                                          "mcnemar_p", "sqnr_db", "drop", "agreement", "n", "start_cut", "seconds",
                                          "method")

    layer: str
    precision: str
    block: int | None = None
    role: str | None = None
    direction: str | None = None
    accuracy: float | None = None
    ci95: tuple[float, float] | None = None
    flips: int | None = None
    kl: float | None = None
    mcnemar_p: float | None = None
    sqnr_db: float | None = None
    drop: float | None = None
    agreement: float | None = None
    n: int | None = None
    start_cut: int | None = None
    seconds: float | None = None
    method: str | None = None


ROW_TYPES: dict[TaskKind, type[GridRow]] = {TaskKind.EVAL: EvalRow, TaskKind.SENSITIVITY: SensitivityRow}


def make_row(task: Task, result: dict, backend: str, cached: bool = False) -> GridRow:
    """A task's row from its result (computed or from the cache): `eval --json`'s figures, with latency
    and its machine when asked, or a `sensitivity --json` row; or the task's one-line error."""
    figures: dict = {}
    error = result.get("error") or None
    if error is None:
        if task.kind == TaskKind.EVAL:
            figures = evaluation_figures(result["summary"], result["size_bytes"], task.device)
            figures.update(result.get("latency") or {})
        else:
            figures = dict(result["row"])
    row_type = ROW_TYPES[TaskKind(task.kind)]
    names = {name: getattr(task, name) for name in ("model", "data", "limit") + row_type.NAMES}
    ran = {k: result[k] for k in ("worker", "task_s") if k in result}
    return row_type.from_json({**figures, **names, **ran, "backend": backend, "key": task.key(), "cached": cached,
                               "error": error})
