"""Grid tasks: one (model, set, plan) evaluation or one sensitivity row, and the list a grid runs.

A task names what it computes (model, set, limit, plan or layer and precision) and carries the
fingerprints of the weights and sentences the driver loaded, so that its identity (and its cache
entries, built in `cache.grid`) follows what determines the result, not a folder's name.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

from engine.analysis.presets import resolve_plan_item, split_plan_list
from engine.analysis.sensitivity import SWEEP_PRECISIONS, check_precisions
from engine.core.errors import EngineError
from engine.core.plan import Plan
from engine.core.vocabulary import Kernels, Runtime, TaskKind, names
from engine.evaluation.evaluator import EVAL_BATCH
from engine.grid import work
from engine.runtime.device import resolve_device

DIRECTION = "one"  # a sensitivity task quantizes its layer alone, as `sensitivity --direction one`
NAMES = ("model", "data", "plan_name")  # how the command line named it: not part of what is computed


class GridError(EngineError):
    """A grid that cannot be built or run as asked (a bad list, backend or cluster); the message says why."""


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
    kernels: str = Kernels.SIMULATED
    device: str = "cpu"
    model_fp: str = ""  # fingerprint of the weights the driver loaded
    data_fp: str = ""  # fingerprint of the (limited) set the driver loaded
    batch: int = EVAL_BATCH

    def __post_init__(self) -> None:
        if self.kind not in names(TaskKind):
            raise GridError(f"task kind must be one of {', '.join(names(TaskKind))}, not {self.kind!r}")
        if self.kind == TaskKind.EVAL and self.plan is None:
            raise GridError("an eval task needs a plan")
        if self.kind == TaskKind.SENSITIVITY and (not self.layer or self.precision not in SWEEP_PRECISIONS):
            raise GridError(f"a sensitivity task needs a layer and a precision among {', '.join(SWEEP_PRECISIONS)}")

    @property
    def group(self) -> tuple[str, str, int | None, str]:
        """What a worker holds to run this task: one model on one set (its first `limit` rows), on a device."""
        return (self.model, self.data, self.limit, self.device)

    @property
    def plan_object(self) -> Plan:
        return Plan.from_json(json.loads(self.plan))

    def key(self) -> str:
        """Tasks with equal keys compute the same row (the same weights, sentences and work under other names)."""
        what = {k: v for k, v in asdict(self).items() if k not in NAMES and k != "plan"}
        if self.kind == TaskKind.EVAL:
            what["plan"] = self.plan_object.key()
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]

    def label(self) -> str:
        what = self.plan_name if self.kind == TaskKind.EVAL else f"{self.layer}@{self.precision}"
        return f"{self.model} / {self.data}{'' if self.limit is None else f'[:{self.limit}]'} / {what}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Task:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def split_items(text: str | None) -> list[str]:
    """Items of a comma-separated list; commas inside inline JSON ({...}, [...]) do not split."""
    return split_plan_list(text or "")


def _pinned(plan: Plan) -> Plan:
    """An ONNX Runtime plan written for the driver's CPU by name: a worker on another kind of CPU computes the
    same numerics as the key the driver stores its row under (engine.core.cpu)."""
    return plan.for_cpu(plan.cpu.value) if plan.runtime == Runtime.ONNXRUNTIME and plan.target_cpu is None else plan


def build_tasks(models: Sequence[str], datasets: Sequence[str], plans: Sequence[str | tuple[str, Plan]] = (),
                sensitivity: Sequence[str] = (), limit: int | None = None, latency: bool = False,
                kernels: str = Kernels.SIMULATED, device: str = "cpu") -> list[Task]:
    """Every (model, set, plan) evaluation, then, per (model, set), a sensitivity row per layer x precision.
    A plan is a command-line item (preset, inline JSON, .json file) or a (name, Plan) pair.

    Each model is loaded once here, on the driver, for its fingerprint and its layers; a model, set,
    plan or device that cannot be used raises its one-line error before any work starts. A plan that
    fits one model but matches no layer of another is that task's error, reported in its row.
    """
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    datasets = list(dict.fromkeys(d.strip() for d in datasets if d.strip()))
    precisions = check_precisions(sensitivity) if any(p.strip() for p in sensitivity) else ()
    if not models or not datasets or not (plans or precisions):
        raise GridError("a grid needs at least one model (--models), one set (--data) and one plan (--plans) "
                        "or sensitivity precision (--sensitivity)")
    if limit is not None and limit < 1:
        raise GridError(f"limit must be at least 1, not {limit}")
    if kernels not in names(Kernels):
        raise GridError(f"kernels must be {' or '.join(names(Kernels))}, not {kernels!r}")
    device = str(resolve_device(device))
    data_fps = {name: work.data_fingerprint(name, limit) for name in datasets}
    tasks: list[Task] = []
    for name in models:
        model = work.driver_model(name)
        info = work.describe(model)
        resolved = [(item[0], json.dumps(_pinned(item[1]).to_json())) if isinstance(item, tuple)
                    else (item, json.dumps(_pinned(resolve_plan_item(item, model, check=False)[1]).to_json()))
                    for item in plans]
        for data in datasets:
            common = dict(model=name, data=data, limit=limit, device=device, model_fp=info.fingerprint,
                          data_fp=data_fps[data])
            tasks += [Task(TaskKind.EVAL, plan=text, plan_name=item, latency=latency, kernels=kernels, **common)
                      for item, text in resolved]
            tasks += [Task(TaskKind.SENSITIVITY, layer=layer, precision=p, **common)
                      for layer in info.layers for p in precisions]
    return tasks


def group_tasks(tasks: Iterable[Task]) -> OrderedDict[tuple, list[Task]]:
    """Tasks by worker state (model, set, limit, device), in order of first appearance."""
    groups: OrderedDict[tuple, list[Task]] = OrderedDict()
    for task in tasks:
        groups.setdefault(task.group, []).append(task)
    return groups
