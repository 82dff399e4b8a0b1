"""SmoothQuant: see the activation outliers, move alpha, watch W8A8 accuracy respond.

The page opens on what is cheap or known: calibration statistics, the outlier view and, where a sweep or
per-layer search is cached, the best alpha found; evaluations run when asked for, with their cost
estimated from this set's measured FP32 pass, on a quick sample first if the person wants.
"""

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from streamlit.errors import StreamlitAPIException

from app_pages import common, page_state
from cache import keys, lookup, remember, results
from engine.analysis import smoothquant as sq
from engine.analysis.smoothquant_export import export
from engine.core.plan import Plan
from engine.core.stats import paired_gain
from engine.core.vocabulary import ActScheme
from engine.evaluation.evaluator import RunSummary
from engine.quant.smoothing import EPS

ACTS = {ActScheme.STATIC: "static · per-tensor scale calibrated on held-out rows",
        ActScheme.TOKEN: "dynamic · per-token scales at run time",
        ActScheme.DYNAMIC: "dynamic · per-tensor (torch's CPU kernel)"}
SWEEP_ACTS = (ActScheme.STATIC, ActScheme.TOKEN)
state = st.session_state


def known_best(evaluator, calib: int, act: str) -> float | None:
    """The best alpha a cached sweep found for this set, activation scheme and calibration, if any."""
    sweep = lookup(keys.smoothquant(evaluator, "sweep", calib=calib, grid=sq.ALPHA_GRID, acts=SWEEP_ACTS))
    if sweep and act in sweep:
        return float(sq.best_row(sweep[act])["alpha"])
    return None


def evaluated(evaluator, plan: Plan, label: str) -> RunSummary:
    """The plan's figures on the evaluator's set, kept under the layer map's key (cache.keys.evaluation) so a plan
    sent from either page to the other is evaluated once: from the cache, or one queued evaluation with a live
    estimate."""
    bar = st.empty()

    def show(p) -> None:
        bar.progress(p.done / p.total,
                     text=f"{label}: {p.done}/{p.total} · running accuracy {common.fmt_ci(p.accuracy, p.ci95)}")

    summary = common.cached_job(
        keys.evaluator_evaluation(evaluator, plan), f"Evaluating {label}",
        lambda progress: evaluator.run(plan, progress=progress, cancelled=progress.cancelled)[0].summary().to_json(),
        kind="smoothquant", show_progress=show, read=RunSummary.from_json)
    bar.empty()
    return summary


def metric(evaluator, column, title: str, result, base=None) -> None:
    comparison = result.comparison
    column.markdown(f"**{title}**")
    column.metric(f"Accuracy (n = {comparison.n:,})", f"{comparison.accuracy:.1%}", help="95% Wilson interval below")
    column.caption(f"95% CI [{comparison.ci95[0]:.1%}, {comparison.ci95[1]:.1%}]")
    if base is not None:
        difference, interval = paired_gain(evaluator.labels, base.predictions, result.predictions)
        column.caption(f"vs W8A8 without smoothing: {difference:+.1%} [{interval[0]:+.1%}, {interval[1]:+.1%}] "
                       "(paired bootstrap 95%)")
    column.caption(f"agreement with FP32 {comparison.agreement:.1%} · {comparison.flips} flips · "
                   f"KL {comparison.kl:.2e} nats")


def controls(evaluator) -> tuple[str, float, int, bool]:
    columns = st.columns([2, 3, 1.5, 1.5])  # the narrow columns still fit their labels at 1400 px
    act = columns[0].radio("Activation scales", list(ACTS), format_func=ACTS.get, key="sq_act")
    calib = columns[2].selectbox("Calibration sentences", (32, 64, 128, 256), index=2, key="sq_calib",
                                 help=f"from {evaluator.dataset.calibration_source or 'no calibration rows'}, "
                                      "never the evaluated rows; fixed seed")
    best = known_best(evaluator, calib, act)
    if "sq_alpha" not in state or state.get("sq_alpha_for") != (act, calib):
        state["sq_alpha"] = best if best is not None else 0.75  # the best measured on the embedded model
        state["sq_alpha_for"] = (act, calib)
    alpha = columns[1].slider("α (migration strength)", 0.0, 1.0, step=0.05, key="sq_alpha",
                              help="0: the weights are flattened (max|W| = 1 per channel) and the activations keep "
                                   "all the difficulty; 1: the activations are flattened (max|X| = 1 per channel)")
    columns[1].caption("Opened at the best α of this set's cached sweep." if best is not None else
                       "Opened at α = 0.75, the best measured on the embedded model; run the sweep below for this "
                       "set's own.")
    quick = columns[3].toggle(f"Quick: first {common.QUICK_SAMPLE}", value=len(evaluator.labels) > common.QUICK_SAMPLE,
                              key="sq_quick",
                              help="evaluate the first sentences only, to look before paying for the whole set")
    return act, alpha, calib, quick


def evaluation_panel(evaluator, act: str, alpha: float, calib: int) -> None:
    plan = sq.smoothed_plan(alpha, act, calib)
    estimate = 2 * evaluator.baseline.seconds
    known = all(results.cached_evaluation(evaluator, p) is not None for p in (plan, sq.smoothed_plan(None, act, calib)))
    if not known and not st.button(f"Evaluate W8A8 with and without smoothing at α = {alpha:.2f} "
                                   f"(about {estimate:.0f} s)", type="primary", key="sq_evaluate"):
        return
    w8a8 = evaluated(evaluator, sq.smoothed_plan(None, act, calib), "W8A8 without smoothing")
    smoothed = evaluated(evaluator, plan, f"SmoothQuant α = {alpha:.2f}")
    columns = st.columns(3)
    metric(evaluator, columns[0], "FP32", evaluator.baseline)
    metric(evaluator, columns[1], f"W8A8 ({act})", w8a8)
    metric(evaluator, columns[2], f"W8A8 + SmoothQuant α = {alpha:.2f}", smoothed, base=w8a8)
    with st.expander("Check the invariant: smoothing alone leaves FP32's logits unchanged"):
        if st.button("Check at this α", key="sq_invariant"):
            # The logits themselves are not kept (a summary holds each row's class): the one figure is.
            difference = common.cached_job(
                keys.smoothquant(evaluator, "invariant", alpha=alpha, calib=calib, batch=evaluator.batch_size),
                "Checking the invariant", lambda _progress: sq.max_logit_diff(evaluator, alpha, calib),
                kind="smoothquant")
            (st.success if difference < 1e-4 else st.error)(
                f"max |logit(smoothed, FP32 weights) − logit(FP32)| = {difference:.2e} over "
                f"{len(evaluator.labels):,} examples (float error; the bound is 1e-4)")


def actions(evaluator, model, calibration, act: str, alpha: float, calib: int) -> None:
    plan = sq.smoothed_plan(alpha, act, calib)
    columns = st.columns(2)
    if columns[0].button("Send this plan to the layer map", key="sq_send",
                         help="the layer map starts from uniform W8A8 with this smoothing; toggle layers from there"):
        if page_state.send_to_layer_map(plan):
            columns[0].success(f"Layer map plan: {plan.label()} (W8A8, {act}, α = {alpha:.2f})")
    columns[1].download_button(
        "Export smoothed W8A8 model (safetensors)", data=lambda: export(model, plan, calibration),
        file_name=f"smoothquant-a{alpha:.2f}-{act}.safetensors", mime="application/octet-stream", key="sq_export",
        help="simulated (quantize-dequantized) weights with each layer's in_scale; the plan, the static scales, "
             "the form of each layer and the calibration statistics are in the file's metadata")


def sweep_panel(evaluator, calib: int) -> None:
    st.header("Accuracy against α")
    key = keys.smoothquant(evaluator, "sweep", calib=calib, grid=sq.ALPHA_GRID, acts=SWEEP_ACTS)
    sweep = lookup(key)
    if sweep is None:
        runs = len(SWEEP_ACTS) * (len(sq.ALPHA_GRID) + 1)
        st.caption(f"{len(sq.ALPHA_GRID)} values of α (step 0.05) for static and per-token scales: {runs} "
                   f"evaluations of {len(evaluator.labels):,} sentences, about {runs * evaluator.baseline.seconds:.0f} "
                   "s from this set's measured FP32 pass. Each is stored for every session once done.")
        if not st.button("Run the sweep", key="sq_sweep", type="primary"):
            return
        bar = st.progress(0.0, text="Sweeping α…")

        def compute():
            rows = {}
            for index, scheme in enumerate(SWEEP_ACTS):
                def progress(fraction, text, index=index, scheme=scheme):
                    bar.progress((index + fraction) / len(SWEEP_ACTS), text=f"{ACTS[scheme]}: {text}")
                rows[scheme] = sq.alpha_rows(evaluator, sq.ALPHA_GRID, scheme, calib, invariant=False,
                                             progress=progress, run=lambda p: evaluated(evaluator, p, "sweep"))
            return rows
        sweep = remember(key, compute)
        bar.empty()
    figure = go.Figure()
    colors = {ActScheme.STATIC: "#e6550d", ActScheme.TOKEN: "#3182bd"}
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
    figure.update_layout(xaxis_title="α", yaxis_title="accuracy", yaxis_tickformat=".1%", height=420,
                         legend={"orientation": "h", "y": -0.2})
    st.plotly_chart(figure, width="stretch")
    for scheme, rows in sweep.items():
        best = sq.best_row(rows)
        st.markdown(f"**{ACTS[scheme]}**: best α = {best['alpha']:.2f}, "
                    f"{common.fmt_ci(best['accuracy'], best['ci95'])} against "
                    f"{common.fmt_ci(best['w8a8_accuracy'], best['w8a8_ci95'])} without smoothing; gain "
                    f"{best['gain']:+.1%} [{best['gain_ci95'][0]:+.1%}, {best['gain_ci95'][1]:+.1%}]"
                    + (" — the interval includes 0: not a measurable gain." if best["gain_ci95"][0] <= 0 else "."))
    st.caption("Shaded: 95% Wilson intervals. Where the curve sits inside its neighbours' intervals, the choice "
               "between those α is noise.")


def auto_panel(evaluator, model, calibration, act: str, calib: int) -> None:
    st.header("Automatic α per layer")
    st.caption("For each group of layers reading one input (q/k/v together, since they share one divisor), the α in "
               f"0…1 (step 0.05) that minimizes the group's W8A8 output error on the calibration activations "
               f"({ACTS[act]}). Cheap: no evaluation of the set.")
    key = keys.smoothquant(evaluator, "auto", calibration=calibration.key, act=act, grid=sq.ALPHA_GRID)
    bar = st.empty()
    alphas = common.cached_job(key, "Searching α per layer", lambda progress: sq.auto_alphas(
        model, calibration, act, progress=progress), kind="smoothquant",
        ask=lambda: st.button("Find α per layer", key="sq_auto"),
        show_progress=lambda done: bar.progress(done, text="Searching α…"))
    bar.empty()
    if alphas is None:
        return
    roles = {layer.name: layer.role for layer in evaluator.layers}
    names = list(alphas)
    bars = go.Figure(go.Bar(x=names, y=[alphas[n] for n in names], hovertext=[roles[n] for n in names]))
    bars.update_layout(yaxis_title="α", yaxis_range=[0, 1.05], xaxis_tickangle=-60, height=380,
                       xaxis={"tickfont": {"size": 9}})
    st.plotly_chart(bars, width="stretch")
    auto_plan = sq.smoothed_plan(alphas, act, calib)
    if st.button(f"Evaluate the per-layer plan (about {evaluator.baseline.seconds:.0f} s)", key="sq_auto_eval"):
        metric(evaluator, st.columns(3)[0], "W8A8 + per-layer α", evaluated(evaluator, auto_plan, "per-layer α"),
               base=evaluated(evaluator, sq.smoothed_plan(None, act, calib), "W8A8 without smoothing"))
    if st.button("Send the per-layer plan to the layer map", key="sq_send_auto"):
        if page_state.send_to_layer_map(auto_plan):
            st.success(f"Layer map plan: {auto_plan.label()}")


def outliers_panel(model, calibration, alpha: float, act: str, calib: int) -> None:
    st.header("Outliers of one layer")
    linear_names = list(calibration.low)
    chosen = st.selectbox("Layer", linear_names, index=linear_names.index(sq.most_outlying(calibration)),
                          key="sq_layer", help="preselected: the input with the largest max/median channel range")
    view = sq.outlier_view(model, calibration, chosen, alpha, act)
    st.caption(f"{view['role']} · {view['form']} · α = {alpha:.2f}")
    columns = st.columns(2)
    for column, (kind, title) in zip(columns, (("x", "Input: max|X| per channel"),
                                               ("w", "Weight: max|W| per input channel"))):
        figure = go.Figure()
        channels = np.arange(len(view[f"{kind}_before"]))
        figure.add_trace(go.Scatter(x=channels, y=view[f"{kind}_before"], mode="lines", name="before"))
        figure.add_trace(go.Scatter(x=channels, y=view[f"{kind}_after"], mode="lines",
                                    name=f"after (α = {alpha:.2f})"))
        figure.update_layout(title=title, xaxis_title="input channel", yaxis_type="log", yaxis_dtick=1, height=320,
                             legend={"orientation": "h", "y": -0.3})
        column.plotly_chart(figure, width="stretch")
    sqnr = st.columns(2)
    sqnr[0].metric("W8A8 SQNR before smoothing", f"{view['sqnr_before_db']:.1f} dB")
    sqnr[1].metric("W8A8 SQNR after smoothing", f"{view['sqnr_after_db']:.1f} dB",
                   delta=f"{view['sqnr_after_db'] - view['sqnr_before_db']:+.1f} dB")
    if st.button("See where the error enters, on the layer map", key="sq_error_map",
                 help="opens the layer map on this smoothed W8A8 plan, its cells coloured by the error each layer "
                      f"puts in: {chosen} among them"):
        plan = sq.smoothed_plan(alpha, act, calib)
        if not page_state.send_to_layer_map(plan):
            return
        state["lm_overlay"] = "local"
        try:
            st.switch_page("app_pages/layer_map.py")
        except StreamlitAPIException:
            st.success("Sent: open the layer map page, where the cells are coloured by each layer's error.")


def heatmap_panel(model, calibration) -> None:
    st.header("Activation ranges by layer and channel")
    ranges = sq.activation_ranges(model, calibration)
    width = st.radio("Inputs of width", sorted(ranges), horizontal=True, key="sq_width",
                     format_func=lambda w: f"{w} channels ({len(ranges[w][0])} inputs)")
    labels, matrix = ranges[width]
    heatmap = go.Figure(go.Heatmap(z=np.log10(np.maximum(matrix, EPS)), y=labels, colorscale="Viridis",
                                   colorbar={"title": "log10 max|X|"},
                                   hovertemplate="%{y} · channel %{x}<br>log10 max|X| = %{z:.2f}<extra></extra>"))
    heatmap.update_layout(xaxis_title="channel", height=max(300, 22 * len(labels)), yaxis_autorange="reversed")
    st.plotly_chart(heatmap, width="stretch")
    st.caption("Bright vertical lines are outlier channels: the same channel is large in every layer that reads "
               "the residual stream.")


def forms_panel(model, calibration, plan: Plan) -> None:
    st.header("Where each layer's factor went")
    st.caption("Folded into a norm where the norm feeds only that layer group (pre-LN decoders: the residual takes "
               "the norm's input); into V's output rows for the attention output (softmax(QKᵀ)V is linear in V); "
               "into the up projection for a gated MLP's down projection; otherwise an explicit divide of the input "
               "(post-LN encoders, whose LayerNorm output is also the residual stream, and inputs after GELU). Every "
               "fold was checked to leave this model's FP32 logits unchanged before it was used. SQNR: each layer's "
               "W8A8 output against FP32 on the calibration activations.")
    st.dataframe(sq.sqnr_table(model, calibration, plan), hide_index=True, width="stretch",
                 column_config={"sqnr_before_db": st.column_config.NumberColumn("SQNR before (dB)", format="%.1f"),
                                "sqnr_after_db": st.column_config.NumberColumn("SQNR after (dB)", format="%.1f")})


common.plan_note()
st.markdown("A few input channels carry activations tens of times larger than the rest, and one int8 scale per "
            "tensor spends its range on them. SmoothQuant divides each input channel by **s = max|X|^α / "
            "max|W|^(1−α)** and multiplies the weight by the same s: the float model is unchanged, the difficulty "
            "moves into the per-channel int8 weights. Move α and watch W8A8 accuracy respond.")
full = common.safe_evaluator()
if full is None:
    st.stop()
model, tokenizer = common.model_and_tokenizer()
act, alpha, calib, quick = controls(full)
evaluator = common.evaluator_for(full.dataset.head(common.QUICK_SAMPLE)) if quick else full
if not full.dataset.calibration:
    st.error("This set has no calibration rows (too small to hold any out), so static scales and SmoothQuant "
             "cannot be calibrated on it; choose a larger set.")
    st.stop()
with st.spinner(f"Calibrating on {calib} held-out sentences…"):
    calibration = sq.calibration_for(full, calib)
st.caption(f"Calibrated on {calibration.n} sentences ({calibration.tokens:,} tokens) from "
           f"{full.dataset.calibration_source}; evaluating {len(evaluator.labels):,} sentences"
           + (" (quick sample)." if quick else "."))
evaluation_panel(evaluator, act, alpha, calib)
actions(evaluator, model, calibration, act, alpha, calib)
outliers_panel(model, calibration, alpha, act, calib)
sweep_panel(evaluator, calib)
auto_panel(evaluator, model, calibration, act, calib)
heatmap_panel(model, calibration)
forms_panel(model, calibration, sq.smoothed_plan(alpha, act, calib))
