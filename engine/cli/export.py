"""`export`: a plan as a folder ONNX Runtime can serve, with its model card measured on this machine."""
from __future__ import annotations

from engine.cli.common import (UsageError, data_args, evaluation_set, for_target, load, model_arg, plan_arg,
                               progress_printer)


def setup(_name: str, parser) -> None:
    plan_arg(parser)
    parser.add_argument("--format", default="onnx", help="onnx (the one format so far)")
    parser.add_argument("--out", required=True, help="a new folder to write (it must not exist yet)")
    model_arg(parser)
    data_args(parser)
    parser.add_argument("--no-card", action="store_true", help="write the card without measuring accuracy and latency")


def run(_name: str, args):
    from engine.analysis.deploy import deploy
    from engine.core.plan import parse_plan

    if args.format != "onnx":
        raise UsageError(f"format {args.format!r}: only onnx is supported")
    plan = for_target(args, parse_plan(args.plan))
    data = evaluation_set(args)
    model, tokenizer = load(args)
    show = progress_printer("export: ")
    out = deploy(model, tokenizer, plan, args.out, data=data, measure=not args.no_card,
                 progress=lambda text, fraction: show(fraction, text))
    return {key: out[key] for key in ("out", "format", "size_bytes", "plan", "fp32_size_bytes", "measured")}
