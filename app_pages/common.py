"""What every page shares: the process-wide model and evaluators, the sidebar's one source of truth for
the chosen model and set, the current plan, the job queue, and colours.

Layout only: every figure comes from `engine` (through `cache` where it is expensive).
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable

import numpy as np
import streamlit as st

from cache import lookup, put
from service.scheduler import SCHEDULER
from engine.analysis.toggle import fit_plan, fit_undo
from engine.data.sets import DataError, EvalSet, available_sets, load_csv, load_dataset
from engine.core.errors import EngineError
from engine.core.plan import FP32, Plan
from engine.evaluation.evaluate import get_evaluator
from engine.evaluation.evaluator import Evaluator
from engine.model.inventory import inventory
from engine.model.loading import REGISTRY, label_space, load_model_or_fallback

PRECISION_COLORS = {"fp32": "#d9d9d9", "fp16": "#9ecae1", "bf16": "#6baed6", "int8": "#fdae6b", "int4": "#a63603"}
TEXT_ON = {"fp32": "#222", "fp16": "#222", "bf16": "#222", "int8": "#222", "int4": "#fff"}  # readable on each
OTHER = "other…"
QUICK_SAMPLE = 200  # sentences of a quick look, before paying for the whole set (SmoothQuant, sensitivity)
state = st.session_state


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def shared_model(name: str):
    """(model, tokenizer, warning): loaded once per process, shared read-only by every session. A model
    that cannot be used falls back to the embedded one, with the reason as the warning."""
    return load_model_or_fallback(name, any_error=True)


@st.cache_resource(show_spinner="Tokenizing the evaluation set and running FP32 once…", max_entries=6)
def _shared_evaluator(model_name: str, data_fingerprint: str, _data: EvalSet) -> Evaluator:
    model, tokenizer, _ = shared_model(model_name)
    return in_queue("evaluator", lambda: get_evaluator(model, tokenizer, _data, keep_states=True))


def in_queue(kind: str, work: Callable[[], Any]) -> Any:
    """`work()` run in the server's queue, for a result shared by every session (inside st.cache_*, which draws
    nothing): torch work on the worker's cores, since a session's own thread keeps to one (dashboard.py)."""
    job = SCHEDULER.submit("server", kind, lambda job: work())
    job.done_event.wait()
    if job.error is not None:
        raise job.error
    return job.result


def session_id() -> str:
    return state.setdefault("session_id", uuid.uuid4().hex)


def model_name() -> str:
    """The model the pages show: the one asked for, or "embedded" after a fallback."""
    asked = state.get("model_name", "embedded")
    return "embedded" if shared_model(asked)[2] else asked


def data_name() -> str:
    return state.get("data_name", "embedded")


def dataset(name: str | None = None) -> EvalSet:
    """The chosen set (an upload by its name); a session's "limit" (tests, quick looks) keeps its first rows."""
    name = name or data_name()
    uploaded = state.get("uploaded_sets", {})
    data = uploaded[name] if name in uploaded else load_dataset(name)
    return data.head(state.get("limit"))


def model_and_tokenizer():
    model, tokenizer, _ = shared_model(state.get("model_name", "embedded"))
    return model, tokenizer


def evaluator_for(data: EvalSet) -> Evaluator:
    """The process-wide evaluator of the chosen model on `data`."""
    return _shared_evaluator(state.get("model_name", "embedded"), data.fingerprint, data)


def evaluator() -> Evaluator:
    return evaluator_for(dataset())


def safe_evaluator() -> Evaluator | None:
    """The evaluator for the chosen model and set, or None after showing why it cannot be built."""
    try:
        return evaluator()
    except EngineError as error:
        st.error(f"Cannot evaluate {model_name()} on {data_name()}: {error}")
        return None


def layer_names() -> list[str]:
    model, _ = model_and_tokenizer()
    return [layer.name for layer in inventory(model)]


def current_plan() -> Plan:
    """The layer map's plan for this session (FP32 until the person changes it), fitted to the chosen model:
    after a switch to another model, the rules that name none of its layers are dropped, once, with a note
    that every page shows, and so are those of every plan that undo would bring back."""
    plan = state.get("plan", FP32)
    model = state.get("model_name", "embedded")
    if state.get("plan_fitted_for") == (model, plan.key()):
        return plan
    names = layer_names()
    fitted = fit_plan(plan, names)
    if fitted.dropped:
        plan = state["plan"] = fitted.plan
        dropped = ", ".join(fitted.dropped[:3]) + (", …" if len(fitted.dropped) > 3 else "")
        state["plan_note"] = (model, "The plan was made for another model; starting from FP32." if not plan.rules
                              else f"The plan was made for another model: kept the {len(plan.rules)} rule(s) that "
                                   f"match this one, dropped {len(fitted.dropped)} ({dropped}).")
        state["plan_undo"] = fit_undo(state.get("plan_undo", []), names, plan)
    state["plan_fitted_for"] = (model, plan.key())
    return plan


def set_current_plan(plan: Plan) -> None:
    state["plan"] = plan
    state.pop("plan_note", None)  # the person has made a plan for this model


def plan_note() -> None:
    """Under the page's title (dashboard.py draws it): the one line that says the plan was fitted to a newly
    chosen model."""
    current_plan()
    model, note = state.get("plan_note", (None, None))
    if note and model == state.get("model_name", "embedded"):
        st.info(note)


def log_ticks(values) -> dict:
    """Ticks for a log axis at 1-2-5 steps, labelled in plain numbers (plotly's default leaves most unlabelled)."""
    positive = [float(v) for v in values if v and v > 0]
    if not positive:
        return {}
    low, high = min(positive) / 1.5, max(positive) * 1.5
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5) if low <= m * 10.0**e <= high]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def plain(value: float, digits: int = 2, sign: bool = False) -> str:
    """A small number in plain notation with `digits` significant digits (0.000032, not 3.2e-05; 0, not 0.00e+00)."""
    return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-", sign=sign)


def fmt_ci(accuracy: float, ci95) -> str:
    return f"{accuracy:.1%} [{ci95[0]:.1%}, {ci95[1]:.1%}]"


# ---- the sidebar: one source of truth ----------------------------------------------------------
def _pick_model() -> None:
    choice = state["sidebar_model"]
    if choice != OTHER:
        state["model_name"] = choice
    elif state.get("sidebar_model_typed"):
        state["model_name"] = state["sidebar_model_typed"].strip()


def _typed_model() -> None:
    typed = state.get("sidebar_model_typed", "").strip()
    if typed:
        state["model_name"] = typed


def _pick_set() -> None:
    state["data_name"] = state["sidebar_data"]


def _take_upload() -> None:
    upload = state.get("sidebar_upload")
    if upload is None:
        return
    try:
        data = load_csv(upload.name, upload.getvalue())
    except DataError as error:
        state["upload_error"] = str(error)
        return
    state.pop("upload_error", None)
    state.setdefault("uploaded_sets", {})[data.name] = data
    state["data_name"] = data.name  # an upload selects itself once; the dropdown decides after that


def sidebar() -> None:
    """The model and data pickers, and a CSV upload for a user's own labelled set."""
    with st.sidebar:
        st.header("Model and data")
        models = list(REGISTRY)
        asked = state.get("model_name", "embedded")
        state.setdefault("sidebar_model", asked if asked in models else OTHER)
        st.selectbox("Model", models + [OTHER], key="sidebar_model", on_change=_pick_model,
                     help="embedded works offline; others come from the HuggingFace Hub or a local folder")
        if state["sidebar_model"] == OTHER:
            st.text_input("Hub id or local folder", key="sidebar_model_typed", on_change=_typed_model,
                          placeholder="org/model or /path/to/folder")
        _, _, warning = shared_model(asked)
        if warning:
            st.warning(warning)
        sets = dict(available_sets()) | {name: "uploaded CSV" for name in state.get("uploaded_sets", {})}
        names = list(sets)
        if state.get("sidebar_data") != data_name() and data_name() in names:
            state["sidebar_data"] = data_name()
        # The set's name alone fits the sidebar's width; its description goes below, whole.
        st.selectbox("Evaluation set", names, key="sidebar_data", on_change=_pick_set)
        st.caption(sets.get(state["sidebar_data"], ""))
        _label_readings(sets)
        st.file_uploader("Or upload a CSV (columns text,label)", type=["csv"], key="sidebar_upload",
                         on_change=_take_upload,
                         help="label: a class name of the model or an integer class id; a tenth of the rows "
                              "(at most 256) is held out for calibration and not evaluated")
        if state.get("upload_error"):
            st.error(f"{state['upload_error']}. The set in use stays {data_name()}.")
        load = SCHEDULER.load()
        if not load.idle:
            st.caption(f"Server: {load.running} evaluation(s) running, {load.queued} queued "
                       f"({load.workers} worker x {load.threads} threads).")


def _label_readings(sets: dict) -> None:
    """For an uploaded set, how its labels that are not class names (integer ids, yes/no) were read."""
    if sets.get(data_name()) != "uploaded CSV":
        return
    model, _ = model_and_tokenizer()
    readings = label_space(model).readings(dataset().labels)
    if readings:
        shown = ", ".join(f"{label} → {name}" for label, name in list(readings.items())[:6])
        st.caption(f"Labels read as classes: {shown}" + (", …" if len(readings) > 6 else "") + ".")


# ---- the job queue -------------------------------------------------------------------------------
class Progress:
    """What queued work is handed: call it with the work's progress (one value, or several taken as a tuple) for
    the waiting session to show; ask `cancelled()` between steps."""

    def __init__(self, job) -> None:
        self._job = job

    def __call__(self, *value) -> None:
        self._job.progress = value[0] if len(value) == 1 else value

    def cancelled(self) -> bool:
        return self._job.cancelled()


def run_job(kind: str, label: str, work: Callable[[Progress], Any], box=None, tag: str | None = None,
            show_progress: Callable[[Any], None] | None = None) -> Any:
    """Run `work(progress)` through the server's one queue, showing this session its place and an estimate while
    it waits, and what the work passes to `progress` (through `show_progress`) while it runs. A tagged job
    survives a rerun of this session (the rerun finds it again); an untagged one left behind by a rerun is
    cancelled."""
    box = box or st.empty()
    job = SCHEDULER.submit(session_id(), kind, lambda job: work(Progress(job)), label, tag)
    try:
        # A draw is where Streamlit can stop this run for a newer one, so something is drawn at least every
        # second (a click made meanwhile is answered within it); otherwise only what changed, because every
        # draw is a message each waiting browser renders, on a server whose cores the evaluation needs.
        shown, drawn_at = None, 0.0
        while not job.done_event.wait(0.2):
            if job.started is None:
                ahead, eta = SCHEDULER.position(job), SCHEDULER.wait_estimate(job)
                now = ("wait", ahead, None if eta is None else round(eta / 5) * 5)
            else:
                now = ("progress", id(job.progress)) if show_progress and job.progress is not None else ("run",)
            if now == shown and time.monotonic() - drawn_at < 1.0:
                continue
            shown, drawn_at = now, time.monotonic()
            if now[0] == "wait":
                box.info(f"{label}: waiting for the server, {now[1]} job(s) ahead"
                         + (f", about {now[2]:.0f} s" if now[2] is not None else ""))
            elif now[0] == "progress":
                show_progress(job.progress)
            else:
                box.info(f"{label}…")
    finally:
        if not job.done and tag is None:
            SCHEDULER.cancel(job)
    box.empty()
    SCHEDULER.claim(job)
    if job.error is not None:
        raise job.error
    return job.result


def cached_job(key: str, label: str, work: Callable[[Progress], Any], view: Callable[[Any], None] | None = None,
               kind: str = "page", ask: Callable[[], bool] | None = None, box=None, tag: str | None = None,
               show_progress: Callable[[Any], None] | None = None, read: Callable[[Any], Any] | None = None) -> Any:
    """The answer stored under `key` (from `cache.keys`), else, once `ask()` says so (a button; always when
    None), `work(progress)` run through the queue with its progress shown, stored under `key` for every session;
    `view(answer)` draws it. `work` returns what the cache keeps (a result's `to_json()`) and `read` turns it into
    the typed result (its `from_json`); an entry `read` cannot take, stored by an older version, counts as absent.
    Returns the answer, or None while not asked; a cancellation or an EngineError of the work reaches the caller,
    and nothing is stored then."""
    read = read or (lambda stored: stored)
    found = lookup(key)
    if found is not None:
        try:
            answer = read(found)
        except (KeyError, ValueError, TypeError):
            found = None  # computed again when asked, and stored over it
    if found is None:
        if ask is not None and not ask():
            return None
        found = run_job(kind, label, work, box, tag, show_progress)
        put(key, found)
        answer = read(found)
    if view is not None:
        view(answer)
    return answer
