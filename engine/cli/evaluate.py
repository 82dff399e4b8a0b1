"""`eval`, `predict` and `perturb`: one plan's figures on a set, any text's prediction, a text's typos."""
from __future__ import annotations

import sys

from engine.cli.common import (UsageError, data_args, device_arg, evaluation_set, kernels_arg, load, model_arg,
                               plan_arg, resolved_plan, runtime_arg)
from engine.core.vocabulary import Kernels, Runtime, names


def setup(name: str, parser) -> None:
    if name == "eval":
        model_arg(parser)
        data_args(parser)
        plan_arg(parser)
        kernels_arg(parser)
        device_arg(parser)
        runtime_arg(parser)
    elif name == "predict":
        model_arg(parser)
        plan_arg(parser)
        kernels_arg(parser)
        parser.add_argument("texts", nargs="+", metavar="TEXT",
                            help="texts to classify; - reads one text per line from stdin")
    else:
        parser.add_argument("--kind", required=True,
                            help="swap, delete, insert, substitute, keyboard, homoglyph or invisible")
        parser.add_argument("--rate", required=True, help="share of the eligible words to edit, 0 to 1")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--keep-ends", action="store_true",
                            help="leave the first and last letter of each word alone")
        parser.add_argument("text", metavar="TEXT", help="the text; - reads it from stdin")


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


def exported_evaluation(model, tokenizer, data, plan, device: str) -> dict:
    """The exported graph itself (exported once, kept beside the cache) on the set's fixed batches."""
    from cache import results
    from engine.evaluation.deployed import evaluate_exported
    from engine.evaluation.evaluate import get_evaluator

    if device != "cpu":
        raise UsageError("ONNX Runtime runs on its CPU provider here: use --device cpu")
    folder = results.exports().folder(model, tokenizer, plan, data)
    result = evaluate_exported(get_evaluator(model, tokenizer, data), folder)
    return {**result.to_json(), "size_bytes": (folder / "model.onnx").stat().st_size, "plan": result.plan.to_json(),
            "kernels": Kernels.REAL, "runtime": Runtime.ONNXRUNTIME, "data": data.name, "device": "cpu",
            "seconds": round(result.seconds, 3), "export": str(folder)}


def run(name: str, args):
    if name == "eval":
        from engine.core.cpu import features_line
        from engine.evaluation.evaluate import summarize

        data = evaluation_set(args)
        model, tokenizer = load(args)
        plan = resolved_plan(args, model)
        if args.runtime == Runtime.TORCH:
            return summarize(model, tokenizer, data, plan, args.kernels or Kernels.SIMULATED, None,
                             args.device).to_json()
        if args.runtime != Runtime.ONNXRUNTIME:
            raise UsageError(f"runtime {args.runtime!r}: choose {' or '.join(names(Runtime))}")
        cpu = {"target_cpu": plan.cpu.value, "cpu_kernel": plan.cpu.kernel, "cpu_features": features_line()}
        if args.kernels == Kernels.SIMULATED:  # ONNX Runtime's numerics, simulated exactly: the layer map's figure
            return {**summarize(model, tokenizer, data, plan.on(Runtime.ONNXRUNTIME), Kernels.SIMULATED, None,
                                args.device).to_json(), "runtime": Runtime.ONNXRUNTIME, **cpu}
        return {**exported_evaluation(model, tokenizer, data, plan, args.device), **cpu}
    if name == "predict":
        from engine.analysis.predict import predict
        from engine.core.plan import parse_plan
        from engine.core.tokens import clean_surrogates

        parse_plan(args.plan)  # a malformed plan is reported before the model loads
        texts = []
        for text in args.texts:
            texts += _stdin_lines() if text == "-" else [clean_surrogates(text)]
        model, tokenizer = load(args)
        return predict(model, tokenizer, texts, resolved_plan(args, model), args.kernels or Kernels.SIMULATED)
    from engine.analysis.perturb import perturb
    from engine.core.tokens import clean_surrogates

    text = _stdin_text().removesuffix("\n") if args.text == "-" else clean_surrogates(args.text)
    return perturb(text, args.kind, args.rate, args.seed, args.keep_ends).to_json()
