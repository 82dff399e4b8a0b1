"""What the engine has learnt about a model object, kept beside it rather than in it.

A model's hash, its layers, its graph, its stages, its verified folds and the plan a built model carries
are costly to compute and fixed for the object, so they are computed once per model. They live here,
keyed weakly by the module itself: nothing is written into the model's `__dict__`, a copy of a model
(`copy.deepcopy`, `shallow_copy`) starts with no facts, and a model's facts go when it does.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from engine.core.memo import memo

if TYPE_CHECKING:
    from engine.core.plan import Plan
    from engine.model.graph import ModelGraph
    from engine.model.inventory import Layer
    from engine.model.stages import Stages


@dataclass
class ModelFacts:
    """One model's facts, each None until first computed."""

    fingerprint: str | None = None
    fingerprint_of: tuple | None = None  # the tensors' signature the fingerprint was computed for
    inventory: list[Layer] | None = None
    graph: ModelGraph | None = None
    stages: Stages | None = None
    folds: dict | None = None  # engine.quant.smoothing's verified folds, keyed by their layers
    plan: tuple[Plan, str] | None = None  # the plan and kernels `apply_plan` built this model with


_lock = threading.Lock()
# In the memo registry too: clearing it makes every model's facts computed afresh on next use.
_facts: weakref.WeakKeyDictionary[nn.Module, ModelFacts] = memo("model.facts", weakref.WeakKeyDictionary(), _lock)


def facts(model: nn.Module) -> ModelFacts:
    """`model`'s facts (created empty on first use)."""
    with _lock:
        found = _facts.get(model)
        if found is None:
            found = _facts[model] = ModelFacts()
        return found
