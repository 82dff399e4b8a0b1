"""The entrypoint and home page render offline, with the pickers, the model's facts and FP32 accuracy."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import engine.models

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
    monkeypatch.setattr(engine.models, "hub_reachable", lambda timeout=engine.models.HUB_TIMEOUT_S: False)
    app.session_state["model_name"] = "distilbert-sst2"
    app.run()
    assert not app.exception
    warnings = [w.value for w in app.sidebar.warning]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "embedded" in warnings[0]
    assert {m.label: m.value for m in app.metric}["Architecture"] == "Bert"
