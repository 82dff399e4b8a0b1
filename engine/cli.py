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


# ---- compare (issue 8) ----------------------------------------------------------------------
def _compare_setup(parser):
    _model_arg(parser)
    parser.add_argument("--plans", default="fp32,fp16,int8,int4",
                        help="comma-separated: presets fp32, fp16, bf16, int8, int8-linear, int4, or .json plan files")
    parser.add_argument("--data", default="embedded", help="comma-separated: embedded, amazon, tweets, nyt, sst2, .csv")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples of each set")
    _device_arg(parser)


@command("compare", "plans side by side on several sets: accuracy with CI, McNemar, KL, size, latency", _compare_setup)
def run_compare(args):
    from engine.compare import compare_plans, resolve_plan_item, split_plan_list
    from engine.evaluation import resolve_device

    items, sets = split_plan_list(args.plans), [d.strip() for d in args.data.split(",") if d.strip()]
    if not items or not sets:
        raise UsageError("compare needs at least one plan (--plans) and one set (--data)")
    resolve_device(args.device)  # before loading anything: a missing GPU is reported at once
    model, tokenizer = load(args)
    plans = [resolve_plan_item(item, model) for item in items]

    shown: set[str] = set()

    def progress(fraction: float, text: str) -> None:  # one stderr line per step, not per batch
        if text not in shown:
            shown.add(text)
            print(f"[{fraction:4.0%}] {text}", file=sys.stderr, flush=True)

    return compare_plans(model, tokenizer, plans, sets, args.device, progress=progress, limit=args.limit)


# ---- predict and perturb (issue 5) ----------------------------------------------------------
def _stdin_text() -> str:
    # Bytes, not sys.stdin: invalid UTF-8 must become U+FFFD rather than a decoding traceback.
    return sys.stdin.buffer.read().decode("utf-8", "replace")


def _stdin_lines() -> list[str]:
    """One text per line ("\\n" only: other line breaks are characters of a review); an empty line is an empty text."""
    data = _stdin_text()
    if not data:
        return []
    lines = data.split("\n")
    if data.endswith("\n"):
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _predict_setup(parser):
    _model_arg(parser)
    _plan_arg(parser)
    _kernels_arg(parser)
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify; - reads one text per line from stdin")


@command("predict", "label, confidence and probabilities of any text(s) under a plan", _predict_setup)
def run_predict(args):
    from engine.plan import parse_plan
    from engine.robustness import clean_surrogates, predict

    parse_plan(args.plan)  # a malformed plan is reported before the model loads
    texts = []
    for text in args.texts:
        texts += _stdin_lines() if text == "-" else [clean_surrogates(text)]
    model, tokenizer = load(args)
    return predict(model, tokenizer, texts, resolved_plan(args, model), args.kernels)


def _perturb_setup(parser):
    parser.add_argument("--kind", required=True, help="swap, delete, insert, substitute, keyboard, homoglyph or invisible")
    parser.add_argument("--rate", required=True, help="share of the eligible words to edit, 0 to 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-ends", action="store_true", help="leave the first and last letter of each word alone")
    parser.add_argument("text", metavar="TEXT", help="the text; - reads it from stdin")


@command("perturb", "typos of one kind at a rate, deterministic for a seed, with the edits made", _perturb_setup)
def run_perturb(args):
    from engine.perturb import perturb
    from engine.robustness import clean_surrogates

    text = _stdin_text().removesuffix("\n") if args.text == "-" else clean_surrogates(args.text)
    return perturb(text, args.kind, args.rate, args.seed, args.keep_ends).as_dict()


# ---- smoothquant (issue 6) ------------------------------------------------------------------
SMOOTHQUANT_ACTS = {"static": "static", "dynamic": "token", "tensor": "dynamic"}


def _alphas(text: str) -> list:
    """--alpha: 'auto', one number in [0, 1], or a comma-separated list of them."""
    alphas = []
    for item in (part.strip() for part in text.split(",")):
        if item == "auto":
            alphas.append("auto")
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is neither a number in [0, 1] nor 'auto'") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"alpha {item} is outside [0, 1]")
        alphas.append(value)
    return alphas


def _smoothquant_setup(parser):
    parser.add_argument("--alpha", type=_alphas, default=[0.5],
                        help="an alpha in [0, 1], 'auto' (per-layer alpha minimizing each layer's W8A8 error on "
                             "calibration data), or a comma-separated list, e.g. 0,0.25,0.5,auto")
    parser.add_argument("--act", choices=tuple(SMOOTHQUANT_ACTS), default="static",
                        help="W8A8 activation scales: static = per-tensor, calibrated on the train split; "
                             "dynamic = per-token, computed at run time (SmoothQuant's dynamic setting); "
                             "tensor = per-tensor dynamic (torch's CPU kernel)")
    parser.add_argument("--calib", type=_positive_int, default=128, help="calibration sentences from the train split")
    _model_arg(parser)
    parser.add_argument("--data", default="embedded", help="embedded, amazon, tweets, nyt, sst2 or a .csv path")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples only")
    _device_arg(parser)


@command("smoothquant", "W8A8 accuracy with SmoothQuant at each alpha, against W8A8 without it and FP32",
         _smoothquant_setup)
def run_smoothquant(args):
    from engine.data import load_dataset
    from engine.evaluation import get_evaluator
    from engine.smoothquant import alpha_rows

    model, tokenizer = load(args)
    data = load_dataset(args.data).head(args.limit)
    evaluator = get_evaluator(model, tokenizer, data, args.device)

    def progress(fraction: float, text: str) -> None:
        print(f"[{fraction:4.0%}] {text}", file=sys.stderr, flush=True)

    return alpha_rows(evaluator, args.alpha, SMOOTHQUANT_ACTS[args.act], args.calib, progress=progress)


# ---- sensitivity and search (issue 7) -------------------------------------------------------
def _sweep_data_args(parser):
    _model_arg(parser)
    parser.add_argument("--data", default="embedded", help="embedded, amazon, tweets, nyt, sst2 or a .csv path")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples only")
    _device_arg(parser)


def _sensitivity_setup(parser):
    parser.add_argument("--precisions", default="int8,int4", help="comma-separated, among int8,int4")
    parser.add_argument("--direction", choices=("one", "all-but-one"), default="one",
                        help="one: only that layer quantized; all-but-one: every layer but that one")
    _sweep_data_args(parser)


def _sweep_evaluator(args):
    from engine.data import load_dataset
    from engine.evaluation import get_evaluator

    model, tokenizer = load(args)
    data = load_dataset(args.data).head(args.limit)
    return model, tokenizer, get_evaluator(model, tokenizer, data, args.device, keep_states=True)


def _sweep(model, tokenizer, evaluator, precisions: str, direction: str):
    """The sweep's rows, with a progress line on stderr about every tenth of the way."""
    from engine.sensitivity import SweepError, check_precisions, sqnr_proxy, sweep

    try:
        chosen = check_precisions(precisions.split(","))
    except SweepError as error:
        raise UsageError(str(error)) from None
    shown = [-1]

    def progress(p) -> None:
        if p.eta_s is not None and int(10 * p.fraction) > shown[0]:
            shown[0] = int(10 * p.fraction)
            print(f"[{p.fraction:4.0%}] sensitivity: {p.done}/{p.total} rows, {p.elapsed_s:.0f} s, "
                  f"about {p.eta_s:.0f} s left", file=sys.stderr, flush=True)

    sqnr = sqnr_proxy(model, tokenizer, precisions=chosen)
    return sweep(evaluator, chosen, direction, sqnr, progress=progress)


@command("sensitivity", "each layer alone (or all but it) at int8/int4: accuracy, CI, flips, KL, McNemar, SQNR",
         _sensitivity_setup)
def run_sensitivity(args):
    model, tokenizer, evaluator = _sweep_evaluator(args)
    result = _sweep(model, tokenizer, evaluator, args.precisions, args.direction)
    print(f"sensitivity: {len(result.rows)} rows in {result.seconds:.1f} s", file=sys.stderr)
    return [row.as_dict() for row in result.rows]


def _search_setup(parser):
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-drop", type=float, help="accuracy points the plan may lose against FP32")
    budget.add_argument("--target-bytes", type=_positive_int, help="the most accurate plan at most this size")
    budget.add_argument("--not-worse", action="store_true",
                        help="the smallest plan not significantly worse than FP32 (McNemar p >= 0.05)")
    budget.add_argument("--max-latency-ms", type=float, help="the most accurate plan at most this latency (batch 1)")
    parser.add_argument("--sweep", help="a JSON file of `sensitivity --json` rows (direction one) to reuse")
    parser.add_argument("--no-latency", action="store_true", help="do not time the front's plans")
    _sweep_data_args(parser)


def _sweep_file(path: str):
    from engine.sensitivity import Row

    try:
        with open(path, encoding="utf-8") as handle:
            return [Row.from_dict(item) for item in json.load(handle)]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UsageError(f"cannot read sweep rows from {path}: {error}") from None


@command("search", "the smallest verified plan for an accuracy budget (or the best for a size), and the Pareto front",
         _search_setup)
def run_search(args):
    from engine.search import Budget, SearchError, search

    try:
        budget = (Budget("max_drop", args.max_drop) if args.max_drop is not None
                  else Budget("target_bytes", args.target_bytes) if args.target_bytes is not None
                  else Budget("latency_ms", args.max_latency_ms) if args.max_latency_ms is not None
                  else Budget("not_worse"))
        model, tokenizer, evaluator = _sweep_evaluator(args)
        rows = _sweep_file(args.sweep) if args.sweep else \
            _sweep(model, tokenizer, evaluator, "int8,int4", "one").rows
        result = search(evaluator, model, tokenizer, rows, budget, latency=not args.no_latency,
                        progress=lambda text, n: print(f"search: {text}", file=sys.stderr, flush=True))
    except SearchError as error:
        raise UsageError(str(error)) from None
    return result.as_dict()


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
    from engine.perturb import PerturbError
    from engine.plan import PlanError
    from engine.robustness import RobustnessError

    expected = (PlanError, DataError, EvalError, ModelError, UnsupportedModel, UsageError, PerturbError,
                RobustnessError)
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
