"""The quantization engine: load any sequence classifier, list its layers, apply a precision plan,
evaluate it exactly and incrementally, and analyse what quantization does to it.

A pure library (no Streamlit, no disk cache), used by the dashboard's pages and by `python -m engine`.
The public names load on first use, so `import engine` (and `python -m engine --help`) stays fast.

Folders are layers, each importing only from those below it (checked by the import contract in
pyproject.toml): cli > grid > analysis > evaluation > runtime > quant > kernels > model > data > core.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "load_model": "engine.model.loading",
    "list_layers": "engine.model.inventory",
    "inventory": "engine.model.inventory",
    "apply_plan": "engine.quant.apply",
    "evaluate": "engine.evaluation.evaluate",
    "Plan": "engine.core.plan",
    "parse_plan": "engine.core.plan",
    "load_dataset": "engine.data.sets",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
