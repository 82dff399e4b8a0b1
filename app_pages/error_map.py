"""The layer map's error overlay and depth chart: where the plan's error enters the model and whether later
blocks amplify or absorb it (engine.analysis.diagnose, memoized, through the one queue)."""
from __future__ import annotations

import math

import plotly.graph_objects as go
import streamlit as st
from plotly.colors import sample_colorscale

from app_pages import common
from cache import keys, results
from engine.analysis.diagnose import DEFAULT_SAMPLE, Diagnosis
from engine.core.plan import Plan

OVERLAYS = {"precision": "precision", "local": "error each layer puts in (local SQNR)",
            "accumulated": "error carried to each layer (accumulated SQNR)"}
WORST_DB, BEST_DB = 10.0, 50.0  # the colour scale's ends: 10 dB is a broken layer, 50 dB is FP32-like
state = st.session_state


def overlay_choice() -> str:
    return st.radio("Colour cells by", list(OVERLAYS), format_func=OVERLAYS.get, horizontal=True, key="lm_overlay",
                    help="SQNR against FP32 on a sample of the set: local, this layer's own quantization with FP32 "
                         "inputs; accumulated, everything the plan changed up to this layer's output")


def diagnosis_for(plan: Plan, evaluator) -> Diagnosis | None:
    """The plan's diagnosis from the cache, else one queued computation when the person asks for it."""
    model, tokenizer = common.model_and_tokenizer()
    data = common.dataset()  # read here: session state is this thread's, not the worker's
    size = min(DEFAULT_SAMPLE, len(data))
    estimate = 3 * evaluator.baseline.seconds * size / max(len(evaluator.labels), 1)  # two forwards and the copies
    return common.cached_job(  # the cache keeps the diagnosis's JSON
        keys.diagnosis(model, data.fingerprint, plan, size), "Measuring the error through the model",
        lambda progress: results.diagnosis(model, tokenizer, data, plan, size, progress=progress).to_json(),
        kind="diagnose",
        ask=lambda: st.button(f"Measure where the error enters ({size} sentences, about {max(estimate, 1):.0f} s)",
                              key="lm_diagnose"),
        tag=f"diagnose:{plan.key()}", read=Diagnosis.from_json)


def shade(db: float | None) -> tuple[str, str]:
    """(background, text colour) for an SQNR: green where nothing is lost, red where a layer breaks."""
    if db is None or math.isinf(db):
        return common.PRECISION_COLORS["fp32"], common.TEXT_ON["fp32"]
    t = min(max((db - WORST_DB) / (BEST_DB - WORST_DB), 0.0), 1.0)
    return sample_colorscale("RdYlGn", [t])[0], "#fff" if t <= 0.2 else "#222"  # white on the darkest reds


def annotate(cells: list[dict], diagnosis: Diagnosis, overlay: str) -> None:
    """Shade each cell by its layer's local or accumulated SQNR, both in its hover."""
    rows = {row.op: row for row in diagnosis.rows}
    for cell in cells:
        row = rows.get(cell["layer"])
        if row is None:
            continue
        local, carried = row.local_sqnr_db, row.accumulated_sqnr_db
        value = local if overlay == "local" else carried
        cell["shade"], cell["shade_text"] = shade(value)
        cell["note"] = "exact" if value is None else f"{value:.0f} dB"
        cell["tip"] += (f"\nlocal SQNR {_db(local)}, accumulated {_db(carried)}"
                        + (f"\nW8A8 split: weights {_db(row.weight_sqnr_db)}, activations "
                           f"{_db(row.activation_sqnr_db)}" if row.weight_sqnr_db is not None else ""))


def _db(value: float | None) -> str:
    return "exact (no error)" if value is None else f"{value:.1f} dB"


def depth_chart(diagnosis: Diagnosis) -> go.Figure:
    """Accumulated SQNR of every op in forward order, the plan's quantized layers marked (their local SQNR in the
    hover): a drop at a marker is error entering, a drop between markers is error amplified downstream."""
    rows = diagnosis.rows
    x = list(range(len(rows)))
    carried = [row.accumulated_sqnr_db for row in rows]
    hover = [f"{row.op}<br>{row.kind} · accumulated {_db(row.accumulated_sqnr_db)}"
             + (f" · local {_db(row.local_sqnr_db)}" if row.local_sqnr_db is not None else "") for row in rows]
    figure = go.Figure(go.Scatter(x=x, y=carried, mode="lines", name="accumulated", hovertext=hover,
                                  hovertemplate="%{hovertext}<extra></extra>", line={"color": "#555"}))
    for precision in ("int8", "int4", "fp16", "bf16"):
        marked = [i for i, row in enumerate(rows) if row.precision == precision]
        if marked:
            figure.add_trace(go.Scatter(
                x=marked, y=[carried[i] for i in marked], mode="markers", name=f"{precision} layer",
                marker={"color": common.PRECISION_COLORS[precision], "size": 9, "line": {"width": 1, "color": "#333"}},
                hovertext=[hover[i] for i in marked], hovertemplate="%{hovertext}<extra></extra>"))
    starts = {}
    for i, row in enumerate(rows):
        if row.block is not None:
            starts.setdefault(row.block, i)
    figure.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10}, yaxis_title="SQNR (dB)",
                         xaxis={"tickvals": list(starts.values()), "ticktext": [f"block {b}" for b in starts]},
                         title=f"Error through the model ({diagnosis.sentences} sentences; higher is better)")
    return figure
