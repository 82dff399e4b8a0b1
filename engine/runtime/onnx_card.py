"""The model card of an export: what was measured on this machine, and how to load the folder."""
from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import onnx
import onnxruntime as ort
import torch
import transformers

from engine.core.cpu import TargetCpu, features_line, this_cpu
from engine.core.stats import Figures


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


def cpu_path(target: TargetCpu, int8_layers: bool) -> dict:
    """Which CPU's int8 instructions the file's figures assume, what this machine is, and a warning where
    the two differ or where the file computes other integers on some CPUs."""
    here = this_cpu()
    warning = None
    if int8_layers and not target.saturates:
        warning = ("its int8 weights are 8-bit: on a CPU without VNNI or AMX (AVX2, AVX-512 without VNNI) ONNX "
                   "Runtime's int8 GEMM saturates pairs of products and this model computes other logits than "
                   "those measured here; export with --target-cpu avx2 to run the same everywhere")
        if here.saturates:
            warning = f"this machine ({here.value}) is such a CPU, so the figures below are not the target's: {warning}"
    return {"target_cpu": target.value, "kernel": target.kernel, "int8_weight_bits": target.int8_weight_bits,
            "measured_on": {"target_cpu": here.value, "features": features_line()}, "warning": warning}


@dataclass(frozen=True, kw_only=True)
class MeasuredOn:
    """The machine that measured the card: the CPU target it counts as, and its instruction-set features."""

    target_cpu: str
    features: str


@dataclass(frozen=True, kw_only=True)
class CpuPath:
    """`cpu_path()`'s figures: the CPU the int8 weights were written for, where they were measured, any warning."""

    target_cpu: str
    kernel: str
    int8_weight_bits: int
    measured_on: MeasuredOn
    warning: str | None

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["measured_on"] = {"target_cpu": self.measured_on.target_cpu, "features": self.measured_on.features}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CpuPath:
        values = {f.name: data[f.name] for f in fields(cls)}
        values["measured_on"] = MeasuredOn(**data["measured_on"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class CardFigures(Figures):
    """What the card measured of the exported graph on ONNX Runtime: accuracy with its interval, agreement, flips,
    KL and McNemar against FP32 torch on `data`, and (when timed) batch-1 latency and its op-group profile, kept
    as the timing's own plain figures."""

    data: str
    fp32_accuracy: float
    latency: dict[str, Any] | None = None  # latency_ms_p50, latency_ms_p95, batch, tokens, threads, protocol, ...
    profile: dict[str, Any] | None = None  # engine.runtime.profile's figures, with the CPU report

    @property
    def latency_ms_p50(self) -> float | None:
        return None if self.latency is None else self.latency["latency_ms_p50"]

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ci95"] = list(self.ci95)
        return {k: v for k, v in out.items() if v is not None or k not in ("latency", "profile")}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CardFigures:
        return cls(**{**data, "ci95": tuple(data["ci95"])})


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """An export's card as card.json holds it (`build()`'s dict); `to_json()` gives that dict back, keys in order.
    `measured` is None when nothing was measured at export."""

    model: str
    plan: dict
    plan_label: str
    layers: list[dict]  # one {"layer", "precision", "onnx", ...} per quantizable layer
    size_bytes: int
    fp32_size_bytes: int
    measured: CardFigures | None
    cpu: CpuPath
    date: str
    versions: dict[str, str]
    machine: str

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["cpu"] = self.cpu.to_json()
        out["measured"] = None if self.measured is None else self.measured.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelCard:
        """From card.json's dict; a missing field is a KeyError."""
        values = {f.name: data[f.name] for f in fields(cls)}
        values["cpu"] = CpuPath.from_json(data["cpu"])
        values["measured"] = None if data["measured"] is None else CardFigures.from_json(data["measured"])
        return cls(**values)

    @classmethod
    def read(cls, folder: str | Path) -> ModelCard:
        """The card of an export folder."""
        return cls.from_json(json.loads((Path(folder) / "card.json").read_text()))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(card: dict) -> str:
    """README.md of the folder, from the card's JSON."""
    made = ", ".join(f"{k} {v}" for k, v in card["versions"].items())
    lines = [f"# {card['model']}: ONNX export of plan `{card['plan_label']}`", "",
             f"Exported {card['date']} by the quantization lens engine ({made}).", "",
             "```python", "import onnxruntime as ort", "from transformers import AutoTokenizer",
             'session = ort.InferenceSession("model.onnx")', 'tokenizer = AutoTokenizer.from_pretrained(".")',
             'enc = tokenizer(["a fine film"], return_tensors="np")',
             'logits = session.run(None, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]',
             "```", "",
             "Inputs `input_ids`, `attention_mask` (int64, batch x tokens); output `logits` (batch x classes). int8 "
             "activation scales are per tensor over the whole batch, so a prediction can depend on its batch-mates.",
             "", "## Plan", "", "```json", json.dumps(card["plan"], indent=1), "```", "",
             "| layer | precision | in model.onnx |", "|---|---|---|"]
    lines += [f"| `{row['layer']}` | {row['precision']} | {row['onnx']} |" for row in card["layers"]]
    cpu = card["cpu"]
    lines += ["", "## CPU kernel path", "", f"- written for: {cpu['kernel']}",
              f"- measured on: {cpu['measured_on']['target_cpu']} ({cpu['measured_on']['features']})"]
    if cpu["warning"]:
        lines.append(f"- **warning**: {cpu['warning']}")
    size = card["size_bytes"]
    lines += ["", "## Measured on this machine", "",
              f"- size: model.onnx {size / 1e6:.1f} MB, {_pct(size / card['fp32_size_bytes'])} of the FP32 export "
              f"({card['fp32_size_bytes'] / 1e6:.1f} MB)"]
    measured = card.get("measured")
    if not measured:
        lines.append("- accuracy and latency: not measured at export")
    else:
        low, high = measured["ci95"]
        lines.append(f"- accuracy on `{measured['data']}` (n={measured['n']}): {_pct(measured['accuracy'])} "
                     f"(95% Wilson CI {_pct(low)} to {_pct(high)}); FP32 torch {_pct(measured['fp32_accuracy'])}")
        lines.append(f"- agreement with FP32 torch on the same batches: {_pct(measured['agreement'])} "
                     f"({measured['flips']} flips), mean KL {measured['kl']:.2e}, exact McNemar p = "
                     f"{measured['mcnemar_p']:.3g}")
        if "latency" in measured:
            t = measured["latency"]
            lines.append(f"- latency: p50 {t['latency_ms_p50']:.2f} ms, p95 {t['latency_ms_p95']:.2f} ms at batch "
                         f"{t['batch']}, {t['tokens']} tokens, {t['threads']} ORT threads, protocol {t['protocol']}, "
                         f"1-minute load average {t['load_average'][0]} before and {t['load_average'][1]} after")
    profile = (measured or {}).get("profile")
    if profile:
        groups = ", ".join(f"{group} {ms:.2f} ms" for group, ms in profile["groups"].items() if ms > 0)
        lines += ["", "## Where the time goes (batch 1, ONNX Runtime's session profiling)", "",
                  f"- {groups}: {profile['profiled_ms']:.2f} ms of the forward's {profile['wall_ms']:.2f} ms",
                  f"- Q/DQ and Cast nodes left unfused: {len(profile['unfused'])}"
                  + (f" ({', '.join(profile['unfused'][:5])}{', ...' if len(profile['unfused']) > 5 else ''})"
                     if profile["unfused"] else ""),
                  f"- CPU: {profile['cpu']['features']}"]
        lines += [f"- {line}" for line in profile["cpu"]["meaning"]]
    lines += [f"- machine: {card['machine']}", ""]
    return "\n".join(lines)


def build(model_name: str, plan_json: dict, plan_label: str, rows: list[dict], size: int, fp32_size: int,
          measured: dict | None, target: TargetCpu) -> dict:
    int8_layers = any(row["precision"] == "int8" for row in rows)
    return {"model": model_name, "plan": plan_json, "plan_label": plan_label, "layers": rows, "size_bytes": size,
            "fp32_size_bytes": fp32_size, "measured": measured, "cpu": cpu_path(target, int8_layers),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions(), "machine": f"{cpu_name()}, {os.cpu_count()} cores"}
