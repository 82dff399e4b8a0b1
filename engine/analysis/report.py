"""A comparison's rows exported: CSV (intervals as _low/_high columns) and a short Markdown report."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Sequence

from engine.analysis.compare import ComparisonRow
from engine.analysis.findings import points
from engine.analysis.presets import display_name


def _flat(row: ComparisonRow) -> dict:
    flat = {}
    for key, value in row.to_json().items():
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            flat[f"{key}_low"], flat[f"{key}_high"] = value
        elif isinstance(value, (list, tuple)):
            flat[key] = "; ".join(str(v) for v in value)
        elif isinstance(value, dict):
            flat[key] = json.dumps(value, sort_keys=True)
        else:
            flat[key] = value
    return flat


def to_csv(rows: Sequence[ComparisonRow]) -> str:
    """The rows as CSV; intervals become _low/_high columns, plans their JSON."""
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else pattern.format(value)


def to_markdown(rows: Sequence[ComparisonRow], sentences: Sequence[str], machine: str) -> str:
    """A short report: the machine, the table and the findings."""
    tokens = rows[0].tokens if rows else "?"
    batch = rows[0].throughput_batch if rows else "?"
    lines = ["# Precision comparison", "",
             f"Machine: {machine}. Device: {rows[0].device if rows else 'n/a'}. Latency at batch 1 and "
             f"{tokens} tokens (median and p95 after warm-up, all plans interleaved round-robin; speedup = "
             f"median of the per-round ratios to FP32), throughput at batch {batch}; "
             "accuracy with 95% Wilson interval, change against FP32 with a paired bootstrap 95% interval.", "",
             "| Plan | Set | n | Accuracy [95% CI] | Δ vs FP32, points [95% CI] | Agreement | Flips | McNemar p "
             "| KL | Size (MB) | Latency p50 / p95 (ms) | Throughput (/s) | Speedup [95% CI] |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        low, high = row.ci95
        d_low, d_high = row.accuracy_delta_ci95
        s_low, s_high = row.speedup_ci95
        lines.append(
            f"| {display_name(row.plan)} | {row.data} | {row.n} "
            f"| {100 * row.accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
            f"| {points(row.accuracy_delta)} [{points(d_low)}, {points(d_high)}] "
            f"| {100 * row.agreement:.1f}% | {row.flips} | {_fmt(row.mcnemar_p, '{:.2g}')} "
            f"| {_fmt(row.kl, '{:.2g}')} | {row.size_bytes / 1e6:.1f} "
            f"| {row.latency_ms_p50:.1f} / {row.latency_ms_p95:.1f} | {row.throughput_per_s:.0f} "
            f"| {row.speedup:.2f}x [{s_low:.2f}, {s_high:.2f}] |")
    if sentences:
        lines += ["", "## Findings", ""] + [f"- {sentence}" for sentence in sentences]
    return "\n".join(lines) + "\n"
