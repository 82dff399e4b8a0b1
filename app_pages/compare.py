"""Compare precisions: FP32, FP16, BF16, INT8, INT4 and mixed plans side by side, on the chosen device."""
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st
import torch

import cache
from engine.compare import (PRESETS, disagreements, display_name, findings, resolve_plan_item, run_comparison,
                            to_csv, to_markdown)
from engine.data import VENDORED, DataError
from engine.evaluation import EvalError
from engine.models import fingerprint, hub_reachable
from engine.plan import FP32, PlanError, parse_plan
from app_pages import common


@st.cache_data(ttl=600, show_spinner=False)
def _hub() -> bool:
    return hub_reachable()


st.title("Precision comparison")
st.markdown("What each precision gains and loses on this model, these sets and this machine: accuracy with "
            "its 95% interval, agreement with FP32, real-kernel size and latency. The findings below are "
            "computed from the numbers, and a difference inside its interval is never called one.")
model, tokenizer = common.model_and_tokenizer()

left, right = st.columns(2)
with left:
    presets = st.multiselect("Precisions", list(PRESETS), default=["fp32", "fp16", "int8", "int4"],
                             format_func=lambda p: f"{display_name(p)}: {PRESETS[p]}", key="compare_presets")
    current = common.current_plan()
    use_current = current.key() != FP32.key() and st.checkbox(
        "The layer map's current plan", value=True, key="compare_current",
        help=f"{len(current.compact(common.layer_names()).rules)} layers quantized")
    uploads = st.file_uploader("Plan JSON files", type=["json"], accept_multiple_files=True, key="compare_uploads")
with right:
    uploaded_sets = list(st.session_state.get("uploaded_sets", {}))
    set_options = list(VENDORED) + (["sst2"] if _hub() else []) + uploaded_sets
    sets = st.multiselect("Evaluation sets", set_options, default=["embedded", "amazon"], key="compare_sets",
                          help="embedded is the in-domain test split; amazon, tweets and nyt are out of domain")
    if not _hub():
        st.caption("SST-2 needs the HuggingFace Hub, which this machine cannot reach.")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    device = st.radio("Device", devices, horizontal=True, key="compare_device")
    if len(devices) == 1:
        st.caption("No CUDA GPU here: every timing is on this CPU's real kernels.")

plans = []
try:
    plans = [resolve_plan_item(name, model) for name in presets]
    if use_current:
        plans.append(("layer map", current))
    for upload in uploads or []:
        plan = parse_plan(upload.getvalue().decode("utf-8"))
        plan.resolve(common.layer_names())
        plans.append((Path(upload.name).stem, plan))
except (PlanError, UnicodeDecodeError) as error:
    st.error(f"Cannot use that plan: {error}")
    st.stop()

limit = st.session_state.get("limit")
try:
    chosen_sets = [common.dataset(name) for name in sets]
except DataError as error:
    st.error(str(error))
    st.stop()
parts = {"model": fingerprint(model), "data": [d.fingerprint for d in chosen_sets],
         "plans": [(label, plan.key()) for label, plan in plans], "device": device, "limit": limit}
stored = cache.lookup(cache.make_key("compare", **parts))
clicked = st.button("Run comparison", type="primary", disabled=not plans or not sets)

if stored is None and clicked:
    bar = st.progress(0.0, text="Starting…")

    def compute() -> dict:
        report = run_comparison(model, tokenizer, plans, chosen_sets, device,
                                progress=lambda fraction, text: bar.progress(fraction, text=text),
                                bench_seconds=0.1 if limit else 1.0)
        return {"rows": report.rows, "disagreements": disagreements(report.outcomes), "machine": report.machine}

    try:
        stored = cache.memo("compare", compute, **parts)
    except (PlanError, DataError, EvalError) as error:
        st.error(f"The comparison cannot run: {error}")
        st.stop()
    bar.empty()

if stored is None:
    st.info("Choose plans and sets, then press **Run comparison**. Results are kept: the same choices answer at once.")
    st.stop()

rows = stored["rows"]
st.subheader("Results")
st.caption(f"Measured on {stored['machine']} ({rows[0]['device']}); latency at batch 1 and {rows[0]['tokens']} tokens, "
           f"throughput at batch {rows[0]['throughput_batch']}, all plans timed in interleaved rounds; speedup is "
           "the median of the per-round ratios to FP32, with its 95% interval.")
table = pd.DataFrame([{
    "plan": display_name(r["plan"]), "set": r["data"], "n": r["n"],
    "accuracy": common.fmt_ci(r["accuracy"], r["ci95"]),
    "Δ vs FP32 (points)": f"{100 * r['accuracy_delta']:+.1f} [{100 * r['accuracy_delta_ci95'][0]:+.1f}, "
                          f"{100 * r['accuracy_delta_ci95'][1]:+.1f}]",
    "agreement": f"{r['agreement']:.1%}", "flips": r["flips"], "McNemar p": r["mcnemar_p"], "KL": r["kl"],
    "size (MB)": r["size_bytes"] / 1e6, "size ratio": r["size_ratio"],
    "p50 (ms)": r["latency_ms_p50"], "p95 (ms)": r["latency_ms_p95"], "speedup": r["speedup"],
    "speedup 95% CI": f"[{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}]",
    "throughput (/s)": r["throughput_per_s"],
    "peak memory (MB)": None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 1e6,
} for r in rows])
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"McNemar p": st.column_config.NumberColumn(format="%.3g"),
                            "KL": st.column_config.NumberColumn(format="%.2e"),
                            **{c: st.column_config.NumberColumn(format="%.2f")
                               for c in ("size (MB)", "size ratio", "p50 (ms)", "p95 (ms)", "speedup",
                                         "throughput (/s)", "peak memory (MB)")}})
for note in sorted({note for r in rows for note in r.get("kernel_notes", [])}):
    st.caption(f"Kernel note: {note}")

frame = pd.DataFrame([{
    "plan": display_name(r["plan"]), "set": r["data"], "accuracy (%)": 100 * r["accuracy"],
    "ci_plus": 100 * (r["ci95"][1] - r["accuracy"]), "ci_minus": 100 * (r["accuracy"] - r["ci95"][0]),
    "delta (points)": 100 * r["accuracy_delta"],
    "delta_plus": 100 * (r["accuracy_delta_ci95"][1] - r["accuracy_delta"]),
    "delta_minus": 100 * (r["accuracy_delta"] - r["accuracy_delta_ci95"][0]),
    "latency p50 (ms)": r["latency_ms_p50"], "size (MB)": r["size_bytes"] / 1e6, "fp32": r["plan_json"] == {},
} for r in rows])

charts = st.columns(2)
accuracy = px.scatter(frame, x="plan", y="accuracy (%)", color="set", error_y="ci_plus", error_y_minus="ci_minus",
                      title="Accuracy with 95% interval")
accuracy.update_layout(scattermode="group")
charts[0].plotly_chart(accuracy, width="stretch")
tradeoff = px.scatter(frame, x="latency p50 (ms)", y="accuracy (%)", size="size (MB)", color="plan", symbol="set",
                      title="Accuracy against latency (marker area: size)", hover_data=["size (MB)"])
charts[1].plotly_chart(tradeoff, width="stretch")

quantized = frame[~frame["fp32"]]
if not quantized.empty:
    drop = px.scatter(quantized, x="set", y="delta (points)", color="plan", error_y="delta_plus",
                      error_y_minus="delta_minus",
                      title="Accuracy change against FP32 per set (paired bootstrap 95% interval)")
    drop.add_hline(y=0, line_dash="dot")
    drop.update_layout(scattermode="group")
    st.plotly_chart(drop, width="stretch")

st.subheader("Findings")
sentences = findings(rows)
st.markdown("\n".join(f"- {s}" for s in sentences) if sentences else "Add a plan other than FP32 to compare.")

st.subheader("Examples on which the plans disagree")
disputed = stored["disagreements"]
if disputed:
    st.caption(f"{len(disputed)} examples (up to 50 per set), widest spread of P(positive) first.")
    st.dataframe(pd.DataFrame(disputed), hide_index=True, width="stretch")
else:
    st.caption("Every plan predicts the same label as FP32 on every example.")

downloads = st.columns(2)
downloads[0].download_button("Download CSV", to_csv(rows), "comparison.csv", "text/csv")
downloads[1].download_button("Download Markdown report", to_markdown(rows, sentences, stored["machine"]),
                             "comparison.md", "text/markdown")
