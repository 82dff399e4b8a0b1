"""`compare`: plans side by side on several sets (or, with --methods / --calib-curve, quantization methods and
calibration sizes side by side on one set: engine.cli.methods)."""
from __future__ import annotations

from engine.cli.common import (UsageError, device_arg, for_target, load, model_arg, positive_int, progress_printer,
                               runtime_arg, runtimes, target_cpu_arg)
from engine.core.vocabulary import Runtime


def setup(_name: str, parser) -> None:
    model_arg(parser)
    parser.add_argument("--plans", default="fp32,fp16,int8,int4",
                        help="comma-separated: presets fp32, fp16, bf16, int8, int8-linear, int4, or .json plan files")
    parser.add_argument("--data", default="embedded", help="comma-separated: embedded, amazon, tweets, nyt, sst2, .csv")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples of each set")
    device_arg(parser)
    runtime_arg(parser, several=True)
    target_cpu_arg(parser)
    from engine.cli.methods import method_args

    method_args(parser)


def run(_name: str, args):
    from engine.analysis.compare import compare_plans
    from engine.analysis.presets import resolve_plan_item, split_plan_list
    from engine.runtime.device import resolve_device

    items, sets = split_plan_list(args.plans), [d.strip() for d in args.data.split(",") if d.strip()]
    if not items or not sets:
        raise UsageError("compare needs at least one plan (--plans) and one set (--data)")
    resolve_device(args.device)  # before loading anything: a missing GPU is reported at once
    if args.methods is not None or args.calib_curve is not None:
        return _methods(args, sets)
    model, tokenizer = load(args)
    plans = [(label, for_target(args, plan)) for label, plan in (resolve_plan_item(item, model) for item in items)]
    from cache import results

    chosen = runtimes(args.runtime)
    rows = compare_plans(model, tokenizer, plans, sets, args.device, progress=progress_printer(), limit=args.limit,
                         runtimes=chosen, exports=results.exports() if Runtime.ONNXRUNTIME in chosen else None)
    return [row.to_json() for row in rows]


def _methods(args, sets: list[str]):
    from engine.cli import methods
    from engine.data.sets import load_dataset

    chosen = runtimes(args.runtime)
    if len(sets) != 1 or len(chosen) != 1:
        raise UsageError("--methods and --calib-curve compare on one set (--data) and one runtime (--runtime)")
    data = load_dataset(sets[0]).head(args.limit)
    model, tokenizer = load(args)
    return methods.run(args, model, tokenizer, data, chosen[0])
