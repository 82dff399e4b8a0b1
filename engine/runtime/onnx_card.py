"""The model card of an export: what was measured on this machine, and how to load the folder."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

from engine.data import EvalSet, load_dataset
from engine.measure import compare
from engine.models import positive_index
from engine.runtime.onnx_session import OrtClassifier, benchmark, length_sorted_batches, run_batches, torch_forward


def measure(folder: Path, reference: torch.nn.Module, data: str | EvalSet = "embedded", limit: int | None = None,
            latency: bool = True, threads: int | None = None) -> dict:
    """The exported model against the FP32 torch `reference` on the same length-sorted batches:
    accuracy with its Wilson interval (binary models), agreement, flips, KL; latency at batch 1, 32 tokens."""
    dataset = (load_dataset(data) if isinstance(data, str) else data).head(limit)
    classifier = OrtClassifier(folder, threads)
    batches = length_sorted_batches(classifier.tokenizer, dataset.texts, classifier.max_length)
    logits = run_batches(classifier.logits, batches, len(dataset))
    fp32 = run_batches(torch_forward(reference), batches, len(dataset))
    info: dict = {"data": dataset.name, "n": len(dataset)}
    if logits.shape[1] == 2:  # the evaluation sets are binary sentiment: columns (negative, positive)
        positive = positive_index(reference)
        columns = [1 - positive, positive]
        labels = np.asarray(dataset.labels)
        info.update(compare(logits[:, columns], labels, fp32[:, columns]).as_dict())
        baseline = compare(fp32[:, columns], labels, fp32[:, columns])
        info["fp32_accuracy"], info["fp32_ci95"] = baseline.accuracy, list(baseline.ci95)
    else:
        same = logits.argmax(-1) == fp32.argmax(-1)
        info.update({"agreement": float(same.mean()), "flips": int((~same).sum())})
    if latency:
        timing = benchmark({"onnx": folder}, classifier.tokenizer, dataset.texts, batch=1, tokens=32,
                           protocol="back_to_back", threads=threads)["onnx"]
        info["latency"] = {k: timing[k] for k in ("latency_ms_p50", "latency_ms_p95", "threads", "batch", "tokens",
                                                  "protocol", "load_average")}
    return info


def versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "python": platform.python_version()}


def cpu_name() -> str:
    """The processor's model name where Linux says it, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(card: dict) -> str:
    """README.md of the folder, from the card's JSON."""
    lines = [f"# {card['model']}: ONNX export of plan `{card['plan_label']}`", "",
             f"Exported {card['date']} by the quantization lens engine ({', '.join(f'{k} {v}' for k, v in card['versions'].items())}).",
             "", "```python", "import onnxruntime as ort", "from transformers import AutoTokenizer",
             "session = ort.InferenceSession(\"model.onnx\")", "tokenizer = AutoTokenizer.from_pretrained(\".\")",
             "enc = tokenizer([\"a fine film\"], return_tensors=\"np\")",
             "logits = session.run(None, {\"input_ids\": enc[\"input_ids\"], \"attention_mask\": enc[\"attention_mask\"]})[0]",
             "```", "", ("Inputs `input_ids`, `attention_mask` (int64, batch x tokens); output `logits` (batch x classes). "
                         "int8 activation scales are per tensor over the whole batch, so a prediction can depend on "
                         "its batch-mates."),
             "", "## Plan", "", "```json", json.dumps(card["plan"], indent=1), "```", "",
             "| layer | precision | in model.onnx |", "|---|---|---|"]
    lines += [f"| `{row['layer']}` | {row['precision']} | {row['onnx']} |" for row in card["layers"]]
    size = card["size_bytes"]
    lines += ["", "## Measured on this machine", "",
              (f"- size: model.onnx {size / 1e6:.1f} MB, {_pct(size / card['fp32_size_bytes'])} of the FP32 export "
               f"({card['fp32_size_bytes'] / 1e6:.1f} MB)")]
    measured = card.get("measured")
    if not measured:
        lines.append("- accuracy and latency: not measured at export (`card=False`)")
    else:
        if "accuracy" in measured:
            low, high = measured["ci95"]
            lines.append(f"- accuracy on `{measured['data']}` (n={measured['n']}): {_pct(measured['accuracy'])} "
                         f"(95% Wilson CI {_pct(low)} to {_pct(high)}); FP32 torch {_pct(measured['fp32_accuracy'])}")
        lines.append(f"- agreement with FP32 torch on the same batches: {_pct(measured['agreement'])} "
                     f"({measured['flips']} flips)" + (f", mean KL {measured['kl']:.2e}, exact McNemar p = "
                                                       f"{measured['mcnemar_p']:.3g}" if "kl" in measured else ""))
        if "latency" in measured:
            t = measured["latency"]
            lines.append(f"- latency: p50 {t['latency_ms_p50']:.2f} ms, p95 {t['latency_ms_p95']:.2f} ms at batch "
                         f"{t['batch']}, {t['tokens']} tokens, {t['threads']} ORT threads, protocol {t['protocol']} "
                         f"(spinning on), 1-minute load average {t['load_average']['before'][0]} before and "
                         f"{t['load_average']['after'][0]} after")
    lines += [f"- machine: {card['machine']}", ""]
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"], ""]
    return "\n".join(lines)


def build(model_name: str, plan_json: dict, plan_label: str, rows: list[dict], size: int, fp32_size: int,
          measured: dict | None, notes: str | None = None) -> dict:
    card = {"model": model_name, "plan": plan_json, "plan_label": plan_label, "layers": rows, "size_bytes": size,
            "fp32_size_bytes": fp32_size, "measured": measured,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions(), "machine": f"{cpu_name()}, {os.cpu_count()} cores"}
    if notes:
        card["notes"] = notes
    return card
