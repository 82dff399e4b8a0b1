"""SmoothQuant: see the activation outliers, move alpha, watch W8A8 accuracy respond."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

import cache
from engine import smoothquant as sq
from engine.layers import inventory
from engine.models import fingerprint
from engine.plan import Plan
from app_pages import common

ACTS = {"static": "static · per-tensor scale calibrated on the train split",
        "token": "dynamic · per-token scales at run time",
        "dynamic": "dynamic · per-tensor (torch's CPU kernel)"}
SWEEP_ACTS = ("static", "token")
ROLE_COLORS = {"query": "#6baed6", "key": "#4292c6", "value": "#2171b5", "attention-out": "#9e9ac8",
               "ffn-in": "#fdae6b", "ffn-out": "#e6550d", "pooler": "#74c476", "classifier": "#31a354"}

st.title("SmoothQuant")
st.markdown(
    "A few input channels of an encoder's Linears carry activations tens of times larger than the rest, "
    "and one int8 scale per tensor spends its range on them. SmoothQuant divides each input channel by "
    "**s = max|X|^α / max|W|^(1−α)** and multiplies the weight by the same s: the float model is unchanged, "
    "the difficulty moves into the per-channel int8 weights. Move α and watch W8A8 accuracy respond."
)

evaluator = common.safe_evaluator()
if evaluator is None:
    st.stop()
model, tokenizer = common.model_and_tokenizer()

controls = st.columns([2, 3, 1])
act = controls[0].radio("Activation scales", list(ACTS), format_func=ACTS.get, key="sq_act")
alpha = controls[1].slider("α (migration strength)", 0.0, 1.0, 0.5, 0.05, key="sq_alpha",
                           help="0: the weights are flattened (max|W| = 1 per channel) and the activations keep all "
                                "the difficulty; 1: the activations are flattened (max|X| = 1 per channel)")
calib = controls[2].selectbox("Calibration sentences", (32, 64, 128, 256, 512), index=2, key="sq_calib",
                              help="from the train split (never the evaluation set), fixed seed")
with st.spinner(f"Calibrating on {calib} train sentences…"):
    calibration = sq.calibrate(model, tokenizer, calib)


def evaluated(plan: Plan, label: str):
    """The plan's result on the chosen set: from the cache, or one evaluation with a live estimate."""
    def compute():
        bar = st.progress(0.0, text=f"Evaluating {label}…")

        def progress(partial):
            bar.progress(partial.done / partial.total,
                         text=f"{label}: {partial.done}/{partial.total} · running accuracy "
                              f"{common.fmt_ci(partial.accuracy, partial.ci95)}")
        result, _ = evaluator.run(plan, progress=progress)
        bar.empty()
        return result
    return cache.memo("smoothquant-eval", compute, **common.result_key(plan, calib_seed=sq.CALIB_SEED))


def metric(column, title: str, result, base=None) -> None:
    comparison = result.comparison
    column.markdown(f"**{title}**")
    column.metric(f"Accuracy (n = {comparison.n:,})", common.fmt_ci(comparison.accuracy, comparison.ci95),
                  help="95% Wilson interval")
    if base is not None:
        difference, interval = sq.gain(evaluator.labels, base.predictions, result.predictions)
        column.caption(f"vs W8A8 without smoothing: {difference:+.1%} [{interval[0]:+.1%}, {interval[1]:+.1%}] "
                       "(paired bootstrap 95%)")
    column.caption(f"agreement with FP32 {comparison.agreement:.1%} · {comparison.flips} flips · "
                   f"KL {comparison.kl:.2e} nats")


plan = sq.smoothed_plan(alpha, act, calib)
w8a8 = evaluated(sq.smoothed_plan(None, act, calib), "W8A8 without smoothing")
smoothed = evaluated(plan, f"SmoothQuant α = {alpha:.2f}")
columns = st.columns(3)
metric(columns[0], "FP32", evaluator.baseline)
metric(columns[1], f"W8A8 ({act})", w8a8)
metric(columns[2], f"W8A8 + SmoothQuant α = {alpha:.2f}", smoothed, base=w8a8)

with st.expander("Check the invariant: smoothing alone leaves FP32's logits unchanged"):
    if st.button("Check at this α", key="sq_invariant"):
        difference = sq.max_logit_diff(evaluator, alpha, calib, run=lambda p: evaluated(p, "smoothing alone"))
        (st.success if difference < 1e-4 else st.error)(
            f"max |logit(smoothed, FP32 weights) − logit(FP32)| = {difference:.2e} over {len(evaluator.labels):,} "
            "examples (float error; the bound is 1e-4)")
action = st.columns(2)
if action[0].button("Send this plan to the layer map", key="sq_send",
                    help="the layer map starts from uniform W8A8 with this smoothing; toggle layers from there"):
    common.set_current_plan(plan)
    action[0].success(f"Layer map plan: {plan.label()} (W8A8, {act}, α = {alpha:.2f})")
action[1].download_button(
    "Export smoothed W8A8 model (safetensors)", data=lambda: sq.export(model, plan, calibration),
    file_name=f"smoothquant-a{alpha:.2f}-{act}.safetensors", mime="application/octet-stream", key="sq_export",
    help="simulated (quantize-dequantized) weights with each layer's in_scale; the plan, the static scales, "
         "the form of each layer and the calibration statistics are in the file's metadata")

# ---- sweep ---------------------------------------------------------------------------------
st.header("Accuracy against α")
sweep_key = common.result_key(sq.smoothed_plan(None, "static", calib), grid=sq.ALPHA_GRID, acts=SWEEP_ACTS)
sweep = cache.lookup(cache.make_key("smoothquant-sweep", **sweep_key))
if sweep is None:
    st.caption(f"{len(sq.ALPHA_GRID)} values of α (step 0.05) for static and per-token dynamic scales: "
               f"{2 * len(sq.ALPHA_GRID) + 2} evaluations, each stored for every session once done.")
    if st.button("Run the sweep", key="sq_sweep", type="primary"):
        bar = st.progress(0.0, text="Sweeping α…")

        def compute():
            rows = {}
            for index, scheme in enumerate(SWEEP_ACTS):
                def progress(fraction, text, index=index, scheme=scheme):
                    bar.progress((index + fraction) / len(SWEEP_ACTS), text=f"{ACTS[scheme]}: {text}")
                rows[scheme] = sq.alpha_rows(evaluator, sq.ALPHA_GRID, scheme, calib, invariant=False,
                                             progress=progress, run=lambda p: evaluated(p, "sweep"))
            return rows
        sweep = cache.memo("smoothquant-sweep", compute, **sweep_key)
        bar.empty()
if sweep is not None:
    figure = go.Figure()
    colors = {"static": "#e6550d", "token": "#3182bd"}
    for scheme, rows in sweep.items():
        alphas = [row["alpha"] for row in rows]
        low, high = [row["ci95"][0] for row in rows], [row["ci95"][1] for row in rows]
        figure.add_trace(go.Scatter(x=alphas + alphas[::-1], y=high + low[::-1], fill="toself", opacity=0.2,
                                    line={"width": 0}, fillcolor=colors[scheme], hoverinfo="skip", showlegend=False))
        figure.add_trace(go.Scatter(x=alphas, y=[row["accuracy"] for row in rows], mode="lines+markers",
                                    name=ACTS[scheme], line={"color": colors[scheme]}))
        figure.add_hline(y=rows[0]["w8a8_accuracy"], line_dash="dot", line_color=colors[scheme],
                         annotation_text=f"W8A8 {scheme}, no smoothing", annotation_position="bottom right")
        best = sq.best_row(rows)
        figure.add_trace(go.Scatter(x=[best["alpha"]], y=[best["accuracy"]], mode="markers", showlegend=False,
                                    marker={"symbol": "star", "size": 16, "color": colors[scheme]},
                                    hovertext=f"best α = {best['alpha']:.2f}"))
    figure.add_hline(y=evaluator.baseline.comparison.accuracy, line_color="black", annotation_text="FP32")
    figure.update_layout(xaxis_title="α", yaxis_title="accuracy", yaxis_tickformat=".0%", height=420,
                         legend={"orientation": "h", "y": -0.2})
    st.plotly_chart(figure, width="stretch")
    for scheme, rows in sweep.items():
        best = sq.best_row(rows)
        st.markdown(f"**{ACTS[scheme]}**: best α = {best['alpha']:.2f}, "
                    f"{common.fmt_ci(best['accuracy'], best['ci95'])} against "
                    f"{common.fmt_ci(best['w8a8_accuracy'], best['w8a8_ci95'])} without smoothing; gain "
                    f"{best['gain']:+.1%} [{best['gain_ci95'][0]:+.1%}, {best['gain_ci95'][1]:+.1%}]"
                    + (" — the interval includes 0: not a measurable gain." if best["gain_ci95"][0] <= 0 else "."))
    st.caption("Shaded: 95% Wilson intervals. The best α is the highest point; where the curve sits inside "
               "its neighbours' intervals, the choice between them is noise.")

# ---- automatic per-layer alpha ---------------------------------------------------------------
st.header("Automatic α per layer")
st.caption("For each layer (q/k/v together, since they share one divisor), the α in 0…1 (step 0.05) that "
           f"minimizes that layer's W8A8 output error on the calibration activations ({ACTS[act]}).")
auto_key = {"model": fingerprint(model), "calibration": calibration.key, "act": act, "grid": sq.ALPHA_GRID}
alphas = cache.lookup(cache.make_key("smoothquant-auto", **auto_key))
if alphas is None and st.button("Find α per layer", key="sq_auto", help="21 values of α for each layer"):
    search_bar = st.progress(0.0, text="Searching α per layer…")
    alphas = cache.memo("smoothquant-auto", lambda: sq.auto_alphas(
        model, calibration, act, progress=lambda done: search_bar.progress(done, text="Searching α per layer…")),
        **auto_key)
    search_bar.empty()
if alphas is not None:
    roles = {layer.name: layer.role for layer in inventory(model)}
    names = list(alphas)
    bars = go.Figure(go.Bar(x=names, y=[alphas[n] for n in names], hovertext=[roles[n] for n in names],
                            marker_color=[ROLE_COLORS.get(roles[n], "#999") for n in names]))
    bars.update_layout(yaxis_title="α", yaxis_range=[0, 1.05], xaxis_tickangle=-60, height=380,
                       xaxis={"tickfont": {"size": 9}})
    st.plotly_chart(bars, width="stretch")
    auto_plan = sq.smoothed_plan(alphas, act, calib)
    auto = evaluated(auto_plan, "per-layer α")
    auto_columns = st.columns(3)
    metric(auto_columns[0], "W8A8 + per-layer α", auto, base=w8a8)
    if auto_columns[1].button("Send the per-layer plan to the layer map", key="sq_send_auto"):
        common.set_current_plan(auto_plan)
        auto_columns[1].success(f"Layer map plan: {auto_plan.label()}")

# ---- outliers ---------------------------------------------------------------------------------
st.header("Outliers of one layer")
linear_names = list(calibration.low)
chosen = st.selectbox("Layer", linear_names, index=linear_names.index(sq.most_outlying(calibration)),
                      key="sq_layer", help="preselected: the input with the largest max/median channel range")
view = sq.outlier_view(model, calibration, chosen, alpha, act)
st.caption(f"{view['role']} · {view['form']} · α = {alpha:.2f}")
outlier_columns = st.columns(2)
for column, (kind, title) in zip(outlier_columns, (("x", "Input: max|X| per channel"),
                                                    ("w", "Weight: max|W| per input channel"))):
    figure = go.Figure()
    channels = np.arange(len(view[f"{kind}_before"]))
    figure.add_trace(go.Scatter(x=channels, y=view[f"{kind}_before"], mode="lines", name="before"))
    figure.add_trace(go.Scatter(x=channels, y=view[f"{kind}_after"], mode="lines", name=f"after (α = {alpha:.2f})"))
    figure.update_layout(title=title, xaxis_title="input channel", yaxis_type="log", height=320,
                         legend={"orientation": "h", "y": -0.3})
    column.plotly_chart(figure, width="stretch")
sqnr_columns = st.columns(2)
sqnr_columns[0].metric("W8A8 SQNR before smoothing", f"{view['sqnr_before_db']:.1f} dB")
sqnr_columns[1].metric("W8A8 SQNR after smoothing", f"{view['sqnr_after_db']:.1f} dB",
                       delta=f"{view['sqnr_after_db'] - view['sqnr_before_db']:+.1f} dB")

# ---- heatmap ----------------------------------------------------------------------------------
st.header("Activation ranges by layer and channel")
ranges = sq.activation_ranges(model, calibration)
width = st.radio("Inputs of width", sorted(ranges), horizontal=True, key="sq_width",
                 format_func=lambda w: f"{w} channels ({len(ranges[w][0])} inputs)")
labels, matrix = ranges[width]
heatmap = go.Figure(go.Heatmap(z=np.log10(np.maximum(matrix, sq.EPS)), y=labels, colorscale="Viridis",
                               colorbar={"title": "log10 max|X|"},
                               hovertemplate="%{y} · channel %{x}<br>log10 max|X| = %{z:.2f}<extra></extra>"))
heatmap.update_layout(xaxis_title="channel", height=max(300, 22 * len(labels)), yaxis_autorange="reversed")
st.plotly_chart(heatmap, width="stretch")
st.caption("Bright vertical lines are outlier channels: the same channel is large in every layer that reads "
           "the residual stream.")

# ---- where s went ------------------------------------------------------------------------------
st.header("Where each layer's factor went")
st.caption("In a post-LayerNorm encoder the LayerNorm output is also the residual stream, so 1/s cannot be folded "
           "into it: q/k/v (one shared divisor) and ffn-in get an explicit input scale; attention-out's 1/s is "
           "folded into the value projection's output rows (softmax(QKᵀ)V is linear in V); ffn-out follows GELU "
           "and the head follows tanh/ReLU: explicit scales. The word embeddings are not smoothed (no activation "
           "goes into them). SQNR: each layer's W8A8 output against FP32 on the calibration activations.")
st.dataframe(sq.sqnr_table(model, calibration, plan), hide_index=True, width="stretch",
             column_config={"sqnr_before_db": st.column_config.NumberColumn("SQNR before (dB)", format="%.1f"),
                            "sqnr_after_db": st.column_config.NumberColumn("SQNR after (dB)", format="%.1f")})
