"""The layer map: click a layer to change its precision and watch accuracy, latency and size move."""
from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import cache
from engine.evaluation import Session
from engine.layers import ROLES, inventory
from engine.measure import bench, model_size_bytes
from engine.models import fingerprint
from engine.plan import FP32, PRECISIONS, Plan, PlanError
from engine.toggle import layer_bytes, next_precision, set_layers
from app_pages import common

BENCH_TOKENS = 32
CLICK_ACTIONS = {"cycle FP32 → INT8 → INT4": None, **{f"set {p.upper()}": p for p in PRECISIONS}}

st.title("Layer map")
st.caption("Each cell is one layer. Click a cell to change its precision; the figures below update from the "
           "first layer that changed, with a running estimate while the rest of the set is evaluated.")

evaluator = common.safe_evaluator()
if evaluator is None:
    st.stop()
model, tokenizer = common.model_and_tokenizer()
layers = inventory(model)
names = [layer.name for layer in layers]
by_name = {layer.name: layer for layer in layers}
state = st.session_state
state.setdefault("plan_undo", [])
state.setdefault("plan_history", [])
state.setdefault("layer_effects", {})
state.setdefault("grid_key", 0)


def engine_session() -> Session:
    """This browser session's incremental state: its own plan and trace, never shared."""
    session = state.get("lm_session")
    if session is None or session.evaluator is not evaluator:
        session = Session(evaluator)
        state["lm_session"] = session
    return session


def change_plan(plan: Plan) -> None:
    current = common.current_plan()
    if plan.key() != current.key():
        state["plan_undo"].append(current)
        common.set_current_plan(plan)


def evaluate(plan: Plan, show_partial) -> dict:
    """The plan's figures: from the disk cache when seen before, else incrementally from the last plan."""
    return cache.memo("layer-map-eval", lambda: engine_session().update(plan, progress=show_partial).summary(),
                      **common.result_key(plan, batch=evaluator.batch_size))


def measured_size(plan: Plan) -> int:
    return cache.memo("size", lambda: model_size_bytes(model, plan), model=fingerprint(model), plan=plan.key())


def measured_latency(plan: Plan, batch: int) -> dict:
    return cache.memo("bench", lambda: bench(model, tokenizer, plan, batch, BENCH_TOKENS, min_seconds=0.5),
                      model=fingerprint(model), plan=plan.key(), batch=batch, tokens=BENCH_TOKENS, device="cpu")


# ---- the grid ---------------------------------------------------------------------------------
def grid_figure(plan: Plan) -> go.Figure:
    resolved = plan.resolve(names, strict=False)
    effects = state["layer_effects"]
    xs, ys, colors, texts, hovers, custom = [], [], [], [], [], []
    rows = [f"block {b}" for b in sorted({layer.block for layer in layers if layer.block is not None})]
    for layer in layers:
        precision = resolved[layer.name]
        if layer.block is not None:
            x, y = layer.role, f"block {layer.block}"
        else:
            x, y = ({"embedding": ROLES[0]}.get(layer.role, ROLES[0] if layer.role == "pooler" else ROLES[1]),
                    "embedding" if layer.role == "embedding" else "head")
        effect = effects.get(layer.name, "not measured yet")
        xs.append(x)
        ys.append(y)
        colors.append(common.PRECISION_COLORS[precision])
        texts.append(precision.upper() if layer.block is not None else f"{layer.role}<br>{precision.upper()}")
        hovers.append(f"<b>{layer.name}</b><br>role {layer.role}, shape {tuple(layer.shape)}<br>"
                      f"{layer.params:,} parameters, {layer_bytes(layer, precision, plan.group_size):,} bytes at "
                      f"{precision.upper()}<br>last effect: {effect}")
        custom.append(layer.name)
    figure = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers+text", text=texts, customdata=custom, hovertext=hovers, hoverinfo="text",
        marker=dict(symbol="square", size=46, color=colors, line=dict(color="#555", width=1)),
        textfont=dict(size=10)))
    figure.update_layout(
        height=90 + 62 * (len(rows) + 2), margin=dict(l=10, r=10, t=30, b=10), showlegend=False, dragmode=False,
        xaxis=dict(categoryorder="array", categoryarray=list(ROLES), side="top", fixedrange=True),
        yaxis=dict(categoryorder="array", categoryarray=list(reversed(["embedding"] + rows + ["head"])),
                   fixedrange=True), clickmode="event+select")
    return figure


def legend() -> None:
    st.markdown(" ".join(f"<span style='background:{color};padding:2px 8px;border-radius:3px;margin-right:4px'>"
                         f"{precision.upper()}</span>" for precision, color in common.PRECISION_COLORS.items()),
                unsafe_allow_html=True)


def handle_click(event, action: str | None) -> None:
    points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) else \
        getattr(getattr(event, "selection", None), "points", []) or []
    if not points:
        return
    name = points[0].get("customdata")
    name = name[0] if isinstance(name, list) else name
    if name not in by_name:
        return
    current = common.current_plan()
    precision = action or next_precision(current.resolve(names, strict=False)[name])
    change_plan(set_layers(current, names, [name], precision))
    state["last_toggled"] = name
    state["grid_key"] += 1  # a fresh chart key clears the selection, so the next click registers


# ---- controls ---------------------------------------------------------------------------------
def bulk_controls() -> None:
    blocks = sorted({layer.block for layer in layers if layer.block is not None})
    with st.expander("Bulk changes, undo, reset, import and export", expanded=False):
        c1, c2, c3 = st.columns(3)
        precision = c1.selectbox("Precision", PRECISIONS, index=3, key="bulk_precision")
        block = c2.selectbox("Block", ["—"] + [str(b) for b in blocks], key="bulk_block")
        role = c3.selectbox("Role", ["—"] + list(ROLES) + ["embedding", "pooler", "classifier"], key="bulk_role")
        b1, b2, b3, b4, b5 = st.columns(5)
        current = common.current_plan()
        if b1.button("Apply to block", disabled=block == "—", width="stretch"):
            change_plan(set_layers(current, names, [l.name for l in layers if str(l.block) == block], precision))
            st.rerun()
        if b2.button("Apply to role", disabled=role == "—", width="stretch"):
            change_plan(set_layers(current, names, [l.name for l in layers if l.role == role], precision))
            st.rerun()
        if b3.button("Apply to everything", width="stretch"):
            change_plan(set_layers(current, names, names, precision))
            st.rerun()
        if b4.button("Undo", disabled=not state["plan_undo"], width="stretch"):
            common.set_current_plan(state["plan_undo"].pop())
            st.rerun()
        if b5.button("Reset to FP32", width="stretch"):
            change_plan(FP32)
            st.rerun()
        d1, d2 = st.columns(2)
        d1.download_button("Download plan (JSON)", json.dumps(current.to_json(), indent=2), "plan.json",
                           "application/json", width="stretch")
        upload = d2.file_uploader("Upload a plan (JSON)", type=["json"], key="plan_upload")
        if upload is not None and state.get("plan_upload_seen") != upload.file_id:
            state["plan_upload_seen"] = upload.file_id
            try:
                uploaded = Plan.from_json(json.loads(upload.getvalue().decode("utf-8")))
                uploaded.resolve(names)
                change_plan(uploaded)
                st.rerun()
            except (PlanError, ValueError) as error:
                st.error(f"That plan cannot be used: {error}")


# ---- figures ----------------------------------------------------------------------------------
def delta(value: float, reference: float | None, unit: str = "pts", scale: float = 100.0) -> str | None:
    if reference is None:
        return None
    return f"{(value - reference) * scale:+.2f} {unit}"


def show_results(plan: Plan) -> None:
    baseline = evaluator.baseline.summary()
    partial_box = st.empty()
    progress = st.empty()

    def show_partial(partial) -> None:
        progress.progress(partial.done / partial.total, text=f"Evaluated {partial.done} of {partial.total}…")
        partial_box.info(f"Estimate after {partial.done} of {partial.total} sentences: accuracy "
                         f"{common.fmt_ci(partial.accuracy, partial.ci95)}, agreement with FP32 "
                         f"{partial.agreement:.1%} ({partial.elapsed_s:.2f} s)")

    result = evaluate(plan, show_partial)
    partial_box.empty()
    progress.empty()
    previous = state.get("previous_result")
    size = measured_size(plan)
    fp32_size = measured_size(FP32)
    record(plan, result, size)

    columns = st.columns(4)
    columns[0].metric(f"Accuracy, 95% CI [{result['ci95'][0]:.1%}, {result['ci95'][1]:.1%}]", f"{result['accuracy']:.1%}",
                      delta(result["accuracy"], baseline["accuracy"]) + " vs FP32", delta_color="normal",
                      help=f"n = {result['n']:,}. Against the previous plan: "
                           f"{delta(result['accuracy'], previous['accuracy']) if previous else 'n/a'}")
    columns[1].metric("Agreement with FP32", f"{result['agreement']:.1%}", f"{result['flips']} flips",
                      delta_color="off", help=f"McNemar p = {result['mcnemar_p']:.3g} against FP32")
    columns[2].metric("Mean KL from FP32", f"{result['kl']:.2e}",
                      f"{result['kl'] - previous['kl']:+.1e} vs previous" if previous else None, delta_color="inverse")
    columns[3].metric("Size (real format)", f"{size / 1e6:.1f} MB", f"{size / fp32_size:.0%} of FP32",
                      delta_color="off")
    if abs(result["accuracy"] - baseline["accuracy"]) * result["n"] < 1 or result["mcnemar_p"] >= 0.05:
        st.caption(f"The accuracy change against FP32 is not significant (McNemar p = {result['mcnemar_p']:.2f}).")
    flips_view(result)
    state["previous_result"] = result
    latency_view(plan)


def flips_view(result: dict) -> None:
    if not result["flipped"]:
        return
    data = common.dataset(common.data_name())
    baseline_probs = evaluator.baseline.probs[:, 1]
    with st.expander(f"The {result['flips']} sentences whose prediction flipped against FP32"):
        rows = [{"text": data.texts[i], "label": "positive" if data.labels[i] else "negative",
                 "FP32 P(positive)": round(float(baseline_probs[i]), 3),
                 "plan P(positive)": round(float(result["positive_probs"][i]), 3)} for i in result["flipped"]]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def latency_view(plan: Plan) -> None:
    """Real-kernel latency, measured after the accuracy is shown; an estimate is labelled as one."""
    st.markdown("**Latency on real kernels** (this CPU, 32-token inputs)")
    columns = st.columns(2)
    for column, batch in zip(columns, (1, 32)):
        key = f"latency_{batch}"
        box = column.empty()
        last = state.get(key)
        if last is not None:
            box.metric(f"Batch {batch}, p50 (estimate: previous plan, measuring…)", f"{last['latency_ms_p50']:.1f} ms")
        measured = measured_latency(plan, batch)
        reference = measured_latency(FP32, batch)
        box.metric(f"Batch {batch}, p50 ({measured['threads']} threads)", f"{measured['latency_ms_p50']:.1f} ms",
                   f"{measured['latency_ms_p50'] / reference['latency_ms_p50']:.2f}x FP32"
                   + (f", {measured['latency_ms_p50'] - last['latency_ms_p50']:+.1f} ms vs previous" if last else ""),
                   delta_color="off", help=f"p95 {measured['latency_ms_p95']:.1f} ms over {measured['repeats']} runs")
        state[key] = measured


def record(plan: Plan, result: dict, size: int) -> None:
    history = state["plan_history"]
    if not history or history[-1]["key"] != plan.key():
        history.append({"key": plan.key(), "plan": plan, "label": f"#{len(history) + 1}",
                        "accuracy": result["accuracy"], "low": result["ci95"][0], "high": result["ci95"][1],
                        "size_mb": size / 1e6, "flips": result["flips"], "kl": result["kl"]})
    toggled = state.pop("last_toggled", None)
    previous = state.get("previous_result")
    if toggled and previous:
        state["layer_effects"][toggled] = (f"{(result['accuracy'] - previous['accuracy']) * 100:+.2f} pts accuracy, "
                                           f"KL {result['kl']:.1e}")


def history_view() -> None:
    history = state["plan_history"]
    if len(history) < 2:
        return
    st.subheader("Plans tried in this session")
    frame = pd.DataFrame([{k: v for k, v in h.items() if k not in ("plan", "key")} for h in history])
    figure = go.Figure(go.Scatter(
        x=frame["size_mb"], y=frame["accuracy"], mode="markers+text", text=frame["label"], textposition="top center",
        error_y=dict(type="data", symmetric=False, array=frame["high"] - frame["accuracy"],
                     arrayminus=frame["accuracy"] - frame["low"])))
    figure.update_layout(height=320, xaxis_title="size (MB, real format)", yaxis_title="accuracy (95% CI)",
                         margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(figure, width="stretch")
    st.dataframe(frame, hide_index=True, width="stretch")
    choice = st.selectbox("Restore a plan", [h["label"] for h in history], index=len(history) - 1)
    if st.button("Restore"):
        change_plan(next(h["plan"] for h in history if h["label"] == choice))
        st.rerun()


@st.fragment
def layer_map() -> None:
    action_label = st.radio("A click", list(CLICK_ACTIONS), horizontal=True, key="click_action")
    legend()
    event = st.plotly_chart(grid_figure(common.current_plan()), on_select="rerun", selection_mode="points",
                            key=f"grid_{state['grid_key']}", width="stretch",
                            config={"displayModeBar": False})
    before = common.current_plan().key()
    handle_click(event, CLICK_ACTIONS[action_label])
    if common.current_plan().key() != before:
        st.rerun(scope="fragment")
    plan = common.current_plan()
    with st.expander("Current plan (JSON)"):
        st.code(json.dumps(plan.to_json(), indent=2) if plan.rules else '"fp32"', language="json")
    show_results(plan)


bulk_controls()
layer_map()
history_view()
