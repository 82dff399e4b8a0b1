"""`smoothquant`: W8A8 with SmoothQuant at each alpha, against W8A8 without it and FP32."""
from __future__ import annotations

import argparse

from engine.cli.common import data_args, device_arg, evaluation_set, load, model_arg, positive_int, progress_printer
from engine.core.vocabulary import ActScheme

# --act's words (the contract's `--act static|dynamic`): "dynamic" is SmoothQuant's per-token setting
ACTS = {"static": ActScheme.STATIC, "dynamic": ActScheme.TOKEN, "tensor": ActScheme.DYNAMIC}


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


def setup(_name: str, parser) -> None:
    parser.add_argument("--alpha", type=_alphas, default=[0.5],
                        help="an alpha in [0, 1], 'auto' (per-layer alpha minimizing each layer's W8A8 error on "
                             "calibration data), or a comma-separated list, e.g. 0,0.25,0.5,auto")
    parser.add_argument("--act", choices=tuple(ACTS), default="static",
                        help="W8A8 activation scales: static = per-tensor, calibrated; dynamic = per-token at run "
                             "time (SmoothQuant's dynamic setting); tensor = per-tensor dynamic (torch's CPU kernel)")
    parser.add_argument("--calib", type=positive_int, default=128,
                        help="calibration sentences, from the set's calibration rows (never its evaluated rows)")
    model_arg(parser)
    data_args(parser)
    device_arg(parser)


def run(_name: str, args):
    from engine.analysis.smoothquant import alpha_rows
    from engine.evaluation.evaluate import get_evaluator

    data = evaluation_set(args)
    model, tokenizer = load(args)
    evaluator = get_evaluator(model, tokenizer, data, args.device)
    return alpha_rows(evaluator, args.alpha, ACTS[args.act], args.calib, progress=progress_printer("smoothquant: "))
