"""The entrypoint and home page render offline, with the pickers, the model's facts and FP32 accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import engine.model.loading

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=300)
    at.session_state["limit"] = 64
    return at


def test_home_page_shows_the_model_and_its_accuracy(app, embedded):
    app.run()
    assert not app.exception
    labels = {m.label: m.value for m in app.metric}
    assert labels["Quantizable layers"] == "39"
    assert labels["Architecture"] == "Bert"
    accuracy = next(value for label, value in labels.items() if label.startswith("Accuracy"))
    assert accuracy.endswith("]") and "[" in accuracy
    assert [s.label for s in app.sidebar.selectbox] == ["Model", "Evaluation set"]


def test_unreachable_hub_falls_back_to_the_embedded_model_with_one_line(app, embedded, monkeypatch):
    monkeypatch.setattr(engine.model.loading, "hub_reachable", lambda timeout=3.0: False)
    app.session_state["model_name"] = "distilbert-sst2"
    app.run()
    assert not app.exception
    warnings = [w.value for w in app.sidebar.warning]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "embedded" in warnings[0]
    assert {m.label: m.value for m in app.metric}["Architecture"] == "Bert"
    assert any(h.value == "Model: embedded" for h in app.subheader)  # the page names the model it shows


def test_a_missing_folder_says_so_and_the_app_keeps_running(app, embedded, tmp_path):
    app.session_state["model_name"] = str(tmp_path / "not-here")
    app.run()
    assert not app.exception
    warnings = [w.value for w in app.sidebar.warning]
    assert len(warnings) == 1 and "no model folder" in warnings[0] and "hub" not in warnings[0].lower()


def test_the_dropdown_wins_over_a_stale_upload(app, embedded):
    """An upload selects itself once; choosing another set in the dropdown afterwards is what counts."""
    from engine.data.sets import load_csv

    app.run()
    upload = load_csv("mine.csv", b"text,label\ngood film,positive\nbad film,negative\n")
    app.session_state["uploaded_sets"] = {"mine.csv": upload}
    app.session_state["data_name"] = "mine.csv"
    app.run()
    assert app.sidebar.selectbox[1].value == "mine.csv"
    app.sidebar.selectbox[1].set_value("amazon").run()
    assert not app.exception
    assert app.session_state["data_name"] == "amazon"
    app.run()  # a rerun with the upload still there keeps the dropdown's choice
    assert app.session_state["data_name"] == "amazon" and app.sidebar.selectbox[1].value == "amazon"


def test_typing_a_second_model_name_works(app, embedded, tmp_path):
    app.run()
    app.sidebar.selectbox[0].set_value("other…").run()
    app.sidebar.text_input[0].set_value(str(tmp_path / "first")).run()
    assert app.session_state["model_name"] == str(tmp_path / "first")
    app.sidebar.text_input[0].set_value(str(tmp_path / "second")).run()
    assert app.session_state["model_name"] == str(tmp_path / "second")
    assert not app.exception
