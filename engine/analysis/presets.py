"""Named plans people compare (fp32, fp16, bf16, int8, int8-linear, int4) and how a list of plans is read."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.core.plan import FP32, Plan, PlanError, parse_plan
from engine.model.inventory import inventory

PRESETS = {
    "fp32": "FP32, the reference",
    "fp16": "every Linear and the embedding table in FP16",
    "bf16": "every Linear and the embedding table in BF16",
    "int8": "INT8 everywhere: W8A8 Linears and the int8 embedding table",
    "int8-linear": "INT8 Linears (W8A8), embedding table kept in FP32",
    "int4": "INT4 weight-only everywhere, group-wise",
}
DISPLAY = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8", "int8-linear": "INT8 (Linear only)",
           "int4": "INT4"}
IN_DOMAIN = "embedded"
OUT_OF_DOMAIN = ("amazon", "tweets", "nyt")


def preset_plan(name: str, model: nn.Module) -> Plan:
    """A preset by name; int8-linear keeps the model's embedding table in FP32."""
    if name == "int8-linear":
        embeddings = [layer.name for layer in inventory(model) if layer.kind == "embedding"]
        return Plan.from_mapping({"*": "int8", **{embedding: "fp32" for embedding in embeddings}})
    if name == "fp32":
        return FP32
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Plan.uniform(name)


def split_plan_list(text: str) -> list[str]:
    """Items of a comma-separated plan list; commas inside inline JSON ({...}) do not split."""
    items, depth, current = [], 0, []
    for char in text:
        depth += (char in "{[") - (char in "}]")
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def resolve_plan_item(item: str, model: nn.Module, check: bool = True) -> tuple[str, Plan]:
    """(label, plan) for a preset name, a .json file path or inline JSON, checked against the model
    unless `check` is off (a grid reports a plan that fits one model but not another in that row)."""
    item = item.strip()
    if item in PRESETS:
        label, plan = item, preset_plan(item, model)
    else:
        if not item.startswith("{") and not item.endswith(".json"):
            raise PlanError(f"unknown plan {item!r}: use a preset ({', '.join(PRESETS)}), a .json file or inline JSON")
        plan = parse_plan(item)
        label = Path(item).stem if item.endswith(".json") and not item.startswith("{") else plan.label()
    if check:
        plan.resolve([layer.name for layer in inventory(model)])
    return label, plan


def display_name(label: str) -> str:
    return DISPLAY.get(label, label)
