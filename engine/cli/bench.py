"""`bench`: a plan's latency on real kernels, or `bench toggle`: the layer map's incremental update."""
from __future__ import annotations

from engine.cli.common import (UsageError, device_arg, load, model_arg, plan_arg, positive_int, resolved_plan,
                               runtime_arg)


def setup(_name: str, parser) -> None:
    parser.add_argument("what", nargs="?", default="model", choices=("model", "toggle"),
                        help="model: latency of a plan; toggle: the layer map's incremental update")
    model_arg(parser)
    plan_arg(parser)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--tokens", type=positive_int, default=32, help="sequence length of the timed inputs")
    parser.add_argument("--data", default="embedded",
                        help="toggle: the set evaluated; model: the set whose calibration rows a calibrated plan uses")
    device_arg(parser)
    runtime_arg(parser)


def run(_name: str, args):
    from engine.core.data import load_dataset

    model, tokenizer = load(args)
    if args.what == "toggle":
        from engine.analysis.toggle import bench_toggle

        return bench_toggle(model, tokenizer, args.data, device=args.device)
    from engine.analysis.benchmark import bench, bench_exported

    plan, data = resolved_plan(args, model), load_dataset(args.data)
    if args.runtime == "torch":
        return bench(model, tokenizer, plan, args.batch, args.tokens, args.device, data=data)
    if args.runtime != "onnxruntime" or args.device != "cpu":
        raise UsageError("runtime must be torch, or onnxruntime (on the CPU)")
    from cache import results

    return bench_exported(results.exports().folder(model, tokenizer, plan, data), tokenizer, args.batch, args.tokens)
