"""`diagnose`: where a plan's error enters the model and how it travels, one row per op."""
from __future__ import annotations

from engine.cli.common import load, model_arg, plan_arg, positive_int, progress_printer, resolved_plan


def setup(_name: str, parser) -> None:
    model_arg(parser)
    plan_arg(parser, default="int8")
    parser.add_argument("--runtime", default=None, choices=("torch", "onnxruntime"),
                        help="whose int8 and int4 numerics the plan's layers follow, simulated exactly (default: the "
                             "plan's own runtime option, else torch)")
    parser.add_argument("--data", default="embedded", help="the set whose sentences are sampled (and calibrate)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="sentences in the seeded sample (default 128, or the whole set when smaller)")


def run(_name: str, args):
    from cache import results
    from engine.analysis.diagnose import DEFAULT_SAMPLE
    from engine.core.data import load_dataset

    data = load_dataset(args.data)
    model, tokenizer = load(args)
    plan = resolved_plan(args, model)
    plan = plan.on(args.runtime) if args.runtime else plan
    show = progress_printer("diagnose: ")
    found = results.diagnosis(model, tokenizer, data, plan, args.limit or DEFAULT_SAMPLE,
                              progress=lambda fraction: show(fraction, "comparing every op with FP32"))
    return found["rows"]
