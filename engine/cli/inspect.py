"""`layers`: the quantizable layers of a model."""
from __future__ import annotations

from engine.cli.common import load, model_arg


def setup(_name: str, parser) -> None:
    model_arg(parser)


def run(_name: str, args):
    from engine.model.inventory import inventory

    model, _ = load(args)
    return [layer.to_json() for layer in inventory(model)]
