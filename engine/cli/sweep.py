"""`sensitivity` and `search`: per-layer sweeps, memoized in the same cache rows as the pages', and the
search for the smallest verified plan. With --methods a sweep also measures each Linear by other weight methods
(GPTQ, AWQ, HQQ), and the search may give a layer one of them."""
from __future__ import annotations

import json
import sys

from engine.cli.common import UsageError, data_args, device_arg, evaluation_set, load, model_arg, positive_int
from engine.core.vocabulary import BudgetKind, WeightMethod, names


def setup(name: str, parser) -> None:
    parser.add_argument("--methods", default=None,
                        help=f"weight methods to sweep, comma-separated among {', '.join(names(WeightMethod))} "
                             f"({WeightMethod.RTN} always; a method only where it takes the precision, and on Linears)")
    if name == "sensitivity":
        parser.add_argument("--precisions", default="int8,int4", help="comma-separated, among int8,int4")
        parser.add_argument("--direction", choices=("one", "all-but-one"), default="one",
                            help="one: only that layer quantized; all-but-one: every layer but that one")
    else:
        budget = parser.add_mutually_exclusive_group(required=True)
        budget.add_argument("--max-drop", type=float, help="accuracy points the plan may lose against FP32")
        budget.add_argument("--target-bytes", type=positive_int, help="the most accurate plan at most this size")
        budget.add_argument("--not-worse", action="store_true",
                            help="the smallest plan not significantly worse than FP32 (McNemar p >= 0.05)")
        budget.add_argument("--max-latency-ms", type=float,
                            help="the most accurate plan at most this latency (batch 1)")
        parser.add_argument("--sweep", help="a JSON file of `sensitivity --json` rows (direction one) to reuse")
        parser.add_argument("--no-latency", action="store_true", help="do not time the front's plans")
    model_arg(parser)
    data_args(parser)
    device_arg(parser)


def _rows(model, tokenizer, evaluator, precisions: str, direction: str, methods: str | None = None):
    """The sweep's rows (every method's memoized one by one, shared with the pages), with a progress line on
    stderr about every tenth of the way."""
    from cache import results
    from engine.analysis.sensitivity import check_precisions
    from engine.cli.methods import chosen_methods

    chosen = check_precisions(precisions.split(","))
    others = tuple(m for m in chosen_methods(methods) if m != WeightMethod.RTN)
    shown = [-1]

    def progress(p) -> None:
        if p.eta_s is not None and int(10 * p.fraction) > shown[0]:
            shown[0] = int(10 * p.fraction)
            print(f"[{p.fraction:4.0%}] sensitivity: {p.done}/{p.total} rows, {p.elapsed_s:.0f} s, "
                  f"about {p.eta_s:.0f} s left", file=sys.stderr, flush=True)

    sqnr = results.sqnr_proxy(model, tokenizer, evaluator, chosen)
    return results.sweep(evaluator, chosen, direction, sqnr, progress=progress, methods=(WeightMethod.RTN, *others))


def _sweep_file(path: str):
    from engine.analysis.sensitivity import Row

    try:
        with open(path, encoding="utf-8") as handle:
            return [Row.from_json(item) for item in json.load(handle)]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UsageError(f"cannot read sweep rows from {path}: {error}") from None


def run(name: str, args):
    from engine.cli.methods import chosen_methods
    from engine.evaluation.evaluate import get_evaluator

    methods = chosen_methods(args.methods)  # before loading anything: a bad method is reported at once
    if name == "sensitivity" and args.direction != "one" and set(methods) - {WeightMethod.RTN}:
        raise UsageError("--methods other than rtn sweep one layer at a time: use --direction one")
    data = evaluation_set(args)
    model, tokenizer = load(args)
    evaluator = get_evaluator(model, tokenizer, data, args.device, keep_states=True)
    if name == "sensitivity":
        result = _rows(model, tokenizer, evaluator, args.precisions, args.direction, args.methods)
        print(f"sensitivity: {len(result.rows)} rows ({result.computed} computed) in {result.seconds:.1f} s",
              file=sys.stderr)
        return [row.to_json() for row in result.rows]
    from engine.analysis.search import Budget, search

    budget = (Budget(BudgetKind.MAX_DROP, args.max_drop) if args.max_drop is not None
              else Budget(BudgetKind.TARGET_BYTES, args.target_bytes) if args.target_bytes is not None
              else Budget(BudgetKind.LATENCY_MS, args.max_latency_ms) if args.max_latency_ms is not None
              else Budget(BudgetKind.NOT_WORSE))
    rows = _sweep_file(args.sweep) if args.sweep else _rows(model, tokenizer, evaluator, "int8,int4", "one",
                                                             args.methods).rows
    result = search(evaluator, model, tokenizer, rows, budget, latency=not args.no_latency,
                    progress=lambda text, n: print(f"search: {text}", file=sys.stderr, flush=True))
    return result.to_json()
