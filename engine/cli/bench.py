"""`bench`: a plan's latency on real kernels, or `bench toggle`: the layer map's incremental update."""
from __future__ import annotations

from engine.cli.common import (UsageError, device_arg, load, model_arg, plan_arg, positive_int, resolved_plan,
                               runtime_arg)
from engine.core.vocabulary import TIMING_TOKENS, Runtime


def setup(_name: str, parser) -> None:
    parser.add_argument("what", nargs="?", default="model", choices=("model", "toggle"),
                        help="model: latency of a plan; toggle: the layer map's incremental update")
    model_arg(parser)
    plan_arg(parser)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--tokens", type=positive_int, default=TIMING_TOKENS,
                        help="sequence length of the timed inputs")
    parser.add_argument("--data", default="embedded",
                        help="toggle: the set evaluated; model: the set whose calibration rows a calibrated plan uses")
    device_arg(parser)
    runtime_arg(parser)
    parser.add_argument("--profile", action="store_true",
                        help="add the time per op group of the plan and of torch FP32 at batch 1 and 32, and what "
                             "this CPU's instruction sets mean for int8 and int4")


def run(_name: str, args):
    from engine.data.sets import load_dataset

    model, tokenizer = load(args)
    if args.what == "toggle":
        from engine.analysis.toggle import bench_toggle

        return bench_toggle(model, tokenizer, args.data, device=args.device)
    from engine.analysis.benchmark import bench, bench_exported, profile_against_fp32

    plan, data = resolved_plan(args, model), load_dataset(args.data)
    if args.runtime == Runtime.TORCH:
        out = bench(model, tokenizer, plan, args.batch, args.tokens, args.device, data=data)
        folder = None
    elif args.runtime != Runtime.ONNXRUNTIME or args.device != "cpu":
        raise UsageError("runtime must be torch, or onnxruntime (on the CPU)")
    else:
        from cache import results

        folder = results.exports().folder(model, tokenizer, plan, data)
        out = bench_exported(folder, tokenizer, args.batch, args.tokens)
    if args.profile:
        out["profile"] = profile_against_fp32(model, tokenizer, plan, args.tokens, args.device, data, folder).to_json()
    return out
