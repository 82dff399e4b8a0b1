"""`diagnose`: where a plan's error enters the model and how it travels, one row per op."""
from __future__ import annotations

from engine.cli.common import UsageError, load, model_arg, plan_arg, positive_int, progress_printer, resolved_plan
from engine.core.vocabulary import Runtime, names


def setup(_name: str, parser) -> None:
    model_arg(parser)
    plan_arg(parser, default="int8")
    parser.add_argument("--runtime", default=None, choices=names(Runtime),
                        help="whose int8 and int4 numerics the plan's layers follow, simulated exactly (default: the "
                             "plan's own runtime option, else torch)")
    parser.add_argument("--data", default="embedded", help="the set whose sentences are sampled (and calibrate)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="sentences in the seeded sample (default 128, or the whole set when smaller)")
    parser.add_argument("--exported", action="store_true",
                        help="with --runtime onnxruntime: also measure each layer's accumulated SQNR on the exported "
                             "graph itself (exported_accumulated_sqnr_db), beside the engine's figure")


def run(_name: str, args):
    from cache import results
    from engine.analysis.diagnose import DEFAULT_SAMPLE
    from engine.data.sets import load_dataset

    data = load_dataset(args.data)
    model, tokenizer = load(args)
    plan = resolved_plan(args, model)
    plan = plan.on(args.runtime) if args.runtime else plan
    if args.exported and plan.runtime != Runtime.ONNXRUNTIME:
        raise UsageError("--exported measures the ONNX Runtime export: add --runtime onnxruntime")
    show = progress_printer("diagnose: ")
    size = args.limit or DEFAULT_SAMPLE
    rows = results.diagnosis(model, tokenizer, data, plan, size,
                             progress=lambda fraction: show(fraction, "comparing every op with FP32")).rows
    if not args.exported:
        return [row.to_json() for row in rows]
    show(1.0, "exporting the plan and running its graph")
    measured = results.exported_diagnosis(model, tokenizer, data, plan, size)
    return [{**row.to_json(), "exported_accumulated_sqnr_db": measured.get(row.op)} if row.kind in
            ("linear", "embedding") else row.to_json() for row in rows]
