"""Deploy what you chose: a plan exported to ONNX Runtime with its model card measured on this machine,
and a folder of exports reused by plan, so evaluating or timing a plan on ONNX Runtime exports it once."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable

import onnxruntime as ort
import torch
from torch import nn

from engine.data.sets import EvalSet, load_dataset
from engine.core.plan import Plan, PlanLike, as_plan
from engine.core.vocabulary import TIMING_TOKENS, Runtime
from engine.evaluation.deployed import evaluate_exported
from engine.evaluation.evaluate import get_evaluator
from engine.model.loading import fingerprint, label_space
from engine.quant.calibration import calibration_texts
from engine.quant.prepare import prepare
from engine.runtime.latency import bench_inputs
from engine.runtime.onnx_export import ExportError, export_onnx
from engine.runtime.onnx_session import benchmark, ort_call
from engine.runtime.profile import cpu_report, profile_ort

STALE_S = 3600.0  # a partial export folder older than this was left by a process that died
log = logging.getLogger(__name__)


def deploy(model: nn.Module, tokenizer, plan: PlanLike, out_dir: str | Path, data: EvalSet | None = None,
           limit: int | None = None, latency: bool = True, measure: bool = True,
           progress: Callable[[str, float], None] | None = None) -> dict:
    """Export `plan` to `out_dir` for ONNX Runtime, calibrated on `data`'s calibration pool (the embedded set's by
    default), with a card measured on `data` itself (accuracy with its interval, agreement with FP32, latency)
    unless `measure` is off."""
    plan = as_plan(plan).on(Runtime.ONNXRUNTIME)
    data = data if data is not None else load_dataset("embedded")
    if measure:
        label_space(model).indices(data.labels, data.name)  # a set the card cannot be measured on fails first
    prepared = prepare(model, tokenizer, plan, data.calibration, data.calibration_source)
    texts = calibration_texts(data.calibration, plan.calib) if prepared.ranges else None

    def card(folder: Path) -> dict:
        evaluator = get_evaluator(model, tokenizer, data.head(limit))
        result = evaluate_exported(evaluator, folder)
        figures = {**result.to_json(), "data": evaluator.dataset.name,
                   "fp32_accuracy": evaluator.baseline.comparison.accuracy}
        if latency:
            inputs = bench_inputs(tokenizer, data.texts, 1, TIMING_TOKENS, "cpu")
            timing = benchmark({"onnx": ort_call(folder, inputs)}, batch=1, protocol="back_to_back")["onnx"]
            figures["latency"] = {**timing, "batch": 1, "tokens": TIMING_TOKENS, "threads": torch.get_num_threads()}
            feeds = {name: inputs[name].numpy() for name in ("input_ids", "attention_mask")}
            figures["profile"] = {**profile_ort(folder, feeds, batch=1).to_json(), "cpu": cpu_report()}
        return figures

    return export_onnx(model, tokenizer, plan, out_dir, calibration_texts=texts, prepared=prepared,
                       card=card if measure else None, progress=progress)


class Exports:
    """Exported folders under `root`, one per (weights, plan, ONNX Runtime version): an export is made once
    and reused by every evaluation and timing of that plan on ONNX Runtime."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def sweep(self, stale_s: float = STALE_S) -> None:
        """Remove what dead processes left: partial folders (an export is written beside its target and renamed
        into place whole) and folders set aside as broken, once they are older than `stale_s`."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for entry in entries:
            leftover = entry.name.startswith(".") and (".partial-" in entry.name or ".broken-" in entry.name)
            try:
                if leftover and time.time() - entry.stat(follow_symlinks=False).st_mtime > stale_s:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                continue

    @staticmethod
    def whole(target: Path) -> bool:
        """An export folder as written: its card names the size its model.onnx has."""
        try:
            card = json.loads((target / "card.json").read_text())
            return (target / "model.onnx").stat().st_size == card["size_bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _set_aside(self, target: Path) -> None:
        aside = target.with_name(f".{target.name}.broken-{time.time_ns()}")
        log.warning("export %s is damaged (its model.onnx does not match its card); rebuilding it", target)
        try:
            os.rename(target, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def folder(self, model: nn.Module, tokenizer, plan: PlanLike, data: EvalSet | None = None) -> Path:
        """The plan's export, without a card (for evaluating and timing it)."""
        return self._made(model, tokenizer, plan, data, measured=False)

    def deployed(self, model: nn.Module, tokenizer, plan: PlanLike, data: EvalSet,
                 progress: Callable[[str, float], None] | None = None) -> Path:
        """The plan's export with its card measured on `data`: what a person downloads."""
        return self._made(model, tokenizer, plan, data, measured=True, progress=progress)

    def _made(self, model, tokenizer, plan, data, measured: bool, progress=None) -> Path:
        plan = as_plan(plan).on(Runtime.ONNXRUNTIME)
        what = f"{fingerprint(model)}:{plan.key()}:{ort.__version__}"
        if measured:
            what += f":card:{data.fingerprint}"
        target = self.root / hashlib.blake2b(what.encode(), digest_size=10).hexdigest()
        if target.exists() and not self.whole(target):
            self._set_aside(target)
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                deploy(model, tokenizer, plan, target, data, measure=measured, progress=progress)
            except ExportError:
                if not self.whole(target):  # another session's export of the same plan won the race
                    raise
        return target


def archive(folder: str | Path, name: str | None = None) -> bytes:
    """The exported folder as one zip file, its files under `name` (default: the folder's own name, which in
    the cache is a hash; a person unpacking it wants the model and plan)."""
    folder = Path(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                bundle.write(path, f"{name or folder.name}/{path.name}")
    return buffer.getvalue()


def export_name(model_name: str, label: str, plan: Plan) -> str:
    """A file-safe name for an export: the model (a local folder by its last part, a hub id whole), the page's
    name for the plan, the precisions its rules name, the runtime and the plan's short key, e.g.
    embedded-layer-map-plan-int4-int8-8cd04c21."""
    model = Path(model_name).name if Path(model_name).is_dir() else model_name
    precisions = "-".join(sorted({rule.precision for _, rule in plan.rules})) or "fp32"
    runtime = "-ort" if plan.runtime == Runtime.ONNXRUNTIME else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{label}-{precisions}{runtime}-{plan.key()[:8]}").strip("-")
