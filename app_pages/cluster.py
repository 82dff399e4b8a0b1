"""Run on the cluster: where RAY_ADDRESS names a Ray cluster, the sensitivity and comparison pages send
their evaluations to it as grid tasks; rows land in the same cache entries as local ones, and the page
shows them as they arrive. Without RAY_ADDRESS nothing here shows and the pages run locally."""
from __future__ import annotations

import os

import streamlit as st

from app_pages import common
from cache import grid as cached
from engine.data.sets import VENDORED
from engine.grid.rows import GridRow
from engine.grid.run import run_grid
from engine.grid.tasks import Task

state = st.session_state


def address() -> str | None:
    return os.environ.get("RAY_ADDRESS") or None


def unavailable_reason(data_names: list[str]) -> str | None:
    """Why this choice cannot go to the cluster (its workers load models and sets by name), or None."""
    uploaded = [name for name in data_names if name in state.get("uploaded_sets", {})]
    if uploaded:
        return f"{', '.join(uploaded)} is an upload of this session: the cluster's workers cannot load it."
    unknown = [name for name in data_names if name not in VENDORED and not name.endswith(".csv") and name != "sst2"]
    return f"{', '.join(unknown)} cannot be loaded by the cluster's workers." if unknown else None


def run(tasks: list[Task], label: str) -> list[GridRow]:
    """The tasks' rows, computed on the cluster (rows already in the cache are not sent), with a progress bar
    that moves as each row lands."""
    from engine.grid.ray_backend import RayBackend

    bar = st.progress(0.0, text=f"{label}: connecting to the cluster at {address()}…")

    def work(progress):
        backend = RayBackend(address=address(), threads=1)
        return list(run_grid(tasks, backend, cached.find, cached.keep, progress=progress))

    def show(progress) -> None:
        done, total, row = progress
        where = f" · last from {row.worker}" if row.worker else ""
        bar.progress(done / total, text=f"{label}: {done} of {total} rows landed{where}")

    rows = common.run_job("grid", label, work, show_progress=show)
    bar.empty()
    return rows
