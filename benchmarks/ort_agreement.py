"""How closely the layer map's simulated ONNX Runtime numerics predict the exported model itself.

    HF_HUB_OFFLINE=1 python benchmarks/ort_agreement.py [--model embedded] [--data embedded] [--json out.json]

For uniform INT8, uniform INT4 (group 32) and a mixed plan, on the whole set: the simulated plan on ORT's
numerics (`eval --runtime onnxruntime --kernels simulated`, the layer map's figure) against the exported graph
run by ONNX Runtime (`eval --runtime onnxruntime`), on the same fixed batches: both accuracies with their
intervals and the share of sentences on which the two predict the same class (issue 14's goal: >= 99.5%).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import load_dataset, load_model  # noqa: E402
from engine.analysis.deploy import Exports  # noqa: E402
from engine.core.plan import Plan  # noqa: E402
from engine.evaluation.deployed import evaluate_exported  # noqa: E402
from engine.evaluation.evaluate import get_evaluator  # noqa: E402
from engine.model.inventory import inventory  # noqa: E402


def plans(model) -> dict[str, Plan]:
    """INT8, INT4 and a mix: INT8 everywhere, every third Linear INT4, the last one (the head) FP32."""
    linears = [layer.name for layer in inventory(model) if layer.kind != "embedding"]
    mixed = [("*", "int8")] + [(name, "int4") for name in linears[::3]] + [(linears[-1], "fp32")]
    return {"int8": Plan.uniform("int8"), "int4": Plan.uniform("int4", group_size=32),
            "mixed": Plan(rules=tuple(mixed), group_size=32)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    data = load_dataset(args.data)
    evaluator = get_evaluator(model, tokenizer, data)
    with tempfile.TemporaryDirectory(prefix="ort-agreement-") as scratch:
        exports = Exports(scratch)
        rows = []
        for name, plan in plans(model).items():
            simulated, _ = evaluator.run(plan.on("onnxruntime"))
            exported = evaluate_exported(evaluator, exports.folder(model, tokenizer, plan, data))
            agreement = float(np.mean(simulated.predictions == exported.predictions))
            rows.append({"plan": name, "n": len(data), "agreement": agreement,
                         "differing": int(np.sum(simulated.predictions != exported.predictions)),
                         **{f"{what}_accuracy": result.comparison.accuracy for what, result in
                            (("simulated", simulated), ("exported", exported))},
                         **{f"{what}_ci95": list(result.comparison.ci95) for what, result in
                            (("simulated", simulated), ("exported", exported))}})
    print("| plan | simulated ORT accuracy | exported ORT accuracy | agreement (sentences differing) |")
    print("|---|---|---|---|")
    for r in rows:
        figures = [f"{r[f'{w}_accuracy']:.2%} [{r[f'{w}_ci95'][0]:.1%}, {r[f'{w}_ci95'][1]:.1%}]"
                   for w in ("simulated", "exported")]
        print(f"| {r['plan']} | {figures[0]} | {figures[1]} | {r['agreement']:.2%} ({r['differing']} of {r['n']:,}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
