"""One export button for every page that shows a plan: the plan as a folder ONNX Runtime serves, with
its card measured on the chosen set, a progress bar while it is made, and a download once it is."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app_pages import common
from cache import results
from engine.analysis.deploy import archive, export_name
from engine.core.errors import EngineError
from engine.core.plan import Plan
from engine.runtime.onnx_card import ModelCard

state = st.session_state


def export_button(plan: Plan, label: str, key: str) -> None:
    """The export of `plan` (made once per plan and set, for every session) and its download."""
    model, tokenizer = common.model_and_tokenizer()
    data = common.dataset()  # read here: session state is this thread's, not the worker's
    made = state.setdefault("exports_made", {})
    wanted = f"{plan.key()}:{data.fingerprint}"
    if st.button("Export for ONNX Runtime", key=f"export_{key}",
                 help="INT8 layers as ORT integer kernels, INT4 as MatMulNBits, FP32 kept; a model card with the "
                      "accuracy (95% CI), agreement, size and latency measured here"):
        bar = st.progress(0.0, text="Exporting…")

        def work(progress):
            return results.deployed(model, tokenizer, plan, data,
                                    progress=lambda text, fraction: progress(fraction, text))

        try:
            made[wanted] = str(common.run_job("export", f"Exporting {label}", work,
                                              show_progress=lambda p: bar.progress(p[0], text=f"Export: {p[1]}")))
        except EngineError as error:
            st.error(f"Cannot export {label}: {error}")
        bar.empty()
    if wanted in made and Path(made[wanted], "model.onnx").is_file():
        card = ModelCard.read(made[wanted])
        measured, size = card.measured, card.size_bytes
        st.caption(f"Exported {label}: {size / 1e6:.1f} MB ({size / card.fp32_size_bytes:.0%} of FP32); on "
                   f"ONNX Runtime accuracy {common.fmt_ci(measured.accuracy, measured.ci95)} on "
                   f"{measured.data}, agreement with FP32 {measured.agreement:.1%}"
                   + (f", batch 1 p50 {measured.latency_ms_p50:.1f} ms." if measured.latency else "."))
        cpu = card.cpu
        st.caption(f"Written for {cpu.kernel}; measured on {cpu.measured_on.target_cpu} "
                   f"({cpu.measured_on.features}).")
        if cpu.warning:
            st.warning(f"This export: {cpu.warning}.")
        named = export_name(common.model_name(), label, plan)
        st.download_button("Download the ONNX folder (.zip)", lambda: archive(made[wanted], named),
                           file_name=f"{named}.zip", mime="application/zip",
                           on_click="ignore", key=f"download_{key}")
