"""The README's methods table: what each quantization method and calibrator does to the embedded model, and
whether what the layer map simulates is what is deployed.

    HF_HUB_OFFLINE=1 python benchmarks/methods.py [--model embedded] [--data embedded] [--limit N]
        [--groups pc,128,32] [--curve minmax,entropy] [--agreement] [--json out.json]

1. `compare_methods` (engine.analysis.methods, what `python -m engine compare --methods` runs): INT4 on every
   Linear by RTN, HQQ, AWQ and GPTQ at each group size, and W8A8-static per calibrator, each with its accuracy
   and Wilson interval, agreement with FP32, exact McNemar against FP32 and against the same setting's RTN
   (minmax), and the time its preparation took.
2. The calibration-size curve (16 to 512 texts) for each calibrator in `--curve`.
3. With `--agreement`: for GPTQ, AWQ and HQQ INT4 (group 32 and 128) and every calibrator, the simulated plan
   against what is deployed: the exported ONNX Runtime graph against the layer map's ORT simulation, and
   torch's real kernels against torch's simulation, on the same batches (goal: >= 99.5% each).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import load_dataset, load_model  # noqa: E402
from engine.analysis.deploy import Exports  # noqa: E402
from engine.analysis.methods import calibration_curve, compare_methods, int4_plan, method_plans, static_plan  # noqa: E402
from engine.core.cpu import features_line, this_cpu  # noqa: E402
from engine.core.vocabulary import Calibrator, Kernels, Runtime, WeightMethod  # noqa: E402
from engine.evaluation.deployed import evaluate_exported  # noqa: E402
from engine.evaluation.evaluate import get_evaluator  # noqa: E402
from engine.runtime.onnx_card import cpu_name  # noqa: E402


def _ci(accuracy: float, ci95) -> str:
    return f"{accuracy:.2%} [{ci95[0]:.1%}, {ci95[1]:.1%}]"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def _agreement(evaluator, exports, model, tokenizer, data) -> list[dict]:
    settings = [(f"int4 {m.value} g{g}", int4_plan(evaluator.layers, m, g))
                for m in (WeightMethod.GPTQ, WeightMethod.AWQ, WeightMethod.HQQ) for g in (32, 128)]
    settings += [(f"w8a8 static {c.value}", static_plan(evaluator.layers, c)) for c in Calibrator]
    rows = []
    for label, plan in settings:
        started = time.perf_counter()
        ort_plan = plan.on(Runtime.ONNXRUNTIME)
        simulated_ort, _ = evaluator.run(ort_plan)
        exported = evaluate_exported(evaluator, exports.folder(model, tokenizer, ort_plan, data))
        simulated_torch, _ = evaluator.run(plan)
        real_torch, _ = evaluator.run(plan, Kernels.REAL)
        row = {"setting": label, "n": len(data),
               "ort_agreement": float(np.mean(simulated_ort.predictions == exported.predictions)),
               "ort_differing": int(np.sum(simulated_ort.predictions != exported.predictions)),
               "torch_agreement": float(np.mean(simulated_torch.predictions == real_torch.predictions)),
               "torch_differing": int(np.sum(simulated_torch.predictions != real_torch.predictions)),
               "exported_accuracy": exported.comparison.accuracy, "exported_ci95": list(exported.comparison.ci95),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(f"agreement {json.dumps(row)}", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--groups", default="pc,128,32", help="comma-separated INT4 group sizes; pc = per channel")
    parser.add_argument("--curve", default="minmax,entropy", help="calibrators whose calibration-size curve to draw")
    parser.add_argument("--agreement", action="store_true", help="also export and compare simulated with deployed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    data = load_dataset(args.data).head(args.limit)
    evaluator = get_evaluator(model, tokenizer, data)
    groups = [None if g.strip() == "pc" else int(g) for g in args.groups.split(",") if g.strip()]
    machine = {"cpu": cpu_name(), "target": this_cpu().value, "features": features_line(),
               "threads": torch.get_num_threads()}
    print(f"{machine}", file=sys.stderr)
    report = compare_methods(evaluator, method_plans(evaluator.layers, groups),
                             progress=lambda f, what: print(f"{f:.0%} {what}", file=sys.stderr))
    print(f"FP32 {report.fp32_accuracy:.2%} on {report.n:,} sentences of {report.data}\n")
    print("| setting | accuracy [95% CI] | agreement with FP32 | McNemar p vs FP32 | vs | McNemar p vs it | "
          "prepare (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in report.rows:
        print(f"| {row.label} | {_ci(row.accuracy, row.ci95)} | {row.agreement:.2%} | {_p(row.mcnemar_p_fp32)} | "
              f"{row.versus or '-'} | {_p(row.mcnemar_p_versus)} | {row.prepare_s:.1f} |")
    curves = {}
    for name in [c.strip() for c in args.curve.split(",") if c.strip()]:
        points = calibration_curve(evaluator, Calibrator(name))
        curves[name] = [point.to_json() for point in points]
        print(f"\ncalibration curve, W8A8 static {name}: " + "; ".join(
            f"{p.texts}: {_ci(p.accuracy, p.ci95)}" for p in points))
    agreement = []
    if args.agreement:
        with tempfile.TemporaryDirectory(prefix="methods-") as scratch:
            agreement = _agreement(evaluator, Exports(scratch), model, tokenizer, data)
        print("\n| setting | exported ORT vs simulated | torch real kernels vs simulated | exported accuracy |")
        print("|---|---|---|---|")
        for r in agreement:
            print(f"| {r['setting']} | {r['ort_agreement']:.2%} ({r['ort_differing']} of {r['n']:,}) | "
                  f"{r['torch_agreement']:.2%} ({r['torch_differing']} of {r['n']:,}) | "
                  f"{_ci(r['exported_accuracy'], r['exported_ci95'])} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "report": report.to_json(), "curves": curves,
                                         "agreement": agreement}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
