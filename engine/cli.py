"""`python -m engine COMMAND ... [--json]`: the contract's commands, thin over the engine's functions.

With --json each command prints exactly one JSON document on stdout; logs go to stderr. Bad
input (a plan, a dataset, a device) exits with code 2 and one line on stderr, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from typing import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], object], str]] = {}


def command(name: str, help_text: str, setup: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand: `setup` adds its arguments, the decorated function returns its JSON value."""
    def register(run: Callable[[argparse.Namespace], object]):
        COMMANDS[name] = (setup, run, help_text)
        return run
    return register


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def load(args: argparse.Namespace):
    """The model named by --model, falling back to the embedded one (with one line) if the hub is out of reach."""
    from engine.models import load_model_or_fallback

    model, tokenizer, warning = load_model_or_fallback(args.model)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return model, tokenizer


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="embedded, distilbert-sst2, a hub id or a local folder")


def _plan_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", default="fp32", help="a precision, inline JSON, or a .json file")


def _kernels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", default="simulated", choices=("simulated", "real"))


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def resolved_plan(args: argparse.Namespace, model):
    """The --plan argument parsed and checked against this model's layers."""
    from engine.layers import list_layers
    from engine.plan import parse_plan

    plan = parse_plan(args.plan)
    plan.resolve(list_layers(model))
    return plan


# ---- commands -------------------------------------------------------------------------------
@command("layers", "the quantizable layers: name, block, role, shape, params", _model_arg)
def run_layers(args):
    from engine.layers import inventory

    model, _ = load(args)
    return [layer.as_dict() for layer in inventory(model)]


def _eval_setup(parser):
    _model_arg(parser)
    parser.add_argument("--data", default="embedded", help="embedded, amazon, tweets, nyt, sst2 or a .csv path")
    _plan_arg(parser)
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples only")
    _kernels_arg(parser)
    _device_arg(parser)


@command("eval", "accuracy with 95% CI, agreement, flips, KL and McNemar p against FP32", _eval_setup)
def run_eval(args):
    from engine.evaluation import evaluate

    model, tokenizer = load(args)
    plan = resolved_plan(args, model)
    return evaluate(model, tokenizer, args.data, plan, args.kernels, args.limit, args.device)


def _bench_setup(parser):
    parser.add_argument("what", nargs="?", default="model", choices=("model", "toggle"),
                        help="model: latency of a plan; toggle: the layer map's incremental update")
    _model_arg(parser)
    _plan_arg(parser)
    parser.add_argument("--batch", type=_positive_int, default=1)
    parser.add_argument("--tokens", type=_positive_int, default=32, help="sequence length of the timed inputs")
    _device_arg(parser)


@command("bench", "latency and throughput on real kernels (or `bench toggle`)", _bench_setup)
def run_bench(args):
    model, tokenizer = load(args)
    if args.what == "toggle":
        from engine.toggle import bench_toggle

        return bench_toggle(model, tokenizer, device=args.device)
    from engine.measure import bench

    return bench(model, tokenizer, resolved_plan(args, model), args.batch, args.tokens, args.device)


# ---- entry point ----------------------------------------------------------------------------
def _jsonable(value):
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _print_human(value) -> None:
    if isinstance(value, list):
        for item in value:
            _print_human(item)
            print()
    elif isinstance(value, dict):
        for key, item in value.items():
            print(f"{key}: {json.dumps(_jsonable(item), ensure_ascii=False) if isinstance(item, (dict, list)) else item}")
    else:
        print(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, _, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text)
        setup(child)
        child.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.data import DataError
    from engine.evaluation import EvalError
    from engine.layers import UnsupportedModel
    from engine.models import ModelError
    from engine.plan import PlanError

    expected = (PlanError, DataError, EvalError, ModelError, UnsupportedModel, UsageError)
    try:
        result = COMMANDS[args.command][1](args)
    except expected as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(_jsonable(result), ensure_ascii=False))
    else:
        _print_human(result)
    return 0
