"""Home: what the chosen model is, and how accurate it is at FP32 on the chosen set."""
import streamlit as st

from engine.layers import inventory
from engine.measure import model_size_bytes
from engine.models import REGISTRY
from engine.plan import FP32
from app_pages import common

st.title("Quantization lens")
st.markdown(
    "How far can this classifier be compressed before it breaks? Toggle layers on the **layer map**, "
    "compare whole precisions, type adversarial reviews, tune SmoothQuant and sweep layer sensitivity. "
    "Every accuracy carries its 95% interval; every timing is measured on this machine's real kernels."
)

model, tokenizer = common.model_and_tokenizer()
layers = inventory(model)
params = sum(p.numel() for p in model.parameters())
name = common.model_name()
st.subheader(f"Model: {name}")
st.caption(REGISTRY.get(name, "a model from the HuggingFace Hub or a local folder"))
columns = st.columns(4)
columns[0].metric("Parameters", f"{params / 1e6:.1f} M")
columns[1].metric("Size (FP32 file)", f"{model_size_bytes(model, FP32) / 1e6:.1f} MB")
columns[2].metric("Quantizable layers", len(layers))
columns[3].metric("Architecture", type(model).__name__.replace("ForSequenceClassification", ""))

evaluator = common.safe_evaluator()
if evaluator is not None:
    baseline = evaluator.baseline.comparison
    st.subheader(f"FP32 accuracy on {common.data_name()}")
    st.metric(f"Accuracy (n = {baseline.n:,})", common.fmt_ci(baseline.accuracy, baseline.ci95),
              help="95% Wilson interval")
    with st.expander("Layers"):
        st.dataframe([layer.as_dict() for layer in layers], hide_index=True, width="stretch")
