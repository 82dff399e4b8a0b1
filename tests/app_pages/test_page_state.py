"""The one way pages ask for work and change the layer map: a plan sent from the SmoothQuant page lands in the
layer map and is undoable, a plan that does not fit the model is one error line, and a cached job answers a
second session from the disk cache without queuing anything. On a tiny saved BERT."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import zoo
from engine.core.plan import FP32

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return zoo.save("bert", tmp_path_factory.mktemp("bert") / "model")


def _page(name: str, folder: Path, cache: Path) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{name}.py"), default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = LIMIT
    return at


def _send(folder: Path, plan) -> AppTest:
    """A page that sends `plan` to the layer map, as the SmoothQuant and sensitivity pages do."""
    def script():
        import streamlit as st

        from app_pages import page_state

        st.session_state["sent"] = page_state.send_to_layer_map(st.session_state["to_send"])

    at = AppTest.from_function(script, default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = LIMIT
    at.session_state["to_send"] = plan
    return at.run()


def test_a_plan_sent_from_smoothquant_lands_in_the_layer_map_and_is_undoable(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    smoothquant = _page("smoothquant", folder, tmp_path).run()
    assert not smoothquant.exception
    smoothquant.button(key="sq_send").click().run()
    assert not smoothquant.exception and not smoothquant.error
    sent = smoothquant.session_state["plan"]
    assert sent.key() != FP32.key()
    assert [entry["plan"].key() for entry in smoothquant.session_state["lm_pending"]] == [sent.key()]
    assert [plan.key() for plan in smoothquant.session_state["plan_undo"]] == [FP32.key()]

    layer_map = _page("layer_map", folder, tmp_path)
    for key in ("plan", "plan_undo", "lm_pending"):
        layer_map.session_state[key] = smoothquant.session_state[key]
    layer_map.run()
    assert not layer_map.exception and not layer_map.error
    assert layer_map.session_state["plan_history"][-1]["key"] == sent.key()
    assert layer_map.session_state["lm_pending"] == []
    layer_map.button[[b.label for b in layer_map.button].index("Undo")].click().run()
    assert not layer_map.exception
    assert layer_map.session_state["plan"].key() == FP32.key()
    assert layer_map.session_state["plan_history"][-1]["key"] == FP32.key()


def test_a_plan_that_does_not_fit_the_model_is_one_error_and_changes_nothing(folder, tmp_path, monkeypatch):
    from engine.core.plan import Plan

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    at = _send(folder, Plan.from_json({"no.such.layer": "int8"}))
    assert not at.exception
    assert at.session_state["sent"] is False
    assert len(at.error) == 1 and "no.such.layer" in at.error[0].value and "\n" not in at.error[0].value
    assert "plan" not in at.session_state and "lm_pending" not in at.session_state


def test_cached_job_answers_a_second_session_from_the_cache_without_queuing(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PAGE_STATE_TEST_RUNS", str(tmp_path / "runs.txt"))

    def script():
        import os

        import streamlit as st

        from app_pages import common
        from cache import make_key

        def work(progress):
            progress(0.5, "half way")
            with open(os.environ["PAGE_STATE_TEST_RUNS"], "a") as runs:
                runs.write("ran\n")
            return {"answer": 42}

        common.cached_job(make_key("page-state-test", n=1), "Answering", work,
                          view=lambda found: st.markdown(f"answer {found['answer']}"))

    first = AppTest.from_function(script, default_timeout=60).run()
    assert not first.exception and first.markdown[0].value == "answer 42"
    second = AppTest.from_function(script, default_timeout=60).run()
    assert not second.exception and second.markdown[0].value == "answer 42"
    assert (tmp_path / "runs.txt").read_text() == "ran\n"  # the work ran once, for the first session only
