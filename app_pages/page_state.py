"""The layer map's session state, typed, and the one way any page changes the layer map's plan.

Every page that sends a plan (SmoothQuant, sensitivity, the layer map's own clicks) goes through `change_plan`,
so each change is checked against the model, undoable and evaluated in order, whichever page made it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import streamlit as st

from app_pages import common
from engine.core.plan import Plan, PlanError

# The session_state keys behind each field: stable, since tests and the dashboard read them by name.
KEYS = {"pending": "lm_pending", "undo": "plan_undo", "history": "plan_history", "effects": "layer_effects"}
state = st.session_state


@dataclass(frozen=True)
class PendingChange:
    """A plan waiting for the layer map's evaluation, and the layer whose click made it (None: another change)."""

    plan: Plan
    layer: str | None = None


@dataclass(frozen=True)
class Tried:
    """A plan evaluated in this session, with the figures the history's table and chart show."""

    key: str
    plan: Plan
    label: str  # "#3": its place in the session
    accuracy: float
    low: float
    high: float
    size_mb: float
    flips: int
    kl: float
    changed: str  # what it changed from the plan before, in words

    def row(self) -> dict:
        """The history table's line: everything but the plan and its key."""
        return {k: v for k, v in asdict(self).items() if k not in ("plan", "key")}


@dataclass
class LayerMapState:
    """The layer map's queue of plans to evaluate (in order), the plans undo brings back, the plans evaluated
    in this session and each clicked layer's last effect. The lists and dict are session_state's own, so changes
    made through them persist."""

    pending: list[PendingChange]
    undo: list[Plan]
    history: list[Tried]
    effects: dict[str, str]


def layer_map_state() -> LayerMapState:
    for field, key in KEYS.items():
        state.setdefault(key, {} if field == "effects" else [])
    return LayerMapState(**{field: state[key] for field, key in KEYS.items()})


def restart_history(plan: Plan) -> LayerMapState:
    """A new model or set: an empty history and the current plan queued, since one set's figures say nothing
    of another's."""
    state[KEYS["history"]], state[KEYS["effects"]] = [], {}
    state[KEYS["pending"]] = [PendingChange(plan)]
    return layer_map_state()


def change_plan(plan: Plan, layer: str | None = None) -> bool:
    """Make `plan` current and queue it for evaluation (every change is evaluated, in order), the plan it
    replaces kept for undo. A plan its runtime cannot run (BF16 on ONNX Runtime) is refused: the reason is kept
    in "lm_refused" for the layer map to show, and False returned."""
    current = common.current_plan()
    if plan.key() == current.key():
        return True
    try:
        plan.resolve(common.layer_names())
    except PlanError as error:
        state["lm_refused"] = str(error)
        return False
    lm = layer_map_state()
    lm.undo.append(current)
    common.set_current_plan(plan)
    lm.pending.append(PendingChange(plan, layer))
    return True


def undo() -> None:
    """Bring back the plan before the last change, evaluated again (from the cache, as it was before)."""
    lm = layer_map_state()
    plan = lm.undo.pop()
    common.set_current_plan(plan)
    lm.pending.append(PendingChange(plan))


def send_to_layer_map(plan: Plan) -> bool:
    """From another page: check `plan` against the current model (every rule must name its layers), then change
    the layer map's plan to it as a click would. A plan that does not fit is one error line, and False."""
    try:
        plan.specs(common.layer_names())
    except PlanError as error:
        st.error(f"Not sent to the layer map: {error}")
        return False
    if not change_plan(plan):
        st.error(f"Not sent to the layer map: {state.pop('lm_refused')}")
        return False
    return True
