"""The comparison page's methods view: INT4 by RTN, GPTQ, AWQ and HQQ at several group sizes, and W8A8 with
static activation ranges from each calibrator, each with its interval and McNemar's test against its plain
choice (RTN, minmax); and how W8A8-static accuracy moves with the number of calibration texts.

Figures from engine.analysis.methods, run through the server's queue and kept on disk like the comparison's.
The table and chart builders are plain functions of the stored rows (tests call them without a page), and so
are the sensitivity page's "rescued by" words.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import common
from cache import keys
from engine.analysis import methods as mth
from engine.analysis.sensitivity import rescued_by
from engine.core.errors import EngineError
from engine.core.rules import METHOD_PRECISIONS
from engine.core.stats import SIGNIFICANCE
from engine.core.vocabulary import Calibrator, WeightMethod
from engine.evaluation.evaluator import Cancelled

INT4_METHODS = [m for m in mth.COST_ORDER if "int4" in METHOD_PRECISIONS[m]]
FAMILY_COLORS = {"per channel": "#a63603", "g128": "#e6550d", "g32": "#fd8d3c", "w8a8": "#3182bd"}
state = st.session_state


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- builders (plain functions of the stored rows) ------------------------------------------------------
def family(row: mth.MethodRow) -> str:
    """The setting a row belongs to: its INT4 group size, or W8A8-static."""
    return "w8a8" if row.calibrator is not None else mth.group_label(row.group_size)


def methods_frame(report: mth.MethodsReport) -> pd.DataFrame:
    """One line per setting: accuracy with its interval, change against FP32, agreement, and McNemar's p against
    FP32 and against the same setting's plain choice (RTN at that group size; minmax)."""
    fp32 = report.fp32_accuracy
    return pd.DataFrame([{
        "setting": row.label, "accuracy": common.fmt_ci(row.accuracy, row.ci95),
        "Δ vs FP32 (points)": 100 * (row.accuracy - fp32), "agreement": f"{row.agreement:.1%}",
        "flips": row.flips, "McNemar p vs FP32": row.mcnemar_p_fp32,
        "against": row.versus or "(the reference)", "McNemar p against it": row.mcnemar_p_versus,
        "differs": row.mcnemar_p_versus is not None and row.mcnemar_p_versus < SIGNIFICANCE,
        "preparation (s)": row.prepare_s,
    } for row in report.rows])


def methods_chart(report: mth.MethodsReport) -> go.Figure:
    """Accuracy of every setting with its 95% interval, one colour per group size (and W8A8-static), FP32's
    accuracy as a dotted line."""
    figure = go.Figure()
    for name, color in FAMILY_COLORS.items():
        rows = [row for row in report.rows if family(row) == name]
        if not rows:
            continue
        figure.add_trace(go.Scatter(
            x=[row.label for row in rows], y=[row.accuracy for row in rows], mode="markers", name=name,
            marker={"size": 10, "color": color, "line": {"color": "#333", "width": 1}},
            error_y={"type": "data", "symmetric": False, "array": [row.ci95[1] - row.accuracy for row in rows],
                     "arrayminus": [row.accuracy - row.ci95[0] for row in rows]},
            hovertext=[f"McNemar p against {row.versus}: {row.mcnemar_p_versus:.3g}" if row.versus
                       else "the reference of its setting" for row in rows]))
    figure.add_hline(y=report.fp32_accuracy, line_dash="dot", annotation_text="FP32")
    figure.update_layout(yaxis_title="accuracy (95% CI)", yaxis_tickformat=".1%", height=400,
                         margin={"t": 30, "b": 10})
    return figure


def curve_chart(points: list[mth.CurvePoint], fp32_accuracy: float) -> go.Figure:
    """W8A8-static accuracy against the number of calibration texts (log axis), one line per calibrator, with
    95% intervals."""
    figure = go.Figure()
    for calibrator in dict.fromkeys(point.calibrator for point in points):
        line = sorted((p for p in points if p.calibrator == calibrator), key=lambda p: p.texts)
        figure.add_trace(go.Scatter(
            x=[p.texts for p in line], y=[p.accuracy for p in line], mode="lines+markers", name=calibrator.value,
            error_y={"type": "data", "symmetric": False, "array": [p.ci95[1] - p.accuracy for p in line],
                     "arrayminus": [p.accuracy - p.ci95[0] for p in line]}))
    figure.add_hline(y=fp32_accuracy, line_dash="dot", annotation_text="FP32")
    figure.update_layout(xaxis_title="calibration texts", xaxis_type="log", yaxis_title="accuracy (95% CI)",
                         yaxis_tickformat=".1%", height=380, margin={"t": 30, "b": 10})
    figure.update_xaxes(**common.log_ticks([p.texts for p in points]))
    return figure


def rescue_words(rows) -> dict[tuple[str, str], str]:
    """The sensitivity page's "rescued by": for each (layer, precision) that RTN changes significantly and that
    other methods were swept for, the cheapest method whose row is within noise ("HQQ"), else "none swept"."""
    swept = {(r.layer, r.precision) for r in rows if r.method != WeightMethod.RTN}
    return {key: method.value.upper() if method is not None else "none swept"
            for key, method in rescued_by(rows).items() if key in swept}


def curve_plans(layers, calibrators, sizes) -> list[mth.MethodPlan]:
    """The curve's evaluations as method plans, for the cost estimate."""
    return [mth.MethodPlan(f"w8a8 static {c.value} {size}", mth.static_plan(layers, c, size), "int8",
                           WeightMethod.RTN, None, c, None) for c in calibrators for size in sizes]


# ---- running (through the queue, kept on disk) ----------------------------------------------------------
def queued(key: str, button: str, label: str, estimate_s: float, compute, read, disabled: bool = False):
    """The stored result for `key` (typed by `read`), or, when the person asks, `compute(progress)` run through
    the queue with a progress bar and stored; None until then. The estimate is said before anything runs."""
    def ask() -> bool:
        if st.button(button, type="primary", disabled=disabled, key=f"mv_{key.split(':')[0]}"):
            return True
        st.caption(f"About {fmt_seconds(estimate_s)} on this server (estimated from this set's FP32 pass and "
                   "each method's own work); the result is kept for every session.")
        return False

    bar = st.empty()
    try:
        return common.cached_job(key, label, compute, kind="methods", ask=ask, read=read,
                                 show_progress=lambda p: bar.progress(min(p[0], 1.0), text=p[1]))
    except Cancelled:
        st.warning("The run was cancelled; press the button to start again.")
        return None
    except EngineError as error:
        st.error(f"Cannot run: {error}")
        return None
    finally:
        bar.empty()


def methods_section(evaluator) -> None:
    st.subheader("INT4 methods and W8A8-static calibrators")
    columns = st.columns(2)  # two a row: three would hide chips behind a fade
    methods = columns[0].multiselect("INT4 methods", INT4_METHODS, default=INT4_METHODS, key="mv_methods",
                                     format_func=lambda m: m.value.upper(),
                                     help="RTN is always run: every method is tested against it")
    groups = columns[1].multiselect("INT4 groups", list(mth.DEFAULT_GROUPS), default=list(mth.DEFAULT_GROUPS),
                                    format_func=mth.group_label, key="mv_groups")
    calibrators = st.multiselect("Calibrators", list(Calibrator), default=list(Calibrator), key="mv_calibrators",
                                 help="minmax is always run: the others are tested against it")
    plans = mth.method_plans(evaluator.layers, groups, methods, calibrators)
    estimate = mth.estimate_cost(plans, evaluator.layers, evaluator.baseline.seconds, len(evaluator.labels))
    key = keys.methods_report(evaluator, [(p.label, p.plan.key()) for p in plans])
    report = queued(key, f"Compare {len(plans)} settings", "Comparing methods", estimate,
                    lambda progress: mth.compare_methods(evaluator, plans, progress).to_json(),
                    mth.MethodsReport.from_json)
    if report is None:
        return
    st.caption(f"{report.n:,} sentences of {report.data}; FP32 {report.fp32_accuracy:.1%}; measured in "
               f"{fmt_seconds(report.seconds)}. \"differs\": McNemar p < {SIGNIFICANCE} against the setting's "
               "plain choice, uncorrected for the number of tests.")
    st.dataframe(methods_frame(report), hide_index=True, width="stretch", column_config={
        "Δ vs FP32 (points)": st.column_config.NumberColumn(format="%+.2f"),
        "McNemar p vs FP32": st.column_config.NumberColumn(format="%.3g"),
        "McNemar p against it": st.column_config.NumberColumn(format="%.3g"),
        "preparation (s)": st.column_config.NumberColumn(format="%.2f")})
    st.plotly_chart(methods_chart(report), width="stretch", key="mv_chart")


def curve_section(evaluator) -> None:
    st.subheader("Calibration size")
    columns = st.columns(2)
    calibrators = columns[0].multiselect("Calibrators", list(Calibrator), default=[Calibrator.MINMAX],
                                         key="mv_curve_calibrators")
    sizes = columns[1].multiselect("Calibration texts", list(mth.CURVE_SIZES), default=list(mth.CURVE_SIZES),
                                   key="mv_curve_sizes")
    pool = len(evaluator.dataset.calibration)
    if sizes and max(sizes) > pool:
        st.caption(f"This set holds {pool} calibration texts: larger sizes give one point, with all of them.")
    estimate = mth.estimate_cost(curve_plans(evaluator.layers, calibrators, sizes), evaluator.layers,
                                 evaluator.baseline.seconds, len(evaluator.labels))
    key = keys.methods_curve(evaluator, [c.value for c in calibrators], sizes)

    def compute(progress) -> list[dict]:
        points = []
        for index, calibrator in enumerate(calibrators):
            share = lambda fraction, text, index=index: progress((index + fraction) / len(calibrators), text)
            points += [p.to_json() for p in mth.calibration_curve(evaluator, calibrator, sizes, share)]
        return points

    points = queued(key, "Draw the curve", "Calibration curve", estimate, compute,
                    lambda stored: [mth.CurvePoint.from_json(p) for p in stored], disabled=not calibrators or not sizes)
    if points:
        st.plotly_chart(curve_chart(points, evaluator.baseline.comparison.accuracy), width="stretch",
                        key="mv_curve")


def render() -> None:
    """The view, on the sidebar's model and set (a quick sample of it first)."""
    st.markdown("Which way of making the integers keeps the most accuracy: each method against round-to-nearest "
                "at the same group size, each calibrator against minmax, on the same sentences. A difference "
                "inside its interval, or with McNemar p above 0.05, is not one.")
    full = common.safe_evaluator()
    if full is None:
        return
    quick = st.toggle(f"Quick: first {common.QUICK_SAMPLE}", value=len(full.labels) > common.QUICK_SAMPLE,
                      key="mv_quick", help="look at a sample before paying for the whole set; stored apart")
    evaluator = common.evaluator_for(full.dataset.head(common.QUICK_SAMPLE)) if quick else full
    methods_section(evaluator)
    curve_section(evaluator)
