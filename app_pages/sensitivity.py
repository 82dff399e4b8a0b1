"""Sensitivity & search: which layers can take INT4 (by round-to-nearest, or rescued by GPTQ, AWQ or HQQ), and
the smallest plan that meets a budget."""
from __future__ import annotations

import math
import time
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.errors import StreamlitAPIException

from app_pages import cluster, common, deployment, methods_view, page_state
from cache import keys, results
from engine.analysis import methods as mth
from engine.analysis import search as amp
from engine.analysis import sensitivity as sens
from engine.core.errors import EngineError
from engine.core.plan import FP32
from engine.core.rules import DEFAULT_CALIB
from engine.grid.tasks import build_tasks
from engine.core.stats import SIGNIFICANCE
from engine.core.vocabulary import TIMING_TOKENS, BudgetKind, WeightMethod
from engine.model.families import ALL_ROLES

DIRECTION_TEXT = {"one": "only this layer quantized", "all-but-one": "every layer quantized but this one"}
BUDGET_TEXT = {BudgetKind.MAX_DROP: "maximum accuracy drop (points)",
               BudgetKind.NOT_WORSE: "not significantly worse than FP32",
               BudgetKind.TARGET_BYTES: "target size (MB)", BudgetKind.LATENCY_MS: "latency target (ms, batch 1)"}
OUTSIDE = "outside blocks"
CHUNK_S = {"one": 3.0, "all-but-one": 30.0}  # work per queued job, so other sessions' clicks get their turn
state = st.session_state


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def stop_sweep() -> None:
    state["sens_stop"] = True


def estimated_seconds(evaluator, missing: list[tuple], direction: str) -> float:
    """A sweep's cost from this set's measured FP32 pass: each row runs the model from its layer's cut, and a row
    by another method than RTN adds the method's own work on its layer at this machine's measured rate."""
    full, cuts = evaluator.baseline.seconds, evaluator.cuts
    last = max(evaluator.last_cut, 1)
    rows = sum((last - cuts[key[0]] + sens.HEAD_WORK) / last for key in missing) * full
    by_method = [(key[0], key[2]) for key in missing if len(key) == 3]  # sens.row_key: RTN's keys have two parts
    if by_method:
        layers, rate = {layer.name: layer for layer in evaluator.layers}, mth.machine_flops()
        rows += sum(mth.method_flops([layers[name]], method, DEFAULT_CALIB) for name, method in by_method) / rate
    return rows + (full * len({key[1] for key in missing}) if direction == "all-but-one" else 0.0)


def _tasks(evaluator, precisions, methods) -> list[tuple]:
    """Every row key of a sweep: (layer, precision[, method]) where the method applies."""
    return [sens.row_key(layer.name, p, m) for layer in evaluator.layers for p in precisions for m in methods
            if sens.applies(layer, p, m)]


def _missing(evaluator, precisions, direction: str, methods, known: dict | None = None) -> list[tuple]:
    """The rows of a sweep not stored yet."""
    known = results.known_rows(evaluator, precisions, direction, methods) if known is None else known
    return [key for key in _tasks(evaluator, precisions, methods) if key not in known]


def sweep_panel(evaluator, model, tokenizer, precisions, direction: str, methods, full=None) -> None:
    """Run / Stop with live progress; rows are computed in short queued jobs and stored as they finish. `full`: the
    whole set's evaluator when `evaluator` is a quick sample, whose sweep's cost is said beside the sample's."""
    if not precisions:
        st.info("Choose at least one precision.")
        return
    known = results.known_rows(evaluator, precisions, direction, methods)
    total = len(_tasks(evaluator, precisions, methods))
    missing = _missing(evaluator, precisions, direction, methods, known)
    buttons = st.columns([1, 1, 4])
    run = buttons[0].button("Resume sweep" if 0 < len(known) < total else "Run sweep", type="primary",
                            disabled=not missing, key="sens_run")
    buttons[1].button("Stop", on_click=stop_sweep, key="sens_stop_button",
                      help="stops after the row under way; finished rows are kept for every session")
    buttons[2].caption(f"{len(known)} of {total} rows done on {len(evaluator.labels):,} sentences "
                       f"({evaluator.dataset.name})"
                       + (f"; the rest will take about {fmt_seconds(estimated_seconds(evaluator, missing, direction))}"
                          if missing else "") + ". Each row is stored as soon as it is finished."
                       + (f" The whole set ({len(full.labels):,} sentences) would take about "
                          f"{fmt_seconds(estimated_seconds(full, whole, direction))}."
                          if full is not None and (whole := _missing(full, precisions, direction, methods))
                          else ""))
    if cluster.address() and missing:
        cluster_button(precisions, direction)
    if not run:
        if state.get("sens_stop") and missing:
            st.warning(f"Stopped: {len(known)} rows kept. Resume to compute the other {len(missing)}.")
        return
    state["sens_stop"] = False
    bar = st.progress(len(known) / total, text="Starting…")
    sqnr = results.sqnr_proxy(model, tokenizer, evaluator, sens.check_precisions(precisions))
    started, computed = time.perf_counter(), 0
    while len(known) < total and not state.get("sens_stop"):
        def work(progress):
            began = time.perf_counter()
            def enough() -> bool:
                return progress.cancelled() or time.perf_counter() - began > CHUNK_S[direction]

            return results.sweep(evaluator, precisions, direction, sqnr, enough, progress, methods=methods)

        def show(p) -> None:
            last = f" · last: {p.row.layer.split('.', 1)[-1]} {p.row.precision} {p.row.method}" if p.row else ""
            bar.progress(p.fraction, text=f"{p.done}/{p.total} rows · {fmt_seconds(time.perf_counter() - started)} "
                                          f"elapsed · about {fmt_seconds(p.eta_s)} left{last}")

        result = common.run_job("sensitivity", "Sweeping", work, show_progress=show)
        computed += result.computed
        known = results.known_rows(evaluator, precisions, direction, methods)
    state["sens_last_run"] = (computed, time.perf_counter() - started, bool(state.get("sens_stop")))
    st.rerun()


def cluster_button(precisions, direction: str) -> None:
    """The missing rows as grid tasks on the Ray cluster of RAY_ADDRESS; they land in this page's own rows."""
    reason = cluster.unavailable_reason([common.data_name()]) or (
        None if direction == "one" else "The cluster computes direction-one rows (each layer alone).")
    if st.button("Run on the cluster", disabled=reason is not None, key="sens_cluster",
                 help=reason or f"Every missing row as a task on the Ray cluster at {cluster.address()}"):
        try:
            tasks = build_tasks([common.model_name()], [common.data_name()], [], precisions, limit=state.get("limit"))
            cluster.run(tasks, "Sweeping on the cluster")
        except EngineError as error:
            st.error(f"The cluster could not run the sweep: {error}")
            return
        st.rerun()


# ---- views of the rows ---------------------------------------------------------------------------
def heatmap(evaluator, chosen: list[sens.Row], precision: str, direction: str) -> go.Figure:
    """Blocks by roles, colour = accuracy drop; the layers outside the blocks in a row of their own."""
    present = {r.role for r in chosen}
    columns = [role for role in ALL_ROLES if role in present]
    labels = [f"block {b}" for b in range(evaluator.stages.n_blocks)] + [OUTSIDE]
    z = [[None] * len(columns) for _ in labels]
    text = [[""] * len(columns) for _ in labels]
    hover = [["no layer here"] * len(columns) for _ in labels]
    for r in chosen:
        if r.precision != precision or r.direction != direction:
            continue
        y = labels.index(OUTSIDE if r.block is None else f"block {r.block}")
        x = columns.index(r.role)
        z[y][x] = r.drop
        text[y][x] = f"{r.drop:+.1f}"
        sqnr_text = "n/a" if r.sqnr_db is None or not math.isfinite(r.sqnr_db) else f"{r.sqnr_db:.1f} dB"
        hover[y][x] = (f"{r.layer}<br>accuracy {common.fmt_ci(r.accuracy, r.ci95)}<br>drop {r.drop:+.2f} points"
                       f"<br>flips {r.flips} · KL {r.kl:.2e} · McNemar p {r.mcnemar_p:.3f}<br>SQNR {sqnr_text}")
    limit = max([abs(v) for line in z for v in line if v is not None] + [0.1])
    figure = go.Figure(go.Heatmap(z=z, x=columns, y=labels, text=text, texttemplate="%{text}", hovertext=hover,
                                  hovertemplate="%{hovertext}<extra></extra>", colorscale="RdBu_r", zmid=0,
                                  zmin=-limit, zmax=limit, colorbar={"title": "drop (points)"}, xgap=2, ygap=2))
    figure.update_layout(title=f"{precision.upper()} · {direction}", yaxis_autorange="reversed", height=360,
                         margin={"t": 50, "b": 20})
    return figure


def heatmaps_section(evaluator, rows_by_direction: dict, precisions) -> None:
    baseline = evaluator.baseline.comparison
    available = [(d, p) for d in sens.DIRECTIONS for p in precisions
                 if any(r.precision == p for r in rows_by_direction[d].values())]
    if not available:
        st.info("No rows yet: run the sweep above.")
        return
    st.header("Heatmaps")
    st.caption("Colour: accuracy points lost against FP32 "
               f"({common.fmt_ci(baseline.accuracy, baseline.ci95)}); red = worse. Hover for the interval, "
               f"flips, KL and McNemar's p. One sentence is {100 / baseline.n:.2f} points on this set.")
    figures = st.columns(min(2, len(available)))
    for i, (d, p) in enumerate(available):
        figures[i % len(figures)].plotly_chart(heatmap(evaluator, list(rows_by_direction[d].values()), p, d),
                                               width="stretch", key=f"sens_heat_{d}_{p}")


def ranked_section(rows: list[sens.Row]) -> None:
    st.header("Ranked")
    rescued = methods_view.rescue_words(rows)
    table = pd.DataFrame([{"layer": r.layer, "precision": r.precision, "method": r.method.value.upper(),
                           "rescued by": rescued.get((r.layer, r.precision), "") if r.method == WeightMethod.RTN
                           else "", "drop (points)": r.drop,
                           "accuracy": r.accuracy, "95% CI": f"[{r.ci95[0]:.1%}, {r.ci95[1]:.1%}]",
                           "flips": r.flips, "KL (nats)": r.kl, "McNemar p": r.mcnemar_p,
                           "SQNR (dB)": r.sqnr_db, "significant": r.mcnemar_p < SIGNIFICANCE} for r in rows])
    table = table.sort_values(["drop (points)", "KL (nats)"], ascending=False)
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        "accuracy": st.column_config.NumberColumn(format="percent"),
        "drop (points)": st.column_config.NumberColumn(format="%.2f"),
        "KL (nats)": st.column_config.NumberColumn(format="%.2e"),
        "McNemar p": st.column_config.NumberColumn(format="%.3f"),
        "SQNR (dB)": st.column_config.NumberColumn(format="%.1f")})
    significant = int(table["significant"].sum())
    st.caption(f"{significant} of {len(rows)} rows differ from FP32 at McNemar's {SIGNIFICANCE:.0%} level (no "
               f"correction for {len(rows)} tests: expect about {SIGNIFICANCE * len(rows):.0f} by chance when "
               "nothing differs)."
               + (" Rescued by: the cheapest swept method (HQQ, then AWQ, then GPTQ) whose row of a layer that RTN "
                  "changes significantly is within noise." if rescued else ""))


def proxy_section(rows: list[sens.Row], precisions) -> None:
    st.header("Cheap proxy against the measurement")
    rows = [r for r in rows if r.method == WeightMethod.RTN]  # the proxy is RTN's
    agreement = sens.proxy_agreement(rows)
    scatter = go.Figure()
    for precision in precisions:
        chosen = [r for r in rows if r.precision == precision and r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
        scatter.add_trace(go.Scatter(
            x=[r.sqnr_db for r in chosen], y=[max(r.kl, 1e-12) for r in chosen], mode="markers",
            name=precision.upper(), marker={"color": common.PRECISION_COLORS[precision], "size": 9,
                                            "line": {"color": "#333", "width": 1}},
            hovertext=[f"{r.layer}<br>drop {r.drop:+.2f} points" for r in chosen]))
    scatter.update_layout(xaxis_title=f"layer output SQNR on {sens.PROXY_SENTENCES} calibration sentences (dB)",
                          yaxis_title="end-to-end KL against FP32 (nats, log)", yaxis_type="log", yaxis_dtick=1,
                          yaxis_exponentformat="power", height=420)
    st.plotly_chart(scatter, width="stretch", key="sens_scatter")
    if agreement:
        st.markdown(" · ".join(f"**{name}**: Spearman ρ = {a['rho']:+.2f} (p = {a['p']:.2g}, n = {a['n']})"
                               for name, a in agreement.items()))
        st.caption("A useful proxy has ρ near −1 (higher SQNR, smaller KL). The proxy costs seconds for every "
                   "layer; where ρ is weak, trust the measured rows.")


def blocks_section(rows: list[sens.Row], precisions) -> None:
    st.header("Per block")
    summary = pd.DataFrame(sens.block_summary(rows))
    bars = go.Figure()
    for precision in precisions:
        part = summary[summary["precision"] == precision]
        bars.add_trace(go.Bar(x=part["group"], y=part["mean_drop"], name=precision.upper(),
                              marker_color=common.PRECISION_COLORS[precision],
                              hovertext=[f"worst {w:+.2f} · mean KL {k:.2e}" for w, k in
                                         zip(part["max_drop"], part["mean_kl"])]))
    bars.update_layout(barmode="group", yaxis_title="mean drop (points)", height=340)
    st.plotly_chart(bars, width="stretch", key="sens_blocks")


# ---- the search ------------------------------------------------------------------------------------
def search_section(evaluator, model, tokenizer, single: dict) -> amp.SearchOutcome | None:
    """The budget controls and the search's outcome (from the cache, or run through the queue)."""
    st.header("Search: the smallest plan for a budget")
    names = [layer.name for layer in evaluator.layers]
    if not all((n, p) in single for n in names for p in sens.SWEEP_PRECISIONS):
        st.info("The search builds on the single-layer sweep at both INT8 and INT4: run it above "
                f"(direction one, both precisions; {len(single)} of {2 * len(names)} rows done).")
        return None
    fp32_bytes = results.size(model, FP32)
    controls = st.columns([2, 2, 1])
    kind = controls[0].radio("Budget", list(BudgetKind), format_func=BUDGET_TEXT.get, key="sens_budget")
    value: float | None = None
    if kind == BudgetKind.MAX_DROP:
        value = controls[1].number_input("Points", 0.0, 100.0, 1.0, 0.1, key="sens_drop")
    elif kind == BudgetKind.TARGET_BYTES:
        value = controls[1].number_input("MB", 0.1, fp32_bytes / 1e6, round(fp32_bytes / 4e6, 1), 0.5,
                                         key="sens_mb") * 1e6
    elif kind == BudgetKind.LATENCY_MS:
        value = controls[1].number_input("ms", 0.1, 10000.0, 20.0, 1.0, key="sens_ms")
    measure_latency = controls[2].checkbox("Time the front", value=True, key="sens_latency",
                                           help=f"real kernels, batch 1, {TIMING_TOKENS} tokens, after warm-up")
    budget = amp.Budget(kind, value)
    key = keys.search(evaluator, [kind, value], measure_latency or kind == BudgetKind.LATENCY_MS, amp.LADDER,
                      amp.MAX_REFINE)

    def ask() -> bool:
        if st.button("Search", type="primary", key="sens_search"):
            return True
        st.caption("Every candidate plan is evaluated for real (about 20 evaluations of the set, "
                   f"~{fmt_seconds(20 * evaluator.baseline.seconds)}); the result is stored for every session.")
        return False

    def work(progress) -> dict:
        try:
            return amp.search(evaluator, model, tokenizer, list(single.values()), budget, latency=measure_latency,
                              progress=progress).to_json()
        except amp.SearchError as error:
            return {"error": str(error)}  # stored too: the same budget is refused at once next time

    bar = st.empty()
    outcome = common.cached_job(
        key, "Searching", work, kind="search", ask=ask,
        read=lambda stored: stored["error"] if "error" in stored else amp.SearchOutcome.from_json(stored),
        show_progress=lambda p: bar.progress(min(p[1] / 30, 0.99), text=f"{p[1]} plans verified · {p[0]}"))
    bar.empty()
    if isinstance(outcome, str):  # the search's refusal, stored too
        st.error(outcome)
        return None
    return outcome


def error_bars(points: list[amp.Candidate]) -> dict:
    return {"type": "data", "symmetric": False, "array": [p.ci95[1] - p.accuracy for p in points],
            "arrayminus": [p.accuracy - p.ci95[0] for p in points], "thickness": 1}


def outcome_section(outcome: amp.SearchOutcome) -> None:
    chosen = outcome.chosen
    st.success(f"Chosen for '{outcome.budget.describe()}': {chosen.size_bytes / 1e6:.2f} MB, accuracy "
               f"{common.fmt_ci(chosen.accuracy, chosen.ci95)}, drop {chosen.drop:+.2f} points "
               f"(McNemar p = {chosen.mcnemar_p:.3f}); "
               + ", ".join(f"{n} {p.upper()}" for p, n in sorted(chosen.layers.items())) + ".")
    deployment.export_button(chosen.plan, "searched plan", "search")
    int8 = outcome.references["int8"]
    st.caption(f"{len(outcome.candidates)} plans verified in {outcome.seconds:.0f} s. Uniform INT8 is "
               f"{int8.size_bytes / 1e6:.2f} MB at {common.fmt_ci(int8.accuracy, int8.ci95)}.")
    pareto = go.Figure()
    others, front = outcome.candidates, outcome.front
    pareto.add_trace(go.Scatter(x=[c.size_bytes / 1e6 for c in others], y=[c.accuracy for c in others],
                                mode="markers", name="verified candidates", marker={"color": "#bbbbbb", "size": 7},
                                hovertext=[c.source for c in others]))
    pareto.add_trace(go.Scatter(x=[c.size_bytes / 1e6 for c in front], y=[c.accuracy for c in front],
                                mode="lines+markers", name="Pareto front", line={"color": "#3182bd"},
                                error_y=error_bars(front), hovertext=[c.source for c in front]))
    for name, reference in outcome.references.items():
        pareto.add_trace(go.Scatter(x=[reference.size_bytes / 1e6], y=[reference.accuracy],
                                    mode="markers+text", name=f"uniform {name.upper()}", text=[name.upper()],
                                    textposition="top center",
                                    marker={"symbol": "diamond", "size": 13, "color": common.PRECISION_COLORS[name],
                                            "line": {"color": "black", "width": 1}}))
    pareto.add_trace(go.Scatter(x=[chosen.size_bytes / 1e6], y=[chosen.accuracy], mode="markers",
                                name="chosen", marker={"symbol": "star", "size": 18, "color": "#31a354"}))
    pareto.update_layout(xaxis_title="size (MB, serialized with real kernels)", yaxis_title="accuracy",
                         yaxis_tickformat=".1%", height=440)
    st.plotly_chart(pareto, width="stretch", key="sens_pareto")
    st.subheader("Errors compound")
    columns = st.columns(2)
    columns[0].plotly_chart(compounding_chart(others, lambda c: (c.predicted_drop, c.drop), "accuracy drop (points)",
                                              False), width="stretch", key="sens_compounding")
    columns[1].plotly_chart(compounding_chart(others, lambda c: (c.predicted_kl, c.kl), "KL (nats, log)", True),
                            width="stretch", key="sens_compounding_kl")
    st.caption("Above the dotted line, a plan lost more than its layers did one at a time. Single-layer drops are "
               "mostly a sentence or two either way (noise), so their sum predicts little; the KL, which counts "
               "every change in confidence, shows the compounding more clearly.")
    timed = outcome.latency_front
    if timed:
        latency = go.Figure(go.Scatter(x=[c.latency_ms_p50 for c in timed], y=[c.accuracy for c in timed],
                                       mode="lines+markers", error_y=error_bars(timed),
                                       hovertext=[f"{c.size_bytes / 1e6:.1f} MB" for c in timed]))
        latency.update_layout(title="Latency against accuracy (front plans)", xaxis_title="latency p50 (ms, batch 1)",
                              yaxis_title="accuracy", yaxis_tickformat=".1%", height=380)
        st.plotly_chart(latency, width="stretch", key="sens_latency_chart")
        st.caption("Latency is measured on this machine's real torch kernels (INT4 is unpacked per call on CPU, so "
                   "it saves bytes, not time; ONNX Runtime runs it with a real int4 kernel).")
    front_plans(front)


def compounding_chart(plans_seen: list[amp.Candidate], effect: Callable[[amp.Candidate], tuple[float, float]],
                      unit: str, log: bool) -> go.Figure:
    """Each verified plan's measured effect against the sum of its layers' single-layer effects; `effect` gives a
    plan's (sum, measured)."""
    plans = [c for c in plans_seen if not log or min(effect(c)) > 0]
    summed, measured = [effect(c)[0] for c in plans], [effect(c)[1] for c in plans]
    values = summed + measured
    figure = go.Figure(go.Scatter(x=summed, y=measured, mode="markers",
                                  marker={"size": 9, "color": "#3182bd"}, name="verified plans",
                                  hovertext=[f"{c.source} · {c.size_bytes / 1e6:.1f} MB" for c in plans]))
    if values:
        span = [min(values), max(values)]
        figure.add_trace(go.Scatter(x=span, y=span, mode="lines", line={"dash": "dot", "color": "gray"},
                                    name="measured = sum"))
    figure.update_layout(xaxis_title=f"sum of the layers' single-layer {unit}", yaxis_title=f"measured {unit}",
                         xaxis_type="log" if log else "linear", yaxis_type="log" if log else "linear",
                         height=380, showlegend=False)
    if log:
        figure.update_xaxes(dtick=1, exponentformat="power")
        figure.update_yaxes(dtick=1, exponentformat="power")
    return figure


def front_plans(front: list[amp.Candidate]) -> None:
    st.subheader("Front plans")
    for i, candidate in enumerate(front):
        line = st.columns([4, 1])
        counts = ", ".join(f"{n} {p.upper()}" for p, n in sorted(candidate.layers.items()))
        latency_text = "" if candidate.latency_ms_p50 is None else f" · {candidate.latency_ms_p50:.1f} ms"
        line[0].markdown(f"**{candidate.size_bytes / 1e6:.2f} MB** · "
                         f"{common.fmt_ci(candidate.accuracy, candidate.ci95)}"
                         f" · drop {candidate.drop:+.2f} (sum of single drops {candidate.predicted_drop:+.2f})"
                         f"{latency_text} · {counts}")
        if line[1].button("Open in layer map", key=f"sens_apply_{i}"):
            if not page_state.send_to_layer_map(candidate.plan):
                continue
            try:
                st.switch_page("app_pages/layer_map.py")
            except StreamlitAPIException:
                line[1].success("Sent: open the layer map page.")


# ---- the page ---------------------------------------------------------------------------------------
common.plan_note()
st.markdown(
    "Which layers can take INT4? Each layer is quantized **alone** (or every layer **but** it) and the whole "
    "set is evaluated: accuracy with its 95% interval, flips against FP32, KL and McNemar's p. Single-layer "
    "drops are small, often smaller than their interval: read the intervals before the colours. The search then "
    "builds mixed plans from the sweep, **verifies every candidate by a real evaluation**, and shows the "
    "Pareto front of size against accuracy."
)
full = common.safe_evaluator()
if full is None:
    st.stop()
model, tokenizer = common.model_and_tokenizer()
st.header("Sweep")
controls = st.columns([2, 3])
quick = st.toggle(f"Quick: first {common.QUICK_SAMPLE}", value=len(full.labels) > common.QUICK_SAMPLE, key="sens_quick",
                  help="sweep and search on the first sentences only, to look before paying for the whole set; its "
                       "rows are stored apart")
evaluator = common.evaluator_for(full.dataset.head(common.QUICK_SAMPLE)) if quick else full
precisions = controls[0].multiselect("Precisions", sens.SWEEP_PRECISIONS, default=list(sens.SWEEP_PRECISIONS),
                                     key="sens_precisions")
direction = controls[1].radio("Direction", sens.DIRECTIONS, horizontal=True, key="sens_direction",
                              format_func=lambda d: f"{d}: {DIRECTION_TEXT[d]}")
chosen_methods = st.multiselect("Methods", list(WeightMethod), default=[WeightMethod.RTN], key="sens_methods",
                                format_func=lambda m: m.value.upper(),
                                help="each Linear also measured by these weight methods where they take the "
                                     "precision (GPTQ and HQQ: INT4), one layer at a time; RTN is always swept")
methods = tuple(dict.fromkeys([WeightMethod.RTN, *chosen_methods])) if direction == "one" else (WeightMethod.RTN,)
if direction != "one" and set(chosen_methods) - {WeightMethod.RTN}:
    st.caption("Methods other than RTN are swept one layer at a time (direction one); this sweep is RTN's.")
sweep_panel(evaluator, model, tokenizer, precisions, direction, methods, full if quick else None)
if "sens_last_run" in state:
    computed, seconds, stopped = state["sens_last_run"]
    if computed:
        st.caption(f"Last run: {computed} rows in {seconds:.0f} s ({seconds / computed:.1f} s a row)"
                   + (", stopped." if stopped else "."))
rows_by_direction = {d: results.known_rows(evaluator, sens.SWEEP_PRECISIONS, d) for d in sens.DIRECTIONS}
rows = [r for r in results.known_rows(evaluator, sens.SWEEP_PRECISIONS, direction, methods).values()
        if r.precision in precisions]
heatmaps_section(evaluator, rows_by_direction, precisions)
if rows:
    ranked_section(rows)
    proxy_section(rows, precisions)
    blocks_section(rows, precisions)
outcome = search_section(evaluator, model, tokenizer, rows_by_direction["one"])
if outcome is not None:
    outcome_section(outcome)
