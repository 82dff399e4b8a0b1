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


def _found_for_the_layer_map(folder: Path, plan) -> bool:
    """Whether the layer map would answer `plan` from the cache, without evaluating it."""
    def script():
        import streamlit as st

        from app_pages import common
        from cache import results

        st.session_state["found"] = results.cached_evaluation(common.evaluator(), st.session_state["ask"]) is not None

    at = AppTest.from_function(script, default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = LIMIT
    at.session_state["ask"] = plan
    return at.run().session_state["found"]


def test_a_plan_sent_from_smoothquant_lands_in_the_layer_map_and_is_undoable(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    smoothquant = _page("smoothquant", folder, tmp_path).run()
    assert not smoothquant.exception
    smoothquant.button(key="sq_evaluate").click().run()
    smoothquant.button(key="sq_send").click().run()
    assert not smoothquant.exception and not smoothquant.error
    sent = smoothquant.session_state["plan"]
    assert _found_for_the_layer_map(folder, sent)  # evaluated on the SmoothQuant page: not again on the layer map
    assert sent.key() != FP32.key()
    assert [entry.plan.key() for entry in smoothquant.session_state["lm_pending"]] == [sent.key()]
    assert [plan.key() for plan in smoothquant.session_state["plan_undo"]] == [FP32.key()]

    layer_map = _page("layer_map", folder, tmp_path)
    for key in ("plan", "plan_undo", "lm_pending"):
        layer_map.session_state[key] = smoothquant.session_state[key]
    layer_map.run()
    assert not layer_map.exception and not layer_map.error
    assert layer_map.session_state["plan_history"][-1].key == sent.key()
    assert layer_map.session_state["lm_pending"] == []
    layer_map.button[[b.label for b in layer_map.button].index("Undo")].click().run()
    assert not layer_map.exception
    assert layer_map.session_state["plan"].key() == FP32.key()
    assert layer_map.session_state["plan_history"][-1].key == FP32.key()


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


def test_cached_job_reads_its_typed_answer_and_recomputes_an_entry_it_cannot_read(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PAGE_STATE_TEST_RUNS", str(tmp_path / "runs.txt"))
    from cache import make_key, put

    put(make_key("page-state-read-test", n=1), {"retired_shape": 1})  # what an older version stored

    def script():
        import os

        import streamlit as st

        from app_pages import common
        from cache import make_key
        from engine.core.stats import Figures

        def work(progress):
            with open(os.environ["PAGE_STATE_TEST_RUNS"], "a") as runs:
                runs.write("ran\n")
            return {"accuracy": 0.5, "ci95": [0.4, 0.6], "n": 10, "agreement": 1.0, "flips": 0, "kl": 0.0,
                    "mcnemar_p": 1.0}

        found = common.cached_job(make_key("page-state-read-test", n=1), "Answering", work,
                                  read=lambda stored: Figures(**stored))
        st.markdown(f"{type(found).__name__} {found.accuracy}")

    first = AppTest.from_function(script, default_timeout=60).run()
    assert not first.exception and first.markdown[0].value == "Figures 0.5"
    second = AppTest.from_function(script, default_timeout=60).run()
    assert not second.exception and second.markdown[0].value == "Figures 0.5"
    assert (tmp_path / "runs.txt").read_text() == "ran\n"  # recomputed once over the unreadable entry, then read


def test_method_rows_are_memoized_by_results_sweep_and_rtn_keys_stay(tiny_model, tokenizer, tmp_path, monkeypatch):
    """A sweep with GPTQ stores its GPTQ rows too (pages and CLI share them); RTN's row key has no method part,
    exactly as before methods existed, so rows stored then are still found."""
    from cache import keys, make_key, results
    from engine.data.sets import load_dataset
    from engine.core.vocabulary import WeightMethod
    from engine.evaluation.evaluate import get_evaluator

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    evaluator = get_evaluator(tiny_model, tokenizer, load_dataset("embedded").head(16), keep_states=True)
    methods = (WeightMethod.RTN, WeightMethod.GPTQ)
    first = results.sweep(evaluator, ["int4"], "one", methods=methods)
    assert first.computed == len(first.rows) and any(row.method == WeightMethod.GPTQ for row in first.rows)
    again = results.sweep(evaluator, ["int4"], "one", methods=methods)
    assert again.computed == 0 and [row.to_json() for row in again.rows] == [row.to_json() for row in first.rows]
    assert set(results.known_rows(evaluator, ["int4"], "one", methods)) == {row.key for row in first.rows}
    layer = evaluator.layers[0].name
    model_fp, data_fp, device = evaluator.key
    assert keys.sweep_row(evaluator, layer, "int4", "one") == make_key(
        "sensitivity-row", model=model_fp, data=data_fp, device=device, batch=evaluator.batch_size, layer=layer,
        precision="int4", direction="one")
    assert keys.sweep_row(evaluator, layer, "int4", "one", WeightMethod.GPTQ) == make_key(
        "sensitivity-row", model=model_fp, data=data_fp, device=device, batch=evaluator.batch_size, layer=layer,
        precision="int4", direction="one", method=WeightMethod.GPTQ.value)
