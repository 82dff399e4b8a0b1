"""How closely the layer map's simulated ONNX Runtime numerics predict the exported model itself, on this CPU
and on an emulated AVX2 CPU without VNNI.

    HF_HUB_OFFLINE=1 python benchmarks/ort_agreement.py [--model embedded] [--data embedded]
        [--targets this,avx2] [--plans int8,int4,mixed] [--emulate] [--limit N] [--json out.json]

For uniform INT8, uniform INT4 (group 32) and a mixed plan, each exported for every target CPU (`--targets`:
`this` is this machine; engine.core.cpu), on the whole set: the simulated plan on ORT's numerics for that
target (`eval --runtime onnxruntime --kernels simulated --target-cpu T`, the layer map's figure) against the
exported graph run by ONNX Runtime here (`eval --runtime onnxruntime --target-cpu T`), on the same fixed
batches: both accuracies with their intervals and the share of sentences on which the two predict the same
class (goal: >= 99.5%). With `--emulate`, the same folder also runs on QEMU's Haswell (AVX2, no VNNI: ORT's
saturating int8 GEMM), one thread, which takes minutes per plan.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import load_dataset, load_model  # noqa: E402
from engine.analysis.deploy import Exports  # noqa: E402
from engine.core.cpu import features_line, this_cpu  # noqa: E402
from engine.core.plan import Plan  # noqa: E402
from engine.evaluation.deployed import evaluate_exported  # noqa: E402
from engine.evaluation.evaluate import get_evaluator  # noqa: E402
from engine.model.inventory import inventory  # noqa: E402
from engine.runtime.emulated_cpu import emulated_logits  # noqa: E402
from engine.runtime.onnx_card import cpu_name  # noqa: E402


def plans(model) -> dict[str, Plan]:
    """INT8, INT4 and a mix: INT8 everywhere, every third Linear INT4, the last one (the head) FP32."""
    linears = [layer.name for layer in inventory(model) if layer.kind != "embedding"]
    mixed = [("*", "int8")] + [(name, "int4") for name in linears[::3]] + [(linears[-1], "fp32")]
    return {"int8": Plan.uniform("int8"), "int4": Plan.uniform("int4", group_size=32),
            "mixed": Plan(rules=tuple(mixed), group_size=32)}


def _agreement(simulated, predictions: np.ndarray) -> dict:
    return {"agreement": float(np.mean(simulated.predictions == predictions)),
            "differing": int(np.sum(simulated.predictions != predictions))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--limit", type=int, default=None, help="the first N sentences only (emulation is slow)")
    parser.add_argument("--targets", default="this,avx2", help="comma-separated target CPUs; this = this machine")
    parser.add_argument("--plans", default="int8,int4,mixed", help="comma-separated, of int8, int4, mixed")
    parser.add_argument("--emulate", action="store_true", help="also run every export on an emulated AVX2 CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    data = load_dataset(args.data).head(args.limit)
    evaluator = get_evaluator(model, tokenizer, data)
    batches = [(b.inputs["input_ids"].numpy(), b.inputs["attention_mask"].numpy()) for b in evaluator.batches]
    targets = list(dict.fromkeys(this_cpu().value if t.strip() == "this" else t.strip()
                                 for t in args.targets.split(",") if t.strip()))
    print(f"this CPU: {cpu_name()} ({this_cpu().value}: {features_line()})", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ort-agreement-") as scratch:
        exports = Exports(scratch)
        for target in targets:
            for name, base in plans(model).items():
                if name not in args.plans.split(","):
                    continue
                plan = base.for_cpu(target)
                simulated, _ = evaluator.run(plan.on("onnxruntime"))
                folder = exports.folder(model, tokenizer, plan, data)
                exported = evaluate_exported(evaluator, folder)
                row = {"plan": name, "target_cpu": target, "n": len(data),
                       **_agreement(simulated, exported.predictions),
                       **{f"{what}_accuracy": result.comparison.accuracy for what, result in
                          (("simulated", simulated), ("exported", exported))},
                       **{f"{what}_ci95": list(result.comparison.ci95) for what, result in
                          (("simulated", simulated), ("exported", exported))}}
                if args.emulate:
                    started = time.perf_counter()
                    logits, saturates = emulated_logits(folder, batches, timeout=6 * 3600)
                    emulated = np.zeros_like(evaluator.baseline_logits)
                    for batch, values in zip(evaluator.batches, logits):
                        emulated[batch.rows] = values
                    scale = max(1.0, float(np.abs(exported.logits).max()))
                    row["emulated_avx2"] = {**_agreement(simulated, emulated.argmax(-1)), "saturates": saturates,
                                            "same_as_here": float(np.mean(emulated.argmax(-1) == exported.predictions)),
                                            "largest_logit_gap_to_here": float(np.abs(emulated - exported.logits).max())
                                            / scale, "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(f"{name} for {target}: {json.dumps(row)}", file=sys.stderr)  # kept if a later plan fails
    emulated_head = " | agreement on emulated AVX2 (QEMU Haswell)" if args.emulate else ""
    print(f"| plan | written for | simulated ORT accuracy | exported ORT accuracy | agreement here{emulated_head} |")
    print("|---|---|---|---|---" + ("|---|" if args.emulate else "|"))
    for r in rows:
        figures = [f"{r[f'{w}_accuracy']:.2%} [{r[f'{w}_ci95'][0]:.1%}, {r[f'{w}_ci95'][1]:.1%}]"
                   for w in ("simulated", "exported")]
        cells = [r["plan"], r["target_cpu"], *figures, f"{r['agreement']:.2%} ({r['differing']} of {r['n']:,})"]
        if args.emulate:
            e = r["emulated_avx2"]
            cells.append(f"{e['agreement']:.2%} ({e['differing']} of {r['n']:,})")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": cpu_name(), "target": this_cpu().value, "features": features_line(),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
