"""Torch FP32 against ONNX Runtime FP32, INT8 and INT4 on the embedded model, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/onnx_runtime.py [--threads 2] [--protocol both] [--simulate] [--json out.json]

Latency: batch 1 and 32 at 32 tokens, median after warm-up with p95, per protocol ("back_to_back": each
variant runs all its calls in a row with ORT's spinning threads, as a server does; "interleaved": one call
of each variant in turn, spinning off). Ratios only between figures of the same protocol and run.
Accuracy on the full embedded test set (1,056 sentences) with its 95% Wilson interval, agreement with
torch FP32 on the same length-sorted batches of 32, file sizes; --simulate adds the agreement of the
simulated ORT numerics (engine.runtime.ort_numerics) with each exported model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data import load_dataset
from engine.measure import serialized_bytes
from engine.models import load_model, positive_index
from engine.plan import Plan
from engine.quantize import apply_plan
from engine.runtime import onnx_graph
from engine.runtime.onnx_card import cpu_name
from engine.runtime.onnx_export import export_onnx
from engine.runtime.onnx_session import OrtClassifier, benchmark, length_sorted_batches, run_batches, torch_forward
from engine.runtime.ort_numerics import simulate_plan

PLANS = {"ort_fp32": "fp32", "ort_int8": "int8", "ort_int4": {"*": "int4", "options": {"group_size": 32}}}
MIXED = {"*": "int8", "bert.embeddings.word_embeddings": "fp32", "*.layer.5.*": "int4", "classifier": "fp32",
         "options": {"group_size": 32}}
GOALS = {"int8_speedup_bs1": 3.0, "int8_size_ratio": 0.26, "int4_size_ratio": 0.20}


def wilson(correct: int, n: int) -> list[float]:
    ci = binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--protocol", choices=("both", "back_to_back", "interleaved"), default="both")
    parser.add_argument("--seconds", type=float, default=2.0, help="least timed seconds per variant and batch")
    parser.add_argument("--simulate", action="store_true", help="also the simulated ORT numerics' agreement")
    parser.add_argument("--latency-only", action="store_true", help="skip accuracy, agreement and simulation")
    parser.add_argument("--json", type=Path, help="write the results here as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("embedded")
    data = load_dataset("embedded")
    labels, columns = np.asarray(data.labels), [1 - positive_index(model), positive_index(model)]
    torch_fp32 = apply_plan(model, "fp32", "real")
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        folders = {}
        plans = dict(PLANS, **({"ort_mixed": MIXED} if args.simulate else {}))
        for name, plan in plans.items():
            started = time.perf_counter()
            export_onnx(model, tokenizer, plan, Path(tmp) / name, card=False)
            folders[name] = Path(tmp) / name
            print(f"exported {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        batches = length_sorted_batches(tokenizer, data.texts, 512)[:0 if args.latency_only else None]
        reference = run_batches(torch_forward(torch_fp32), batches, len(data))
        reference = np.zeros((0, 2)) if reference is None else reference[:, columns]
        rows = {"torch_fp32": {"runtime": "torch", "size_bytes": serialized_bytes(torch_fp32), "logits": reference}}
        for name, folder in folders.items():
            logits = run_batches(OrtClassifier(folder, args.threads).logits, batches, len(data))
            logits = np.zeros((0, 2)) if logits is None else logits[:, columns]
            rows[name] = {"runtime": "onnxruntime", "size_bytes": (folder / "model.onnx").stat().st_size, "logits": logits}
            if args.simulate and not args.latency_only:
                card = json.loads((folder / "card.json").read_text())
                resolved = {r["layer"]: r["precision"] for r in card["layers"]}
                simulated = simulate_plan(onnx_graph.prepared(model, tokenizer)[0], resolved,
                                          Plan.from_json(card["plan"]).group_size)
                sim = run_batches(torch_forward(simulated), batches, len(data))[:, columns]
                rows[name]["simulated_agreement"] = float((sim.argmax(1) == logits.argmax(1)).mean())
                rows[name]["simulated_differ"] = int((sim.argmax(1) != logits.argmax(1)).sum())
        for row in rows.values():
            logits = row.pop("logits")
            n = len(logits)
            correct = int((logits.argmax(1) == labels[:n]).sum())
            row.update({"accuracy": correct / max(n, 1), "ci95": wilson(correct, n) if n else [0.0, 1.0], "n": n,
                        "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()) if n else 1.0,
                        "size_ratio_to_ort_fp32": row["size_bytes"] / rows.get("ort_fp32", row)["size_bytes"]})
        timed = {"torch_fp32": torch_forward(torch_fp32), **{k: v for k, v in folders.items() if k in PLANS}}
        protocols = ("back_to_back", "interleaved") if args.protocol == "both" else (args.protocol,)
        latency = {}
        for protocol in protocols:
            for batch in (1, 32):
                latency[f"{protocol}/bs{batch}"] = benchmark(timed, tokenizer, data.texts, batch=batch, tokens=32,
                                                             protocol=protocol, threads=args.threads,
                                                             min_seconds=args.seconds)
    goals = {}
    for key, table in latency.items():
        if key.endswith("bs1"):
            torch_ms = table["torch_fp32"]["latency_ms_p50"]
            goals[f"int8_speedup_bs1[{key.split('/')[0]}]"] = torch_ms / table["ort_int8"]["latency_ms_p50"]
            goals[f"int4_speedup_bs1[{key.split('/')[0]}]"] = torch_ms / table["ort_int4"]["latency_ms_p50"]
    goals["int8_size_ratio"] = rows["ort_int8"]["size_ratio_to_ort_fp32"]
    goals["int4_size_ratio"] = rows["ort_int4"]["size_ratio_to_ort_fp32"]
    met = {k: (v >= GOALS["int8_speedup_bs1"] if k.startswith("int8_speedup") else v > 1.0 if k.startswith("int4_speedup")
               else v <= GOALS[k]) for k, v in goals.items()}
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                          "threads": args.threads, "load_average_end": list(os.getloadavg()),
                          "torch": torch.__version__}, "accuracy": rows, "latency": latency,
              "goals": goals, "goals_met": met}
    print(markdown(result))
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def markdown(result: dict) -> str:
    machine = result["machine"]
    rows = result["accuracy"]
    measured = rows["torch_fp32"]["n"] > 0
    simulated = "simulated_agreement" in rows["ort_int8"]
    lines = [(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, "
              f"load average at the end {[round(x, 2) for x in machine['load_average_end']]}"), "",
             "| variant | size MB (vs ORT FP32) |" + (" accuracy (95% CI) | agreement with torch FP32 |" if measured else "")
             + (" simulated ORT agreement |" if simulated else ""),
             "|---|---|" + ("---|---|" if measured else "") + ("---|" if simulated else "")]
    for name, row in rows.items():
        line = f"| {name} | {row['size_bytes'] / 1e6:.1f} ({100 * row['size_ratio_to_ort_fp32']:.1f}%) |"
        if measured:
            line += (f" {100 * row['accuracy']:.2f}% ({100 * row['ci95'][0]:.1f}-{100 * row['ci95'][1]:.1f}) |"
                     f" {100 * row['agreement']:.2f}% |")
        if simulated:
            line += (f" {100 * row['simulated_agreement']:.2f}% ({row['simulated_differ']} differ) |"
                     if "simulated_agreement" in row else " |")
        lines.append(line)
    lines += ["", "| protocol / batch | " + " | ".join(next(iter(result["latency"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(result["latency"].values())))]
    for key, table in result["latency"].items():
        lines.append(f"| {key} (32 tokens) | " + " | ".join(
            f"{r['latency_ms_p50']:.1f} ms (p95 {r['latency_ms_p95']:.1f})" for r in table.values()) + " |")
    lines += ["", "Goals: " + ", ".join(f"{k} = {v:.3f} ({'met' if result['goals_met'][k] else 'NOT met'})"
                                         for k, v in result["goals"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
