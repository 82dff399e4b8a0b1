"""What every page shares: the process-wide model and evaluators, the sidebar's choices, the current plan.

Layout only: every figure comes from `engine` (through `cache` where it is expensive).
"""
from __future__ import annotations

import streamlit as st

import cache
from engine.data import DataError, available_sets, load_csv, load_dataset
from engine.evaluation import Evaluator, get_evaluator
from engine.layers import inventory
from engine.models import REGISTRY, fingerprint, load_model_or_fallback
from engine.plan import FP32, Plan

PRECISION_COLORS = {"fp32": "#d9d9d9", "fp16": "#9ecae1", "bf16": "#6baed6", "int8": "#fdae6b", "int4": "#e6550d"}


@st.cache_resource(show_spinner="Loading the model…")
def shared_model(name: str):
    """(model, tokenizer, warning): loaded once per process, shared read-only by every session."""
    return load_model_or_fallback(name)


@st.cache_resource(show_spinner="Tokenizing the evaluation set and running FP32 once…", max_entries=6)
def _shared_evaluator(model_name: str, data_name: str, limit: int | None) -> Evaluator:
    model, tokenizer, _ = shared_model(model_name)
    return get_evaluator(model, tokenizer, dataset(data_name), keep_states=True)


def shared_evaluator(model_name: str, data_name: str) -> Evaluator:
    """The process-wide evaluator (tokenized batches, FP32 baseline and its states) for a model and set."""
    return _shared_evaluator(model_name, data_name, st.session_state.get("limit"))


def dataset(name: str):
    """The chosen set; a session's "limit" (used by tests and quick looks) keeps only its first rows."""
    uploaded = st.session_state.get("uploaded_sets", {})
    data = uploaded[name] if name in uploaded else load_dataset(name)
    return data.head(st.session_state.get("limit"))


def model_name() -> str:
    return st.session_state.get("model_name", "embedded")


def data_name() -> str:
    return st.session_state.get("data_name", "embedded")


def model_and_tokenizer():
    model, tokenizer, _ = shared_model(model_name())
    return model, tokenizer


def evaluator() -> Evaluator:
    return shared_evaluator(model_name(), data_name())


def layer_names() -> list[str]:
    model, _ = model_and_tokenizer()
    return [layer.name for layer in inventory(model)]


def current_plan() -> Plan:
    """The layer map's plan for this session (FP32 until the person changes it)."""
    return st.session_state.get("plan", FP32)


def set_current_plan(plan: Plan) -> None:
    st.session_state["plan"] = plan


def result_key(plan: Plan, kernels: str = "simulated", device: str = "cpu", **extra) -> dict:
    """The parts that determine an evaluation result, for `cache.memo`."""
    model, _ = model_and_tokenizer()
    return {"model": fingerprint(model), "data": dataset(data_name()).fingerprint, "plan": plan.key(),
            "kernels": kernels, "device": device, **extra}


def sidebar() -> None:
    """The model and dataset pickers, and a CSV upload for a user's own labelled set."""
    with st.sidebar:
        st.header("Model and data")
        models = list(REGISTRY)
        current = model_name()
        choice = st.selectbox("Model", models + (["other…"] if current in models else [current, "other…"]),
                              index=(models.index(current) if current in models else len(models)),
                              help="embedded works offline; others come from the HuggingFace Hub or a local folder")
        if choice == "other…":
            typed = st.text_input("Hub id or local folder", placeholder="org/model or /path/to/folder")
            if typed:
                st.session_state["model_name"] = typed.strip()
        else:
            st.session_state["model_name"] = choice
        _, _, warning = shared_model(model_name())
        if warning:
            st.warning(warning)
        sets = dict(available_sets())
        sets.update({name: "uploaded CSV" for name in st.session_state.get("uploaded_sets", {})})
        names = list(sets)
        chosen = st.selectbox("Evaluation set", names, index=names.index(data_name()) if data_name() in names else 0,
                              format_func=lambda n: f"{n}: {sets[n]}")
        st.session_state["data_name"] = chosen
        upload = st.file_uploader("Or upload a CSV (columns text,label)", type=["csv"])
        if upload is not None:
            try:
                data = load_csv(upload.name, upload.getvalue())
                st.session_state.setdefault("uploaded_sets", {})[data.name] = data
                st.session_state["data_name"] = data.name
            except DataError as error:
                st.error(str(error))


def safe_evaluator() -> Evaluator | None:
    """The evaluator for the chosen model and set, or None after showing why it cannot be built."""
    try:
        return evaluator()
    except (DataError, ValueError) as error:
        st.error(f"Cannot evaluate {model_name()} on {data_name()}: {error}")
        return None


def fmt_ci(accuracy: float, ci95) -> str:
    return f"{accuracy:.1%} [{ci95[0]:.1%}, {ci95[1]:.1%}]"


__all__ = ["cache"]
