"""Latency of a plan on real kernels: one plan alone (the `bench` command), or plans against their
reference, interleaved in one run so that the ratio shown compares like with like."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from engine.data.sets import EvalSet, load_dataset
from engine.core.plan import FP32, Plan
from engine.core.vocabulary import TIMING_TOKENS, Kernels, Runtime
from engine.quant.prepare import build
from engine.runtime.device import model_on, resolve_device
from engine.runtime.latency import bench_inputs, interleaved, machine, paired_speedup, peak_memory, summary, time_call
from engine.runtime.onnx_session import benchmark, ort_call
from engine.runtime.profile import Profile, cpu_report, profile_ort, profile_torch
from engine.runtime.size import model_size_bytes


def real_model(model: nn.Module, tokenizer, plan: Plan, device: torch.device, data: EvalSet | None = None) -> nn.Module:
    """The plan on the device's real kernels (calibrated on `data`'s pool, the embedded set's by default)."""
    source = data if data is not None else load_dataset("embedded")
    return build(model_on(model, device), tokenizer, plan, Kernels.REAL, source.calibration, source.calibration_source)


def bench(model: nn.Module, tokenizer, plan: Plan, batch: int = 1, tokens: int = TIMING_TOKENS, device: str = "cpu",
          min_seconds: float = 1.0, data: EvalSet | None = None) -> dict:
    """Latency p50/p95 and throughput of the plan on real kernels, after warm-up."""
    if batch < 1 or tokens < 2:
        raise ValueError("batch must be at least 1 and tokens at least 2")
    target = resolve_device(device)
    real = real_model(model, tokenizer, plan, target, data)
    inputs = bench_inputs(tokenizer, load_dataset("embedded").texts, batch, tokens, target)
    sync = torch.cuda.synchronize if target.type == "cuda" else None
    with torch.inference_mode():
        times = time_call(lambda: real(**inputs), repeats=10 if batch > 1 else 20, min_seconds=min_seconds, sync=sync)
        peak = peak_memory(lambda: real(**inputs), target)
    return {**summary(times, batch), "size_bytes": model_size_bytes(model, plan), "threads": torch.get_num_threads(),
            "batch": batch, "tokens": tokens, "runtime": Runtime.TORCH, "device": str(target),
            "peak_memory_bytes": peak, "machine": machine(target)}


def bench_against(model: nn.Module, tokenizer, plans: Mapping[str, Plan], reference: str, batch: int = 1,
                  tokens: int = TIMING_TOKENS, device: str = "cpu", repeats: int = 20, min_seconds: float = 0.5,
                  data: EvalSet | None = None, progress: Callable[[float], None] | None = None,
                  exported: Mapping[str, Path] | None = None) -> dict[str, dict]:
    """Every plan's latency and its paired speedup over `reference` (a torch plan among `plans`), all timed
    interleaved round by round in this one run, with the machine's load recorded. `exported` adds ONNX Runtime
    variants (label -> exported folder), timed in the same rounds with ORT's spinning threads off so that
    they cannot steal the cores from the next variant."""
    target = resolve_device(device)
    inputs = bench_inputs(tokenizer, load_dataset("embedded").texts, batch, tokens, target)
    calls, sizes = {}, {}
    for label, plan in plans.items():
        net = real_model(model, tokenizer, plan, target, data)
        calls[label], sizes[label] = (lambda net=net: net(**inputs)), model_size_bytes(model, plan)
        if progress is not None:  # a caller stopping the timing is heard between builds too, not only between rounds
            progress(0.0)
    for label, folder in (exported or {}).items():
        calls[label] = ort_call(folder, inputs, spinning=False)
        sizes[label] = (Path(folder) / "model.onnx").stat().st_size
    sync = torch.cuda.synchronize if target.type == "cuda" else None
    before = machine(target)
    with torch.inference_mode():
        times = interleaved(calls, repeats, min_seconds, sync, progress)
    after = machine(target)
    out = {}
    for label in calls:
        speedup, interval = paired_speedup(times[reference], times[label])
        out[label] = {**summary(times[label], batch), "speedup": speedup, "speedup_ci95": list(interval),
                      "reference": reference, "size_bytes": sizes[label], "batch": batch, "tokens": tokens,
                      "threads": torch.get_num_threads(),
                      "runtime": Runtime.ONNXRUNTIME if label in (exported or {}) else Runtime.TORCH,
                      "protocol": "interleaved", "device": str(target),
                      "load_average": [before["load_average"], after["load_average"]], "machine": after}
    return out


def bench_exported(folder: Path, tokenizer, batch: int = 1, tokens: int = TIMING_TOKENS, repeats: int = 20,
                   min_seconds: float = 1.0) -> dict:
    """An exported plan alone on ONNX Runtime, as a server running one model runs it: repeats back to back
    with ORT's default spinning threads."""
    inputs = bench_inputs(tokenizer, load_dataset("embedded").texts, batch, tokens, "cpu")
    timing = benchmark({"onnx": ort_call(folder, inputs)}, batch, "back_to_back", repeats, min_seconds)["onnx"]
    return {**timing, "size_bytes": (Path(folder) / "model.onnx").stat().st_size, "threads": torch.get_num_threads(),
            "batch": batch, "tokens": tokens, "runtime": Runtime.ONNXRUNTIME, "device": "cpu",
            "machine": machine("cpu")}


@dataclass(frozen=True, kw_only=True)
class CpuReport:
    """This CPU's instruction sets that decide int8 and int4 speed (`cpu_report()`), each with what it means."""

    features: str
    target_cpu: str
    meaning: tuple[str, ...]
    cuda_compute_capability: str | None = None  # only where a CUDA device is present

    def to_json(self) -> dict[str, Any]:
        """`cpu_report()`'s dict, keys in its order (no CUDA key without a CUDA device)."""
        out = {"features": self.features, "target_cpu": self.target_cpu, "meaning": list(self.meaning)}
        if self.cuda_compute_capability is not None:
            out["cuda_compute_capability"] = self.cuda_compute_capability
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CpuReport:
        return cls(features=data["features"], target_cpu=data["target_cpu"], meaning=tuple(data["meaning"]),
                   cuda_compute_capability=data.get("cuda_compute_capability"))


@dataclass(frozen=True, kw_only=True)
class BatchProfile:
    """At one batch size: the plan's forward and torch FP32's by op group, and FP32's wall time over the plan's."""

    batch: int
    tokens: int
    plan: Profile
    fp32_torch: Profile
    speedup: float

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "tokens": self.tokens, "plan": self.plan.to_json(),
                "fp32_torch": self.fp32_torch.to_json(), "speedup": self.speedup}


@dataclass(frozen=True, kw_only=True)
class ProfileComparison:
    """What `profile_against_fp32` found; `to_json()` is `bench --profile --json`'s "profile"."""

    profiles: tuple[BatchProfile, ...]
    cpu: CpuReport
    machine: dict  # latency.machine()'s description of where it ran

    def to_json(self) -> dict[str, Any]:
        return {"profiles": [row.to_json() for row in self.profiles], "cpu": self.cpu.to_json(),
                "machine": self.machine}


def profile_against_fp32(model: nn.Module, tokenizer, plan: Plan, tokens: int = TIMING_TOKENS, device: str = "cpu",
                         data: EvalSet | None = None, exported: Path | None = None,
                         batches: tuple[int, ...] = (1, 32)) -> ProfileComparison:
    """Why the plan is (not) faster than torch FP32 here: both forwards' time by op group at each batch size
    (the plan on torch's real kernels, or the exported graph on ONNX Runtime when `exported` is its folder),
    with the latency measured around the profiled calls, and what this CPU's instruction sets mean."""
    target = resolve_device(device)
    reference = real_model(model, tokenizer, FP32, target, data)
    real = None if exported is not None else real_model(model, tokenizer, plan, target, data)
    rows = []
    for batch in batches:
        inputs = bench_inputs(tokenizer, load_dataset("embedded").texts, batch, tokens, target)
        fp32 = profile_torch(lambda: reference(**inputs), batch)
        if exported is not None:
            feeds = {name: inputs[name].cpu().numpy() for name in ("input_ids", "attention_mask")}
            mine = profile_ort(exported, feeds, batch)
        else:
            mine = profile_torch(lambda: real(**inputs), batch)
        rows.append(BatchProfile(batch=batch, tokens=tokens, plan=mine, fp32_torch=fp32,
                                 speedup=round(fp32.wall_ms / mine.wall_ms, 3)))
    return ProfileComparison(profiles=tuple(rows), cpu=CpuReport.from_json(cpu_report()), machine=machine(target))
