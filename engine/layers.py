"""The layer inventory: every quantizable layer, found by walking the modules.

Roles come from the module's name within its block, so BERT (query/key/value/attention.output/
intermediate/output), DistilBERT (q_lin/k_lin/v_lin/out_lin/ffn.lin1/ffn.lin2) and similar
encoders are read the same way, without hard-coding one architecture.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from torch import nn

ROLES = ("query", "key", "value", "attention-out", "ffn-in", "ffn-out")
HEAD_ROLES = ("pooler", "classifier")
ALL_ROLES = ("embedding",) + ROLES + HEAD_ROLES

_BLOCK = re.compile(r"\.(?:layer|layers|block|blocks|h)\.(\d+)\.")
# (pattern on the name inside its block, role), first match wins; order matters for "output.dense".
_ROLE_PATTERNS = (
    (re.compile(r"(^|\.)(query|q_lin|q_proj|q)$"), "query"),
    (re.compile(r"(^|\.)(key|k_lin|k_proj|k)$"), "key"),
    (re.compile(r"(^|\.)(value|v_lin|v_proj|v)$"), "value"),
    (re.compile(r"attention\.output\.dense$|(^|\.)(out_lin|o_proj|out_proj)$|attention.*\.dense$"), "attention-out"),
    (re.compile(r"intermediate\.dense$|(^|\.)(lin1|fc1|up_proj|wi)$"), "ffn-in"),
    (re.compile(r"(^|\.)output\.dense$|(^|\.)(lin2|fc2|down_proj|wo)$"), "ffn-out"),
)
_HEAD_PATTERNS = (
    (re.compile(r"(^|\.)(pooler\.dense|pre_classifier|classifier\.dense)$"), "pooler"),
    (re.compile(r"(^|\.)(classifier|classifier\.out_proj|score)$"), "classifier"),
)


@dataclass(frozen=True)
class Layer:
    """One quantizable layer: its module name, place in the model and size."""

    name: str
    block: int | None
    role: str
    shape: tuple[int, ...]
    params: int
    kind: str  # "linear" or "embedding"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return {k: data[k] for k in ("name", "block", "role", "shape", "params")}


class UnsupportedModel(ValueError):
    """A model whose layers cannot be mapped to roles."""


def _role(name: str) -> tuple[int | None, str] | None:
    match = _BLOCK.search(name)
    if match:
        inner = name[match.end():]
        for pattern, role in _ROLE_PATTERNS:
            if pattern.search(inner):
                return int(match.group(1)), role
        return None
    for pattern, role in _HEAD_PATTERNS:
        if pattern.search(name):
            return None, role
    return None


def inventory(model: nn.Module) -> list[Layer]:
    """Every quantizable layer in forward order: word embeddings, each block's Linears, the head."""
    cached = getattr(model, "_engine_inventory", None)
    if cached is not None:
        return cached
    layers: list[Layer] = []
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding:
            layers.append(Layer(name, None, "embedding", tuple(module.weight.shape), module.weight.numel(), "embedding"))
        elif isinstance(module, nn.Linear):
            placed = _role(name)
            if placed is None:
                raise UnsupportedModel(f"cannot tell the role of layer {name!r}: not a BERT- or DistilBERT-style encoder")
            block, role = placed
            params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            layers.append(Layer(name, block, role, tuple(module.weight.shape), params, "linear"))

    def order(layer: Layer) -> tuple[int, int]:
        if layer.role == "embedding":
            return (-1, 0)
        if layer.block is None:
            return (1 << 20, HEAD_ROLES.index(layer.role))
        return (layer.block, ROLES.index(layer.role))

    layers.sort(key=order)
    object.__setattr__(model, "_engine_inventory", layers)
    return layers


def list_layers(model: nn.Module) -> list[str]:
    """Fully-qualified names of every quantizable layer, in forward order."""
    return [layer.name for layer in inventory(model)]


def num_blocks(model: nn.Module) -> int:
    blocks = [layer.block for layer in inventory(model) if layer.block is not None]
    return max(blocks) + 1 if blocks else 0
