"""Home: what the chosen model is, its classes and layers, and how accurate it is at FP32 on the chosen set."""
import streamlit as st

from app_pages import common
from cache import results
from engine.core.plan import FP32
from engine.model.inventory import inventory
from engine.model.loading import REGISTRY, label_space

common.plan_note()
st.markdown(
    "How far can this classifier be compressed before it breaks? Toggle layers on the **layer map**, "
    "compare whole precisions, type adversarial reviews, tune SmoothQuant and sweep layer sensitivity. "
    "Every accuracy carries its 95% interval; every timing is measured on this machine's real kernels."
)

model, tokenizer = common.model_and_tokenizer()
layers = inventory(model)
name = common.model_name()
st.subheader(f"Model: {name}")
st.caption(REGISTRY.get(name, "a model from the HuggingFace Hub or a local folder"))
columns = st.columns(4)
columns[0].metric("Parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M")
columns[1].metric("Size (FP32 file)", f"{results.size(model, FP32) / 1e6:.1f} MB")
columns[2].metric("Quantizable layers", len(layers))
columns[3].metric("Architecture", type(model).__name__.replace("ForSequenceClassification", ""))
st.caption("Classes, in output order: " + ", ".join(label_space(model).names))
shared = max((layer.shared for layer in layers), default=1)
if shared > 1:
    st.info(f"This model shares one set of block weights across {shared} blocks: quantizing a block layer "
            "quantizes it for every block that uses it.")

evaluator = common.safe_evaluator()
if evaluator is not None:
    baseline = evaluator.baseline.comparison
    st.subheader(f"FP32 accuracy on {evaluator.dataset.name}")
    st.metric(f"Accuracy (n = {baseline.n:,})", common.fmt_ci(baseline.accuracy, baseline.ci95),
              help="95% Wilson interval")
    if evaluator.dataset.calibration_source:
        st.caption(f"Calibration (static scales, SmoothQuant) uses {evaluator.dataset.calibration_source}, "
                   "never the evaluated rows.")
    for note in evaluator.stages.notes:
        st.caption(f"Incremental evaluation: {note}.")
    with st.expander("Layers"):
        st.dataframe([layer.to_json() for layer in layers], hide_index=True, width="stretch")
