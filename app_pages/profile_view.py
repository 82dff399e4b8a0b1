"""Why a plan is (not) faster on this machine: its forward's time by op group beside torch FP32's, at batch 1
and 32 (engine.runtime.profile through `bench --profile`'s function), with what the CPU's instruction sets
mean for int8 and int4. Shown on the comparison page."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from app_pages import common
from engine.analysis.benchmark import ProfileComparison, profile_against_fp32
from engine.core.errors import EngineError
from engine.core.plan import Plan
from engine.runtime.profile import GROUPS
from engine.core.vocabulary import Runtime, runtime_label

def chart(profile: ProfileComparison) -> go.Figure:
    """Stacked bars: one per (batch, variant), one colour per op group, the time outside any op on top."""
    bars, names = [], []
    for row in profile.profiles:
        for bar, label in ((row.fp32_torch, "torch FP32"), (row.plan, f"plan ({runtime_label(row.plan.runtime)})")):
            bars.append(bar)
            names.append(f"batch {row.batch}<br>{label}")
    figure = go.Figure()
    for group in GROUPS:
        figure.add_trace(go.Bar(name=group, x=names, y=[bar.groups[group] for bar in bars]))
    figure.add_trace(go.Bar(name="outside any op", x=names, y=[bar.outside_ops_ms for bar in bars],
                            marker_pattern_shape="/"))
    figure.update_layout(barmode="stack", height=360, yaxis_title="ms per forward", yaxis_type="log",
                         margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return figure


def profile_section(plans: list[tuple[str, Plan]]) -> None:
    st.subheader("Why is it (not) faster here?")
    quantized = [(label, plan) for label, plan in plans if plan.rules]
    if not quantized:
        st.caption("Choose a quantized plan above to see where its time goes.")
        return
    columns = st.columns([2, 2, 1])
    label = columns[0].selectbox("Plan", [label for label, _ in quantized], key="profile_plan")
    runtime = columns[1].radio("Runtime", list(Runtime), format_func=runtime_label, horizontal=True,
                               key="profile_runtime")
    plan = dict(quantized)[label].on(runtime)
    found = st.session_state.setdefault("profiles", {})
    if columns[2].button("Profile", key="profile_run",
                         help="20 profiled forwards of the plan and of torch FP32 at batch 1 and 32, after warm-up "
                              "(about 10-30 s on the embedded model)"):
        model, tokenizer = common.model_and_tokenizer()
        data = common.dataset()  # read here: session state is this thread's, not the worker's

        def work(_progress):
            from cache import results

            folder = results.exports().folder(model, tokenizer, plan, data) if runtime == Runtime.ONNXRUNTIME else None
            return profile_against_fp32(model, tokenizer, plan, data=data, exported=folder)

        try:
            found[plan.key()] = common.run_job("profile", f"Profiling {label}", work)
        except EngineError as error:
            st.error(f"Cannot profile {label} on {runtime_label(runtime)}: {error}")
            return
    profile = found.get(plan.key())
    if profile is None:
        return
    st.plotly_chart(chart(profile), width="stretch", key="profile_chart")
    lines = [f"batch {row.batch}: {row.speedup:.2f}x torch FP32 in this run; the plan's ops take "
             f"{row.plan.profiled_ms:.2f} of its {row.plan.wall_ms:.2f} ms" for row in profile.profiles]
    unfused = profile.profiles[0].plan.unfused
    st.caption("; ".join(lines) + (f". Left unfused by ORT: {', '.join(unfused)}." if unfused else "."))
    st.caption(f"This CPU ({profile.cpu.features}): " + " ".join(f"{line}." for line in profile.cpu.meaning))
