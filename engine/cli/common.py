"""What every command shares: its arguments, loading the model, and turning results and errors into output."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from typing import Callable

from engine.core.vocabulary import Kernels, Runtime, names


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded",
                        help="embedded, distilbert-sst2, a hub id, or a local folder with any "
                             "...ForSequenceClassification")


def plan_arg(parser: argparse.ArgumentParser, default: str = "fp32") -> None:
    parser.add_argument("--plan", default=default, help="a precision, inline JSON, or a .json file")
    target_cpu_arg(parser)


def target_cpu_arg(parser: argparse.ArgumentParser) -> None:
    from engine.core.cpu import TARGET_NAMES

    parser.add_argument("--target-cpu", default=None, choices=TARGET_NAMES,
                        help="the CPU an ONNX Runtime plan's int8 is for (default: this machine): avx2 and avx512 "
                             "(no VNNI) get 7-bit weights, exact on every CPU; vnni and amx 8-bit weights")


def for_target(args: argparse.Namespace, plan):
    """The plan with --target-cpu applied (a plan's own target_cpu option stands where the flag is absent)."""
    return plan.for_cpu(args.target_cpu) if args.target_cpu else plan


def kernels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", default=None, choices=names(Kernels),
                        help="simulated (exact numerics, default on torch) or real kernels (default on onnxruntime: "
                             "the exported graph itself)")


def runtime_arg(parser: argparse.ArgumentParser, several: bool = False) -> None:
    parser.add_argument("--runtime", default=Runtime.TORCH,
                        help=f"comma-separated: {', '.join(names(Runtime))}" if several
                        else " or ".join(names(Runtime)))


def runtimes(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in names(Runtime)]
    if unknown or not chosen:
        raise UsageError(f"runtime {unknown[0] if unknown else 'none'!r}: choose {' or '.join(names(Runtime))}")
    return chosen


def device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def data_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    what = "comma-separated: " if several else ""
    parser.add_argument("--data", default="embedded", help=f"{what}embedded, amazon, tweets, nyt, sst2 or a .csv path "
                                                           "(columns text,label)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples only")


def progress_printer(label: str = "") -> Callable[[float, str], None]:
    """A progress callback that prints one stderr line per new step text."""
    shown: set[str] = set()

    def show(fraction: float, text: str) -> None:
        if text not in shown:
            shown.add(text)
            print(f"[{fraction:4.0%}] {label}{text}", file=sys.stderr, flush=True)
    return show


def load(args: argparse.Namespace):
    """The model named by --model, falling back to the embedded one (with one line) if the hub is out of reach."""
    from engine.model.loading import load_model_or_fallback

    model, tokenizer, warning = load_model_or_fallback(args.model)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return model, tokenizer


def resolved_plan(args: argparse.Namespace, model):
    """The --plan argument parsed and checked against this model's layers."""
    from engine.core.plan import parse_plan
    from engine.model.inventory import list_layers

    plan = for_target(args, parse_plan(args.plan))
    plan.resolve(list_layers(model))
    return plan


def evaluation_set(args: argparse.Namespace):
    from engine.data.sets import load_dataset

    return load_dataset(args.data).head(args.limit)


def jsonable(value):
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _print_human(value) -> None:
    if isinstance(value, list):
        for item in value:
            _print_human(item)
            print()
    elif isinstance(value, dict):
        for key, item in value.items():
            shown = json.dumps(jsonable(item), ensure_ascii=False) if isinstance(item, (dict, list)) else item
            print(f"{key}: {shown}")
    else:
        print(value)


def execute(run: Callable[[], object], as_json: bool) -> int:
    """Run a command: its value on stdout, an expected error as one line on stderr with exit code 2."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.core.errors import EngineError

    try:
        result = run()
    except (EngineError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    try:
        if as_json:
            print(json.dumps(jsonable(result), ensure_ascii=False))
        else:
            _print_human(result)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader (| head) stopped reading: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
