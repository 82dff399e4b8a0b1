"""The pages' cluster switch: the cluster is RAY_ADDRESS (none when unset or empty), and a choice of sets goes to
it only when its workers can load every set by name: never a session's upload. Sending rows to a running
cluster is tests/app_pages/test_deploy_pages.py's test_sensitivity_runs_on_the_cluster."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("10.0.0.5:6379", "10.0.0.5:6379")])
def test_the_cluster_is_ray_address(monkeypatch, value, expected):
    from app_pages import cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if value is not None:
        monkeypatch.setenv("RAY_ADDRESS", value)
    assert cluster.address() == expected


def _reasons(choices: list[list[str]], uploaded: tuple[str, ...] = ()) -> list[str | None]:
    """unavailable_reason for each choice, in a page run whose session uploaded `uploaded`."""
    def script():
        import streamlit as st

        from app_pages import cluster

        st.session_state["reasons"] = [cluster.unavailable_reason(names) for names in st.session_state["choices"]]

    at = AppTest.from_function(script, default_timeout=60)
    at.session_state["choices"] = choices
    if uploaded:
        at.session_state["uploaded_sets"] = dict.fromkeys(uploaded)
    at.run()
    assert not at.exception
    return at.session_state["reasons"]


def test_sets_the_workers_can_load_go_to_the_cluster():
    assert _reasons([["embedded", "amazon"], ["sst2"], ["/data/reviews.csv"], []]) == [None, None, None, None]


def test_an_upload_of_this_session_stays_here():
    reasons = _reasons([["embedded", "mine.csv"], ["mine.csv", "other.csv"]], uploaded=("mine.csv", "other.csv"))
    assert reasons == ["mine.csv is an upload of this session: the cluster's workers cannot load it.",
                       "mine.csv, other.csv is an upload of this session: the cluster's workers cannot load it."]


def test_a_set_no_worker_can_load_by_name_is_named():
    assert _reasons([["embedded", "my reviews", "amazon"]]) == ["my reviews cannot be loaded by the cluster's workers."]
