"""The export button on its own: a click exports the plan once for the set (a second session finds the folder
made), the caption states what the card measured, the download is the folder zipped, and a plan that
cannot be exported is one error line with no folder kept. On a tiny saved BERT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import zoo
from engine.core.plan import Plan

LIMIT = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return zoo.save("bert", tmp_path_factory.mktemp("bert") / "model")


def _button(folder: Path, plan: Plan, label: str) -> AppTest:
    def script():
        import streamlit as st

        from app_pages.deployment import export_button

        export_button(st.session_state["to_export"], st.session_state["export_label"], "t")

    at = AppTest.from_function(script, default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = LIMIT
    at.session_state["to_export"] = plan
    at.session_state["export_label"] = label
    return at.run()


def test_export_measures_the_plan_and_offers_the_folder(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    plan = Plan.uniform("int8")
    at = _button(folder, plan, "INT8")
    assert not at.exception and not at.caption  # nothing exported before the click
    at.button(key="export_t").click().run()
    assert not at.exception and not at.error
    made = Path(next(iter(at.session_state["exports_made"].values())))
    card = json.loads((made / "card.json").read_text())
    assert card["measured"]["n"] == LIMIT and (made / "model.onnx").is_file()
    exported = next(c.value for c in at.caption if c.value.startswith("Exported INT8: "))
    assert f"{card['size_bytes'] / 1e6:.1f} MB" in exported and f"{card['measured']['agreement']:.1%}" in exported
    assert any(c.value.startswith(f"Written for {card['cpu']['kernel']}") for c in at.caption)
    assert at.get("download_button")[0].proto.label == "Download the ONNX folder (.zip)"

    written = (made / "model.onnx").stat().st_mtime_ns
    again = _button(folder, plan, "INT8")  # another session: the export on disk is found, not made again
    again.button(key="export_t").click().run()
    assert not again.exception and Path(next(iter(again.session_state["exports_made"].values()))) == made
    assert (made / "model.onnx").stat().st_mtime_ns == written


def test_a_plan_that_cannot_be_exported_is_one_error_line(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    at = _button(folder, Plan.from_json({"distilbert.*": "int8"}), "a DistilBERT plan")
    at.button(key="export_t").click().run()
    assert not at.exception
    assert [e.value.splitlines()[0] for e in at.error] == [e.value for e in at.error]
    assert len(at.error) == 1 and at.error[0].value.startswith("Cannot export a DistilBERT plan: ")
    assert "distilbert.*" in at.error[0].value  # the rule that fits no layer
    assert not at.session_state["exports_made"] and not at.get("download_button")
