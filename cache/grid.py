"""The grid's task results in the pages' own cache entries: an evaluation is the layer map's stored
summary and size (and a timing on the worker, when asked), a sensitivity row the sensitivity page's
row. So a grid run from the CLI fills the pages, and rows a page computed are not computed again."""
from __future__ import annotations

from engine.core.vocabulary import TIMING_TOKENS, TaskKind
from engine.grid.tasks import DIRECTION, Task

from cache import MISSING, keys, lookup, put


def _entries(task: Task) -> dict[str, str]:
    """The keys a task's result lives under, by the part of the result each holds."""
    if task.kind == TaskKind.SENSITIVITY:
        return {"row": keys.layer_row(task.model_fp, task.data_fp, task.device, task.batch, task.layer,
                                      task.precision, DIRECTION)}
    plan = task.plan_object
    entries = {"summary": keys.evaluation(task.model_fp, task.data_fp, plan, task.kernels, task.device, task.batch),
               "size_bytes": keys.size(task.model_fp, plan)}
    if task.latency:
        entries["latency"] = keys.worker_latency(task.model_fp, plan, task.device, 1, TIMING_TOKENS)
    return entries


def find(task: Task) -> dict | None:
    """The task's result when every part of it is stored, else None."""
    found = {part: lookup(key, MISSING) for part, key in _entries(task).items()}
    return None if any(value is MISSING for value in found.values()) else found


def keep(task: Task, result: dict) -> None:
    for part, key in _entries(task).items():
        put(key, result[part])
