"""Compare precisions: FP32, FP16, BF16, INT8, INT4 and mixed plans side by side, on the chosen device; and, in
its Methods tab, the quantization methods and calibrators (app_pages/methods_view.py)."""
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st
import torch

from app_pages import cluster, common, deployment, methods_view, profile_view
from cache import keys, results
from engine.analysis.compare import ComparisonRecord, ComparisonRow, run_comparison, variant
from engine.analysis.findings import findings
from engine.analysis.presets import PRESETS, display_name, resolve_plan_item
from engine.analysis.report import to_csv, to_markdown
from engine.data.sets import VENDORED
from engine.core.errors import EngineError
from engine.data.hub import hub_reachable
from engine.core.plan import FP32, parse_plan
from engine.grid.tasks import build_tasks
from engine.core.vocabulary import Runtime, runtime_label


@st.cache_data(ttl=600, show_spinner=False)
def _hub() -> bool:
    return hub_reachable()


def choices(model):
    """(plans, sets, device) chosen in the two columns; stops the page on a plan that cannot be used."""
    left, right = st.columns(2)
    with left:
        presets = st.multiselect("Precisions", list(PRESETS), default=["fp32", "fp16", "int8", "int4"],
                                 format_func=display_name, key="compare_presets",  # short chips: never cut
                                 help="; ".join(f"{display_name(p)}: {about}" for p, about in PRESETS.items()))
        current = common.current_plan()
        use_current = current.key() != FP32.key() and st.checkbox(
            "The layer map's current plan", value=True, key="compare_current",
            help=f"{len(current.compact(common.layer_names()).rules)} layers quantized")
        uploads = st.file_uploader("Plan JSON files", type=["json"], accept_multiple_files=True, key="compare_uploads")
    with right:
        set_options = list(VENDORED) + (["sst2"] if _hub() else []) + list(st.session_state.get("uploaded_sets", {}))
        sets = st.multiselect("Evaluation sets", set_options, default=["embedded", "amazon"], key="compare_sets",
                              help="embedded is the in-domain test split; amazon, tweets and nyt are out of domain")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        device = st.radio("Device", devices, horizontal=True, key="compare_device")
        if len(devices) == 1:
            st.caption("No CUDA GPU here: every timing is on this CPU's real kernels.")
        runtimes = st.multiselect("Runtimes", list(Runtime), default=[Runtime.TORCH],
                                  format_func=runtime_label,
                                  key="compare_runtimes",
                                  help="ONNX Runtime: each plan exported (once) and run as deployed, its own "
                                       "accuracy measured on the exported graph and timed in the same rounds")
    try:
        plans = [resolve_plan_item(name, model) for name in presets]
        if use_current:
            plans.append(("layer map", current))
        for upload in uploads or []:
            plan = parse_plan(upload.getvalue().decode("utf-8"))
            plan.resolve(common.layer_names())
            plans.append((Path(upload.name).stem, plan))
        chosen_sets = [common.dataset(name) for name in sets]
    except (EngineError, UnicodeDecodeError) as error:
        st.error(f"Cannot use that choice: {error}")
        st.stop()
    if Runtime.ONNXRUNTIME in runtimes and device != "cpu":
        st.error("ONNX Runtime variants run on its CPU provider here: choose the cpu device to compare them.")
        st.stop()
    return plans, chosen_sets, device, runtimes


def run(model, tokenizer, plans, sets, device, runtimes) -> ComparisonRecord | None:
    """The comparison, from the cache or run through the server's queue when asked for."""
    key = keys.comparison(model, [d.fingerprint for d in sets], [(label, p.key()) for label, p in plans], device,
                          st.session_state.get("limit"), runtimes)
    quick = st.session_state.get("limit") is not None

    def ask() -> bool:
        if st.button("Run comparison", type="primary", disabled=not plans or not sets or not runtimes):
            return True
        st.info("Choose plans and sets, then press **Run comparison**. Results are kept: the same choices answer "
                "at once, in any session.")
        return False

    def work(progress):
        report = run_comparison(model, tokenizer, plans, sets, device, bench_seconds=0.1 if quick else 1.0,
                                progress=progress, runtimes=runtimes, exports=results.exports())
        return report.record().to_json()

    bar = st.empty()
    try:
        return common.cached_job(key, "Comparing", work, kind="compare", ask=ask, read=ComparisonRecord.from_json,
                                 show_progress=lambda p: bar.progress(p[0], text=p[1]))
    except EngineError as error:
        st.error(f"The comparison cannot run: {error}")
        return None
    finally:
        bar.empty()


def name(row: ComparisonRow) -> str:
    return variant(display_name(row.plan), row.runtime)


def table(rows: list[ComparisonRow]) -> None:
    st.caption(f"Latency at batch 1 and {rows[0].tokens} tokens, throughput at batch {rows[0].throughput_batch}, "
               "all plans timed interleaved round by round in one run; speedup is the median of the per-round "
               "ratios to torch FP32, with its 95% interval."
               + (" ORT rows are the exported graphs themselves, timed with ORT's spinning threads off so that they "
                  "do not take the cores from the next variant in the round."
                  if any(r.runtime == Runtime.ONNXRUNTIME for r in rows) else ""))
    frame = pd.DataFrame([{
        "plan": name(r), "set": r.data, "n": r.n,
        "accuracy": common.fmt_ci(r.accuracy, r.ci95),
        "Δ vs FP32 (points)": f"{100 * r.accuracy_delta:+.1f} [{100 * r.accuracy_delta_ci95[0]:+.1f}, "
                              f"{100 * r.accuracy_delta_ci95[1]:+.1f}]",
        "agreement": f"{r.agreement:.1%}", "flips": r.flips, "McNemar p": r.mcnemar_p, "KL": r.kl,
        "size (MB)": r.size_bytes / 1e6, "size ratio": r.size_ratio, "p50 (ms)": r.latency_ms_p50,
        "speedup": f"{r.speedup:.2f}x [{r.speedup_ci95[0]:.2f}, {r.speedup_ci95[1]:.2f}]",
        "throughput (/s)": r.throughput_per_s,
    } for r in rows])
    st.dataframe(frame, hide_index=True, width="stretch",
                 column_config={"McNemar p": st.column_config.NumberColumn(format="%.3g"),
                                "KL": st.column_config.NumberColumn(format="%.2e"),
                                **{c: st.column_config.NumberColumn(format="%.2f")
                                   for c in ("size (MB)", "size ratio", "p50 (ms)", "throughput (/s)")}})
    for note in sorted({note for r in rows for note in r.kernel_notes}):
        st.caption(f"Kernel note: {note}")
    for kernel in sorted({r.cpu_kernel for r in rows if r.cpu_kernel}):
        st.caption(f"ORT rows' int8 written for {kernel}.")


def charts(rows: list[ComparisonRow]) -> None:
    frame = pd.DataFrame([{
        "plan": name(r), "set": r.data, "accuracy (%)": 100 * r.accuracy,
        "ci_plus": 100 * (r.ci95[1] - r.accuracy), "ci_minus": 100 * (r.accuracy - r.ci95[0]),
        "delta (points)": 100 * r.accuracy_delta,
        "delta_plus": 100 * (r.accuracy_delta_ci95[1] - r.accuracy_delta),
        "delta_minus": 100 * (r.accuracy_delta - r.accuracy_delta_ci95[0]),
        "latency p50 (ms)": r.latency_ms_p50, "size (MB)": r.size_bytes / 1e6,
        "fp32": r.plan_json == {} and r.runtime == Runtime.TORCH,
    } for r in rows])
    low = min(100 * r.ci95[0] for r in rows)
    high = max(100 * r.ci95[1] for r in rows)
    span = [max(0.0, low - 2), min(100.0, high + 2)]  # the axis spans the data, not 0-100%
    columns = st.columns(2)
    accuracy = px.scatter(frame, x="plan", y="accuracy (%)", color="set", error_y="ci_plus",
                          error_y_minus="ci_minus", title="Accuracy with 95% interval")
    accuracy.update_layout(scattermode="group", yaxis_range=span)
    columns[0].plotly_chart(accuracy, width="stretch")
    tradeoff = px.scatter(frame, x="latency p50 (ms)", y="accuracy (%)", size="size (MB)", color="plan", symbol="set",
                          title="Accuracy against latency (marker area: size)", hover_data=["size (MB)"],
                          log_x=True,
                          color_discrete_map={display_name(p): c for p, c in common.PRECISION_COLORS.items()})
    tradeoff.update_traces(marker_line={"color": "#444", "width": 1})  # FP32's light grey stays visible
    tradeoff.update_layout(yaxis_range=span)
    tradeoff.update_xaxes(**common.log_ticks(frame["latency p50 (ms)"]))
    columns[1].plotly_chart(tradeoff, width="stretch")
    quantized = frame[~frame["fp32"]]
    if not quantized.empty:
        drop = px.scatter(quantized, x="set", y="delta (points)", color="plan", error_y="delta_plus",
                          error_y_minus="delta_minus",
                          title="Accuracy change against FP32 per set (paired bootstrap 95% interval)")
        drop.add_hline(y=0, line_dash="dot")
        drop.update_layout(scattermode="group")
        st.plotly_chart(drop, width="stretch")


def cluster_section(plans) -> None:
    """With RAY_ADDRESS set: every plan on every chosen set as grid tasks on the cluster, each timed on the
    worker that ran it (its host named), the rows shown as they land."""
    names = st.session_state.get("compare_sets", [])
    reason = cluster.unavailable_reason(names)
    if not st.button("Evaluate on the cluster", disabled=reason is not None or not plans or not names,
                     help=reason or f"Ray cluster at {cluster.address()}", key="compare_cluster"):
        rows = st.session_state.get("compare_cluster_rows")
    else:
        try:
            tasks = build_tasks([common.model_name()], names, plans, limit=st.session_state.get("limit"),
                                latency=True)
            rows = st.session_state["compare_cluster_rows"] = cluster.run(tasks, "Evaluating on the cluster")
        except EngineError as error:
            st.error(f"The cluster could not run the comparison: {error}")
            return
    if not rows:
        return
    st.caption("From the cluster: accuracy figures as on this page; latency at batch 1 timed on the worker that "
               "ran each row, alone, so compare timings only between rows of the same host.")
    st.dataframe(pd.DataFrame([{
        "plan": display_name(r.plan_name), "set": r.data, "error": r.error or "",
        **({} if r.error else {
            "accuracy": common.fmt_ci(r.accuracy, r.ci95), "agreement": f"{r.agreement:.1%}",
            "flips": r.flips, "McNemar p": r.mcnemar_p, "size (MB)": r.size_bytes / 1e6,
            "p50 (ms)": r.latency_ms_p50, "host": (r.machine or {}).get("host")})}
        for r in rows]), hide_index=True, width="stretch")


def deploy_section(plans) -> None:
    st.subheader("Deploy a plan")
    labels = [label for label, _ in plans]
    chosen = st.selectbox("Plan to export", labels, format_func=display_name, key="compare_export_plan")
    deployment.export_button(dict(plans)[chosen], display_name(chosen), "compare")


def report(record: ComparisonRecord) -> None:
    rows = list(record.rows)
    st.subheader("Results")
    st.caption(f"Measured on {record.machine} ({rows[0].device}).")
    table(rows)
    charts(rows)
    st.subheader("Findings")
    sentences = findings(rows)
    st.markdown("\n".join(f"- {s}" for s in sentences) if sentences else "Add a plan other than FP32 to compare.")
    st.subheader("Examples on which the plans disagree")
    disputed = list(record.disagreements)
    if disputed:
        st.caption(f"{len(disputed)} examples (up to 50 per set), widest spread of the probability of FP32's "
                   "class first.")
        st.dataframe(pd.DataFrame(disputed), hide_index=True, width="stretch")
    else:
        st.caption("Every plan predicts the same class as FP32 on every example.")
    downloads = st.columns(2)
    downloads[0].download_button("Download CSV", to_csv(rows), "comparison.csv", "text/csv")
    downloads[1].download_button("Download Markdown report", to_markdown(rows, sentences, record.machine),
                                 "comparison.md", "text/markdown")


common.plan_note()
precisions_tab, methods_tab = st.tabs(["Precisions", "Methods"], key="compare_tab", on_change="rerun")
if methods_tab.open:  # drawn only when open (it evaluates the sidebar's set), and first: a bad choice of
    with methods_tab:  # precisions below stops the page
        methods_view.render()
with precisions_tab:
    st.markdown("What each precision gains and loses on this model, these sets and this machine: accuracy with its "
                "95% interval, agreement with FP32, real-kernel size and latency. The findings below are computed "
                "from the numbers, and a difference inside its interval is never called one.")
    model, tokenizer = common.model_and_tokenizer()
    plans, sets, device, runtimes = choices(model)
    if cluster.address():
        cluster_section(plans)
    record = run(model, tokenizer, plans, sets, device, runtimes)
    if record is not None:
        report(record)
        deploy_section(plans)
    profile_view.profile_section(plans)
