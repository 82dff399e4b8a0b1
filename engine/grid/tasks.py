"""Grid tasks: one (model, set, plan) evaluation or one sensitivity row, their list, and their cache keys.

A task names what it computes (model, set, limit, plan or layer and precision) and carries the
fingerprints of the weights and the sentences the driver saw, so its cache key and its identity in a
resumed run depend on what determines the result, not on a folder's name. Every key is built in
`cache_parts` and `page_parts`, so moving them next to the pages' own keys is one move.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

from engine.grid import work
from engine.plan import Plan, PlanError, parse_plan

KINDS = ("eval", "sensitivity")
SWEEP_PRECISIONS = ("int8", "int4")
DIRECTION = "one"  # a sensitivity task quantizes its layer alone, as `sensitivity --direction one`
EVAL_NAMESPACE = "grid-eval"
SENSITIVITY_NAMESPACE = "sensitivity-row"  # the sensitivity page's namespace and parts: one shared row store
LAYER_MAP_NAMESPACE = "layer-map-eval"  # the layer map page's evaluations (an EvalResult.summary())
SIZE_NAMESPACE = "size"  # the layer map page's model sizes
PRESET_INT8_LINEAR = "int8-linear"  # the comparison page's preset: int8 Linears, embedding table in fp32


class GridError(ValueError):
    """A grid that cannot be built or run as asked (bad list, backend, cluster); the message says why."""


@dataclass(frozen=True)
class Task:
    """One unit of grid work: an evaluation of a plan, or one sensitivity row (a layer alone at a precision)."""

    kind: str
    model: str
    data: str
    limit: int | None = None
    plan: str | None = None  # eval: the plan's JSON text (rule order kept: later rules win)
    plan_name: str | None = None  # eval: the plan as named on the command line
    layer: str | None = None  # sensitivity
    precision: str | None = None  # sensitivity
    latency: bool = False  # eval: also time the plan on real kernels, on the worker that runs the task
    kernels: str = "simulated"
    device: str = "cpu"
    model_fp: str = ""  # fingerprint of the weights the driver loaded
    data_fp: str = ""  # fingerprint of the (limited) set the driver loaded

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GridError(f"task kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "eval" and self.plan is None:
            raise GridError("an eval task needs a plan")
        if self.kind == "sensitivity" and (not self.layer or self.precision not in SWEEP_PRECISIONS):
            raise GridError(f"a sensitivity task needs a layer and a precision among {', '.join(SWEEP_PRECISIONS)}")

    @property
    def group(self) -> tuple[str, str, int | None, str]:
        """What a worker holds to run this task: one model on one set (its first `limit` rows), on a device."""
        return (self.model, self.data, self.limit, self.device)

    def key(self) -> str:
        """Identity of the result (tasks with equal keys compute the same row): the hash of its cache key."""
        namespace, parts = cache_parts(self, self.model_fp, self.data_fp)
        text = json.dumps({"ns": namespace, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def label(self) -> str:
        what = self.plan_name if self.kind == "eval" else f"{self.layer}@{self.precision}"
        return f"{self.model} / {self.data}{'' if self.limit is None else f'[:{self.limit}]'} / {what}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Task:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def split_items(text: str | None) -> list[str]:
    """Items of a comma-separated list; commas inside inline JSON ({...}, [...]) do not split."""
    items, depth, current = [], 0, []
    for char in text or "":
        depth += (char in "{[") - (char in "}]")
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def plan_json(item: str, model: work.ModelInfo) -> str:
    """A plan item from the command line (precision, inline JSON, .json file, or int8-linear) as JSON text.

    Unknown precisions and malformed JSON raise PlanError here (the run never starts); a pattern that
    matches no layer of one model is that task's error, since a plan written for one family may not fit another.
    """
    if item.strip() == PRESET_INT8_LINEAR:
        rules = {"*": "int8", **{name: "fp32" for name, kind in model.layers if kind == "embedding"}}
        return json.dumps(Plan.from_mapping(rules).to_json())
    try:
        return json.dumps(parse_plan(item).to_json())
    except PlanError as error:
        message = str(error)
        raise PlanError(message if item in message else f"plan {item!r}: {message}") from None


def build_tasks(models: Sequence[str], datasets: Sequence[str], plans: Sequence[str] = (),
                sensitivity: Sequence[str] = (), limit: int | None = None, latency: bool = False,
                kernels: str = "simulated", device: str = "cpu") -> list[Task]:
    """Every (model, set, plan) evaluation, then, per (model, set), a sensitivity row per layer x precision.

    Each model is loaded once here, on the driver, for its fingerprint and its layers; a model or set
    that cannot be loaded raises its one-line error (ModelError, DataError) before any work starts.
    """
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    datasets = list(dict.fromkeys(d.strip() for d in datasets if d.strip()))
    precisions = list(dict.fromkeys(p.strip().lower() for p in sensitivity if p.strip()))
    bad = [p for p in precisions if p not in SWEEP_PRECISIONS]
    if bad:
        raise GridError(f"sensitivity precisions must be among {', '.join(SWEEP_PRECISIONS)}, not {bad[0]!r}")
    if not models or not datasets or not (plans or precisions):
        raise GridError("a grid needs at least one model (--models), one set (--data) and one plan (--plans) "
                        "or sensitivity precision (--sensitivity)")
    if limit is not None and limit < 1:
        raise GridError(f"limit must be at least 1, not {limit}")
    data_fps = {name: work.data_fingerprint(name, limit) for name in datasets}
    tasks: list[Task] = []
    for name in models:
        info = work.describe_model(name)
        resolved = [(item, plan_json(item, info)) for item in plans]
        for data in datasets:
            common = dict(model=name, data=data, limit=limit, device=device, model_fp=info.fingerprint,
                          data_fp=data_fps[data])
            tasks += [Task("eval", plan=text, plan_name=item, latency=latency, kernels=kernels, **common)
                      for item, text in resolved]
            tasks += [Task("sensitivity", layer=layer, precision=p, **common)
                      for layer, _ in info.layers for p in precisions]
    return tasks


def group_tasks(tasks: Iterable[Task]) -> OrderedDict[tuple, list[Task]]:
    """Tasks by worker state (model, set, limit, device), in order of first appearance."""
    groups: OrderedDict[tuple, list[Task]] = OrderedDict()
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    return groups


# ---- cache keys and values ------------------------------------------------------------------
def cache_parts(task: Task, model_fp: str, data_fp: str) -> tuple[str, dict]:
    """The namespace and key parts under which a task's row is memoized.

    A sensitivity row uses the sensitivity page's namespace and parts exactly (model and set
    fingerprints, the row's plan key, kernels, device, layer, precision, direction), so the page and a
    grid share rows. The limit needs no part of its own: the fingerprint of a limited set is that of the
    rows it keeps. An evaluation adds the limit and, when latency was asked, that flag.
    """
    base = {"model": model_fp, "data": data_fp, "kernels": task.kernels, "device": task.device}
    if task.kind == "sensitivity":
        return SENSITIVITY_NAMESPACE, {**base, "plan": work.sweep_plan_key(task.layer, task.precision),
                                       "layer": task.layer, "precision": task.precision, "direction": DIRECTION}
    parts = {**base, "plan": Plan.from_json(json.loads(task.plan)).key(), "limit": task.limit}
    if task.latency:
        parts["latency"] = True
    return EVAL_NAMESPACE, parts


def page_parts(task: Task, model_fp: str, data_fp: str) -> dict[str, dict]:
    """Other pages' keys that an evaluation row also fills: the layer map's evaluation and size.

    Only for what the layer map computes itself: the whole set, simulated kernels, on the CPU.
    """
    if task.kind != "eval" or task.limit is not None or task.kernels != "simulated" or task.device != "cpu":
        return {}
    plan_key = Plan.from_json(json.loads(task.plan)).key()
    return {LAYER_MAP_NAMESPACE: {"model": model_fp, "data": data_fp, "plan": plan_key, "kernels": task.kernels,
                                  "device": task.device, "batch": work.EVAL_BATCH},
            SIZE_NAMESPACE: {"model": model_fp, "plan": plan_key}}


BOOKKEEPING = ("kind", "model", "data", "limit", "plan_name", "backend", "key", "cached", "error")


def cache_value(task: Task, row: dict) -> dict:
    """What the task's key stores: a sensitivity row exactly as the page stores it (Row fields), an
    evaluation's figures without the grid's bookkeeping."""
    if task.kind == "sensitivity":
        return {name: row[name] for name in work.SENSITIVITY_FIELDS}
    return {k: v for k, v in row.items() if k not in BOOKKEEPING and not k.startswith("_")}


def page_values(task: Task, row: dict) -> dict[str, object]:
    """The values for `page_parts`' keys, where the row has them."""
    values: dict[str, object] = {}
    if task.kind == "eval" and "error" not in row:
        if row.get("_summary") is not None:
            values[LAYER_MAP_NAMESPACE] = row["_summary"]
        if row.get("size_bytes") is not None:
            values[SIZE_NAMESPACE] = row["size_bytes"]
    return values


def figures_from_pages(task: Task, values: dict[str, object]) -> dict | None:
    """An evaluation's figures from the layer map's stored evaluation and size, when both are there."""
    summary, size = values.get(LAYER_MAP_NAMESPACE), values.get(SIZE_NAMESPACE)
    if task.kind != "eval" or task.latency or not isinstance(summary, dict) or size is None:
        return None
    figures = {k: summary[k] for k in ("accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p")
               if k in summary}
    if len(figures) < 7:
        return None
    figures.update({"size_bytes": size, "plan": summary.get("plan", json.loads(task.plan)),
                    "kernels": task.kernels, "device": task.device, "seconds": summary.get("seconds")})
    return figures
