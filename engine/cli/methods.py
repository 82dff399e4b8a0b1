"""`compare --methods` and `compare --calib-curve`: quantization methods side by side, and W8A8-static accuracy
by calibration size; and the parsing of method lists the sweep commands share."""
from __future__ import annotations

import argparse

from engine.cli.common import UsageError, for_target, positive_int, progress_printer

ALL = "all"


def method_args(parser) -> None:
    parser.add_argument("--methods", nargs="?", const=ALL, default=None, metavar="LIST",
                        help="compare weight methods instead of --plans: INT4 by each method (comma-separated among "
                             "rtn, gptq, awq, hqq; default all) at each --groups size, and W8A8-static by each "
                             "calibrator; McNemar against RTN (minmax) of the same setting and against FP32")
    parser.add_argument("--groups", default="per-channel,128,32",
                        help="INT4 group sizes for --methods: comma-separated integers or per-channel")
    parser.add_argument("--calib-curve", default=None, metavar="CALIBRATOR",
                        help="W8A8-static accuracy per calibration size with this calibrator (minmax, percentile, "
                             "entropy, mse)")
    parser.add_argument("--calib-sizes", default="16,32,64,128,256,512",
                        help="calibration sizes (texts) for --calib-curve, comma-separated")


def chosen_methods(text: str | None):
    """The weight methods of a comma-separated list ('all': every one; none given: RTN), as vocabulary members."""
    from engine.analysis.sensitivity import check_methods
    from engine.core.vocabulary import WeightMethod

    if text is None:
        return (WeightMethod.RTN,)
    if text.strip() == ALL:
        return tuple(WeightMethod)
    return check_methods(text.split(","))


def _sizes(flag: str, text: str, per_channel: bool = False) -> list[int | None]:
    """Positive integers of a comma-separated list (and None for 'per-channel' where `per_channel`)."""
    out: list[int | None] = []
    for item in (item.strip() for item in text.split(",") if item.strip()):
        if per_channel and item == "per-channel":
            out.append(None)
            continue
        try:
            out.append(positive_int(item))
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{flag}: {error}" + (" (or per-channel)" if per_channel else "")) from None
    if not out:
        raise UsageError(f"{flag}: no size given")
    return out


def _calibrator(text: str):
    from engine.core.vocabulary import Calibrator, names

    if text not in names(Calibrator):
        raise UsageError(f"--calib-curve: calibrator {text!r}: choose among {', '.join(names(Calibrator))}")
    return Calibrator(text)


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table(report) -> str:
    """The report as a fixed-width table, one row a setting."""
    head = ("setting", "accuracy", "95% CI", "agree", "flips", "p vs ref", "p vs fp32", "prep s")
    lines = [(row.label, f"{row.accuracy:.2%}", f"{row.ci95[0]:.1%}-{row.ci95[1]:.1%}", f"{row.agreement:.1%}",
              str(row.flips), _p(row.mcnemar_p_versus), _p(row.mcnemar_p_fp32), f"{row.prepare_s:.1f}")
             for row in report.rows]
    widths = [max(len(cells[i]) for cells in [head, *lines]) for i in range(len(head))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)) for cells in [head, *lines]]
    return "\n".join([f"{report.data}: {report.n} examples, FP32 {report.fp32_accuracy:.2%}", *text])


def curve_table(points) -> str:
    return "\n".join(f"{p.calibrator.value} on {p.texts} texts: {p.accuracy:.2%} "
                     f"({p.ci95[0]:.1%}-{p.ci95[1]:.1%}), agreement {p.agreement:.1%}" for p in points)


def run(args, model, tokenizer, data, runtime: str):
    """Run what --methods and --calib-curve ask on `data`, on `runtime`'s numerics."""
    from dataclasses import replace

    from engine.analysis.methods import calibration_curve, compare_methods, method_plans
    from engine.evaluation.evaluate import get_evaluator

    groups = _sizes("--groups", args.groups, per_channel=True)
    methods = chosen_methods(args.methods) if args.methods is not None else None
    calibrator = _calibrator(args.calib_curve) if args.calib_curve is not None else None
    sizes = _sizes("--calib-sizes", args.calib_sizes) if calibrator else []
    evaluator = get_evaluator(model, tokenizer, data, args.device)
    show = progress_printer()
    out_json: dict = {}
    out_text: list[str] = []
    if methods is not None:
        plans = [replace(item, plan=for_target(args, item.plan.on(runtime)))
                 for item in method_plans(evaluator.layers, groups, methods)]
        report = compare_methods(evaluator, plans, show)
        out_json, out_text = report.to_json(), [table(report)]
    if calibrator is not None:
        points = calibration_curve(evaluator, calibrator, sizes, show)
        if methods is None:
            return [p.to_json() for p in points] if args.json else curve_table(points)
        out_json["calibration_curve"] = [p.to_json() for p in points]
        out_text.append(curve_table(points))
    return out_json if args.json else "\n\n".join(out_text)
