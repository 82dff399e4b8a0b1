"""The layer map's engine: plan edits, and the benchmark of an incremental toggle.

A toggle re-evaluates only from the first cut it touches (engine.evaluation.session.Session); the
benchmark compares that with a plain full re-evaluation of the same plan (the model's own forward
over the same tokenized, length-sorted batches, same kernels), both in one run.
"""
from __future__ import annotations

import fnmatch
import statistics
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from engine.data.sets import load_dataset
from engine.core.plan import FP32, Plan, Rule
from engine.core.vocabulary import Runtime
from engine.evaluation.evaluate import get_evaluator
from engine.evaluation.session import Session, StateBudget
from engine.model.inventory import Layer, inventory
from engine.runtime.latency import machine

CYCLE = ("fp32", "int8", "int4")
FIRST_ESTIMATE_MIN = 64  # examples behind the first estimate shown after a click


def next_precision(current: str) -> str:
    """FP32 -> INT8 -> INT4 -> FP32; a float precision (fp16/bf16) goes back to FP32."""
    return CYCLE[(CYCLE.index(current) + 1) % len(CYCLE)] if current in CYCLE else "fp32"


def set_layers(plan: Plan, layer_names: list[str], targets: Iterable[str], rule: str | Rule) -> Plan:
    """`plan` with the named layers set to `rule` (a precision, or one with its method and options), as explicit
    per-layer rules; the other layers keep theirs."""
    rules = dict(plan.layer_rules(layer_names))
    for name in targets:
        rules[name] = Rule.of(rule)
    return plan.with_rules([(name, rules[name]) for name in layer_names
                            if name in rules and rules[name].precision != "fp32"])


@dataclass(frozen=True)
class FittedPlan:
    """A plan cut down to the rules that match a layer of one model."""

    plan: Plan
    dropped: tuple[str, ...]  # the rules' patterns that match no layer of the model, in the plan's order


def fit_plan(plan: Plan, layer_names: list[str]) -> FittedPlan:
    """`plan` on another model: a session keeps its plan when the person picks another model, and a rule
    that names no layer of the new one would make every evaluation of the plan fail."""
    def matches(pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for name in layer_names)

    kept = [(pattern, rule) for pattern, rule in plan.rules if matches(pattern)]
    dropped = tuple(pattern for pattern, _ in plan.rules if not matches(pattern))
    return FittedPlan(plan.with_rules(kept) if dropped else plan, dropped)


def change_label(before: Plan | None, after: Plan, layer_names: list[str]) -> str:
    """What `after` changed from `before` (None: from FP32) for the history: "FP32" for a plan that quantizes
    nothing, one layer and its new rule ("… → INT4 GPTQ"), else how many layers and to what, else "runtime …"
    or "options". By each layer's whole spec, so that a method changed at the same precision is named."""
    new = after.specs(layer_names, strict=False)
    if all(spec.precision == "fp32" for spec in new.values()) and after.runtime == Runtime.TORCH:
        return "FP32"
    old = before.specs(layer_names, strict=False) if before is not None else Plan().specs(layer_names, strict=False)
    changed = [name for name in layer_names if new[name] != old[name]]
    if len(changed) == 1:
        return f"{changed[0]} → {new[changed[0]].describe().upper()}"
    if changed:
        return f"{len(changed)} layers → {'/'.join(sorted({new[name].describe().upper() for name in changed}))}"
    if before is not None and before.runtime != after.runtime:
        return f"runtime {after.runtime}"
    return "options"


def fit_undo(plans: list[Plan], layer_names: list[str], current: Plan) -> list[Plan]:
    """An undo stack fitted to another model: each plan fitted, without the steps that no longer change
    anything (a plan equal to the one it would replace)."""
    fitted: list[Plan] = []
    for plan in plans:
        plan = fit_plan(plan, layer_names).plan
        if not fitted or fitted[-1].key() != plan.key():
            fitted.append(plan)
    while fitted and fitted[-1].key() == current.key():
        fitted.pop()
    return fitted


def _naive_pass(evaluator, plan: Plan) -> float:
    """A plain full re-evaluation: build the plan's model and run its own forward over every batch."""
    started = time.perf_counter()
    quantized = evaluator.build(plan)
    with torch.inference_mode():
        for batch in evaluator.batches:
            quantized(**batch.inputs)
    return time.perf_counter() - started


def toggle_layers(layers: list[Layer]) -> list[Layer]:
    """One layer of each cut kind from every block (query and attention-out start at the block's input,
    ffn-in at its feed-forward part), in the 2:1 proportion the six BERT roles have; other families'
    first attention and first feed-forward layer of each block."""
    chosen = [layer for layer in layers if layer.role in ("query", "qkv", "attention-out", "ffn-in")]
    return chosen or [layer for layer in layers if layer.block is not None] or layers


def bench_toggle(model: nn.Module, tokenizer, dataset: str = "embedded", device: str = "cpu",
                 precision: str = "int8") -> dict:
    """Median times of an incremental toggle from FP32 against a full re-evaluation, per layer."""
    data = load_dataset(dataset)
    evaluator = get_evaluator(model, tokenizer, data, device, keep_states=True)
    names = [layer.name for layer in inventory(model)]
    budget = StateBudget()
    rows = []
    for layer in toggle_layers(inventory(model)):
        plan = set_layers(FP32, names, [layer.name], precision)
        naive_s = _naive_pass(evaluator, plan)
        session = Session(evaluator, budget)
        first: list[float] = []
        clicked = time.perf_counter()

        def on_progress(partial, clicked=clicked, first=first):
            if not first and partial.done >= min(FIRST_ESTIMATE_MIN, partial.total):
                first.append(time.perf_counter() - clicked)

        result = session.update(plan, progress=on_progress)
        update_s = time.perf_counter() - clicked
        session.close()
        rows.append({"layer": layer.name, "block": layer.block, "role": layer.role, "naive_s": naive_s,
                     "update_s": update_s, "first_estimate_s": first[0] if first else update_s,
                     "start_cut": result.start_cut})
    naive = statistics.median(r["naive_s"] for r in rows)
    update = statistics.median(r["update_s"] for r in rows)
    return {"naive_s": naive, "update_s": update,
            "first_estimate_s": statistics.median(r["first_estimate_s"] for r in rows),
            "speedup": naive / update, "n": len(data), "layers": len(rows), "precision": precision,
            "device": str(evaluator.device), "machine": machine(evaluator.device), "per_layer": rows}
