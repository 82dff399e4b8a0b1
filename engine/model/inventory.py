"""The layer inventory: every quantizable layer, in forward order, with its block and role.

Found by walking the modules and running the model once (engine.model.graph): every Linear (or
GPT-2's Conv1D, or a fused q/k/v) that the forward calls, and the word-embedding table. Roles come
from names (engine.model.families), "other" where no pattern knows one. A layer that several blocks
call (ALBERT shares one block's weights across all its layers) is listed once, says so in `shared`,
and is placed at the first block that calls it: quantizing it quantizes it for every block.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from engine.core.precisions import PRECISIONS
from engine.model.facts import facts
from engine.model.families import ALL_ROLES, block_role, outer_role
from engine.model.graph import model_graph

PART_ORDER = {"pre": 0, "attention": 1, "ffn": 1, "head": 2}


@dataclass(frozen=True)
class Layer:
    """One quantizable layer: its module name, place in the model and size. Shapes are [out, in] for
    Linears (GPT-2's Conv1D included) and [rows, width] for the embedding table."""

    name: str
    block: int | None
    role: str
    shape: tuple[int, ...]
    params: int
    kind: str  # "linear" or "embedding"
    shared: int = 1  # how many blocks run this layer

    def bytes_at(self, precision: str, group_size: int = 64) -> int:
        """Bytes of this layer's tensors in `precision`'s real format (weights, scales, a float32 bias)."""
        rows, cols = self.shape
        return PRECISIONS[precision].layer_bytes(rows, cols, self.params - rows * cols, group_size)

    def to_json(self) -> dict:
        data = {"name": self.name, "block": self.block, "role": self.role, "shape": list(self.shape),
                "params": self.params}
        if self.shared > 1:
            data["shared_by_blocks"] = self.shared
        return data


def _inner_name(name: str, block_paths: tuple[str, ...], block: int) -> str:
    prefix = block_paths[block] + "."
    return name[len(prefix):] if name.startswith(prefix) else name


def inventory(model: nn.Module) -> list[Layer]:
    """Every quantizable layer in forward order: word embeddings, layers before the blocks, each block's
    layers, the head."""
    known = facts(model)
    if known.inventory is not None:
        return known.inventory
    graph = model_graph(model)
    embedding = model.get_submodule(graph.embedding)
    layers = [Layer(graph.embedding, None, "embedding", tuple(embedding.weight.shape), embedding.weight.numel(),
                    "embedding")]
    for place in sorted(graph.places.values(), key=lambda p: p.order):
        module = model.get_submodule(place.name)
        rows, cols = (module.nf, module.weight.shape[0]) if type(module).__name__ == "Conv1D" else module.weight.shape
        params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        if place.block is None:
            role = outer_role(place.name, place.part == "pre")
        else:
            role = block_role(_inner_name(place.name, graph.block_paths, place.block))
        layers.append(Layer(place.name, place.block, role, (rows, cols), params, "linear", max(1, len(place.blocks))))
    known.inventory = layers
    return layers


def list_layers(model: nn.Module) -> list[str]:
    """Fully-qualified names of every quantizable layer, in forward order."""
    return [layer.name for layer in inventory(model)]


def num_blocks(model: nn.Module) -> int:
    return model_graph(model).n_blocks


__all__ = ["ALL_ROLES", "Layer", "PART_ORDER", "inventory", "list_layers", "num_blocks"]
