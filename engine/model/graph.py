"""The model's structure, found by running it once on a few tokens rather than by reading its code.

Hooks on a private copy record, in call order: which list of blocks the forward walks (the list whose
elements are called most; ALBERT calls one shared block for every layer), which quantizable layers
run before the blocks, inside which block (before or after the feed-forward part's entry), or after
them in the head; which layers read the very same input tensor (q/k/v, gate/up); which norm produced
that tensor, and whether the tensor is also the residual stream (a block's input, output or mid
state), which decides how SmoothQuant may fold into it.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.model.facts import facts
from engine.model.families import FeedForwardCut, feed_forward_cut, is_norm

PROBE_TOKENS = 8


@dataclass(frozen=True)
class LayerPlace:
    """Where one quantizable layer runs: part is "pre" (before the blocks), "attention" or "ffn" (inside
    block `block`), or "head"; `blocks` lists every block that calls it (more than one when shared)."""

    name: str
    part: str
    block: int | None
    blocks: tuple[int, ...]
    order: int


@dataclass(frozen=True)
class InputGroup:
    """Layers that read one and the same input tensor, what produced it, and whether it is residual."""

    layers: tuple[str, ...]
    norm: str | None
    residual: bool


@dataclass
class ModelGraph:
    block_list: str | None
    block_paths: tuple[str, ...]  # the module that runs block k (repeated when blocks share weights)
    feed_forward: FeedForwardCut | None
    places: dict[str, LayerPlace]
    groups: list[InputGroup]
    embedding: str
    block_output: str  # "tensor" or "tuple": how a block hands back its hidden state
    block_extras: tuple = field(default=())

    @property
    def n_blocks(self) -> int:
        return len(self.block_paths)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    device = next(model.parameters()).device
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7 + 3) % vocab
    return {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}


def _hidden_of(args: tuple, kwargs: dict):
    return args[0] if args else kwargs.get("hidden_states")


def run_hooked(model: nn.Module, inputs: dict, handles: list) -> None:
    """One forward of `model` (a private copy) with hooks that are removed afterwards, whatever happens."""
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def _find_blocks(probe: nn.Module, inputs: dict) -> tuple[str | None, list[str]]:
    """The ModuleList whose elements the forward calls most, and the element path of each call in order."""
    calls: list[tuple[str, str]] = []
    handles = []
    for list_name, module in probe.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, element in enumerate(module):
                handles.append(element.register_forward_pre_hook(
                    lambda _m, _a, lst=list_name, path=f"{list_name}.{index}": calls.append((lst, path))))
    run_hooked(probe, inputs, handles)
    if not calls:
        return None, []
    counts = Counter(lst for lst, _ in calls)
    # most calls; among equals the outermost list (ALBERT's layer groups rather than the layers inside)
    best = min(counts, key=lambda lst: (-counts[lst], lst.count(".")))
    return best, [path for lst, path in calls if lst == best]


def model_graph(model: nn.Module) -> ModelGraph:
    """The structure of `model` (computed once and kept in its facts); the model itself is never touched."""
    known = facts(model)
    if known.graph is not None:
        return known.graph
    probe = copy.deepcopy(model, {id(t): t for t in list(model.parameters()) + list(model.buffers())})
    inputs = probe_inputs(model)
    block_list, block_paths = _find_blocks(probe, inputs)
    modules = dict(probe.named_modules())
    embedding_module = probe.get_input_embeddings()
    embedding = next(name for name, module in modules.items() if module is embedding_module)
    blocks = [modules[path] for path in block_paths]
    cut = feed_forward_cut(blocks[0]) if blocks and all(type(b) is type(blocks[0]) for b in blocks) else None

    events: list[tuple] = []
    kept: list[torch.Tensor] = []  # holding every seen tensor keeps ids unique for the whole probe
    state = {"block": None, "calls": Counter(), "mid": False, "outputs": []}
    residual: set[int] = set()
    produced_by: dict[int, str] = {}

    def remember(tensor) -> int | None:
        if isinstance(tensor, torch.Tensor):
            kept.append(tensor)
            return id(tensor)
        return None

    def block_start(module, args, kwargs):
        index = sum(state["calls"].values())
        state["calls"][id(module)] += 1
        state["block"], state["mid"] = index, False
        residual.add(remember(_hidden_of(args, kwargs)))

    def block_end(_module, _args, _kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        residual.add(remember(hidden))
        state["outputs"].append(output)
        state["block"] = None

    def mid(_module, args):
        if state["block"] is not None and not state["mid"]:
            state["mid"] = True
            residual.add(remember(args[0]))

    def layer_call(name):
        def hook(_module, args):
            part = "pre" if not state["outputs"] and state["block"] is None else \
                "head" if state["block"] is None else "ffn" if state["mid"] else "attention"
            events.append((name, part, state["block"], remember(args[0])))
        return hook

    def norm_out(name):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor):
                produced_by[remember(output)] = name
        return hook

    handles = []
    for module in {id(b): b for b in blocks}.values():
        handles.append(module.register_forward_pre_hook(block_start, with_kwargs=True))
        handles.append(module.register_forward_hook(block_end, with_kwargs=True))
        if cut is not None:
            handles.append(getattr(module, cut.entry).register_forward_pre_hook(mid))
    for name, module in modules.items():
        if is_linear(module):
            handles.append(module.register_forward_pre_hook(layer_call(name)))
        elif is_norm(module):
            handles.append(module.register_forward_hook(norm_out(name)))
    run_hooked(probe, inputs, handles)

    places: dict[str, LayerPlace] = {}
    first_input: dict[str, int | None] = {}
    for order, (name, part, block, tensor) in enumerate(events):
        if name in places:
            old = places[name]
            if block is not None and block not in old.blocks:
                places[name] = LayerPlace(name, old.part, old.block, old.blocks + (block,), old.order)
            continue
        places[name] = LayerPlace(name, part, block, () if block is None else (block,), order)
        first_input[name] = tensor
    by_tensor: dict[int | None, list[str]] = {}
    for name, tensor in first_input.items():
        by_tensor.setdefault(tensor, []).append(name)
    groups = [InputGroup(tuple(names), produced_by.get(tensor), tensor in residual)
              for tensor, names in by_tensor.items()]
    sample = state["outputs"][0] if state["outputs"] else None
    graph = ModelGraph(block_list, tuple(block_paths), cut, places, groups, embedding,
                       "tuple" if isinstance(sample, tuple) else "tensor",
                       tuple(sample[1:]) if isinstance(sample, tuple) else ())
    known.graph = graph
    return graph
