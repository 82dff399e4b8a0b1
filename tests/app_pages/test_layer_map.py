"""The layer map: the page reacts to changes, sessions stay apart, cached results are reused and never stale."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import cache
from engine.data.sets import load_dataset
from engine.evaluation.evaluator import Evaluator
from engine.evaluation.session import Session, StateBudget
from engine.model.inventory import inventory
from engine.model.loading import fingerprint
from engine.core.plan import FP32, Plan
from engine.analysis.diagnose import Diagnosis, OpRow
from engine.analysis.toggle import next_precision, set_layers
from engine.quant.apply import shallow_copy

LIMIT = 64
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / "layer_map.py"), default_timeout=300)
    at.session_state["limit"] = LIMIT
    return at


def _button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def _metric(at: AppTest, label: str):
    return next(m for m in at.metric if m.label.startswith(label))


def test_page_renders_and_a_change_moves_the_figures(cache_dir, embedded):
    at = _page()
    at.run()
    assert not at.exception
    assert _metric(at, "Agreement with FP32").value == "100.0%"
    fp32_size = _metric(at, "Size").value
    at.selectbox(key="bulk_precision").set_value("int4")
    _button(at, "Apply to everything").click()
    at.run()
    assert not at.exception
    plan = at.session_state["plan"]
    assert set(plan.resolve([l.name for l in inventory(embedded[0])]).values()) == {"int4"}
    assert _metric(at, "Size").value != fp32_size
    assert "of FP32" in _metric(at, "Size").delta
    _button(at, "Undo").click()
    at.run()
    assert at.session_state["plan"].key() == FP32.key()


def test_two_page_sessions_keep_their_own_plans(cache_dir, embedded):
    model = embedded[0]
    before = fingerprint(shallow_copy(model))  # recomputed from the tensors, not the cached attribute
    first, second = _page(), _page()
    first.run()
    second.run()
    first.selectbox(key="bulk_precision").set_value("int8")
    _button(first, "Apply to everything").click()
    second.selectbox(key="bulk_precision").set_value("int4")
    _button(second, "Apply to everything").click()
    first.run()
    second.run()
    names = [l.name for l in inventory(model)]
    assert set(first.session_state["plan"].resolve(names).values()) == {"int8"}
    assert set(second.session_state["plan"].resolve(names).values()) == {"int4"}
    assert fingerprint(shallow_copy(model)) == before


def test_concurrent_sessions_match_full_runs_and_leave_the_model_alone(tiny_bert, tokenizer):
    evaluator = Evaluator(tiny_bert, tokenizer, load_dataset("embedded").head(96), keep_states=True)
    names = [l.name for l in inventory(tiny_bert)]
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    plans = [set_layers(FP32, names, names[i::5], p) for i, p in enumerate(["int8", "int4", "fp16", "int8", "bf16"])]
    results: dict[int, list] = {}

    def work(worker: int) -> None:
        session = Session(evaluator, StateBudget())
        results[worker] = [session.update(plan).logits for plan in plans[worker:] + plans[:worker]]

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker, logits in results.items():
        for plan, got in zip(plans[worker:] + plans[:worker], logits):
            assert (evaluator.run(plan)[0].logits == got).all()
    for key, value in tiny_bert.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cached_result_is_reused_and_a_changed_weight_is_not_served_stale(cache_dir, tiny_bert):
    calls = []

    def compute(model):
        calls.append(1)
        return fingerprint(model)

    plan = Plan.uniform("int8")
    key = cache.make_key("t", model=fingerprint(tiny_bert), plan=plan.key())
    first = cache.remember(key, lambda: compute(tiny_bert))
    again = cache.remember(key, lambda: compute(tiny_bert))
    assert first == again and len(calls) == 1
    changed = shallow_copy(tiny_bert)
    weight = changed.classifier.weight.detach().clone()
    weight[0, 0] += 1.0
    changed.classifier.weight = torch.nn.Parameter(weight, requires_grad=False)
    fresh = cache.remember(cache.make_key("t", model=fingerprint(changed), plan=plan.key()), lambda: compute(changed))
    assert len(calls) == 2 and fresh != first


def test_cycle_and_bytes(tiny_distilbert):
    assert [next_precision(p) for p in ("fp32", "int8", "int4", "fp16")] == ["int8", "int4", "fp32", "fp32"]
    layer = next(l for l in inventory(tiny_distilbert) if l.role == "ffn-in")
    sizes = [layer.bytes_at(p) for p in ("fp32", "fp16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == layer.params * 4


def _click(at: AppTest, *layers: str, epoch: str = "e1") -> None:
    """What the grid sends: its whole click log (the browser numbers every click within a page load)."""
    log = list(at.session_state["lm_grid_log"]) if "lm_grid_log" in at.session_state else []
    log += [{"seq": len(log) + i + 1, "layer": layer} for i, layer in enumerate(layers)]
    at.session_state["lm_grid_log"] = log
    at.session_state["lm_grid"] = {"clicks": {"epoch": epoch, "log": log, "total": len(log)}}


def test_every_click_changes_one_cell_and_enters_the_history(cache_dir, embedded):
    names = [l.name for l in inventory(embedded[0])]
    at = _page()
    at.run()
    _click(at, names[1])
    at.run()
    _click(at, names[1])  # the same cell again: INT8 -> INT4
    at.run()
    _click(at, names[5], names[8])  # two clicks the server received together: both count
    at.run()
    assert not at.exception
    resolved = at.session_state["plan"].resolve(names)
    assert resolved[names[1]] == "int4" and resolved[names[5]] == "int8" and resolved[names[8]] == "int8"
    assert sum(p != "fp32" for p in resolved.values()) == 3
    history = at.session_state["plan_history"]
    assert history[0].changed == "FP32"  # the start, named by what it is
    assert [h.changed for h in history[1:]] == [f"{names[1]} → INT8", f"{names[1]} → INT4",
                                                  f"{names[5]} → INT8", f"{names[8]} → INT8"]
    assert len(history) == 5  # FP32, then one plan per click
    assert at.session_state["lm_pending"] == []
    _click(at, names[1])  # a click on a plan answered from the disk cache (seen before) still counts
    at.run()
    assert at.session_state["plan"].resolve(names)[names[1]] == "fp32" and len(at.session_state["plan_history"]) == 6


def test_the_error_overlay_shades_each_cell_and_draws_the_depth_chart(cache_dir, embedded):
    from app_pages import error_map

    at = _page()
    at.run()
    at.selectbox(key="bulk_precision").set_value("int8")
    _button(at, "Apply to everything").click()
    at.run()
    charts = len(at.get("plotly_chart"))
    at.radio(key="lm_overlay").set_value("accumulated").run()
    assert not at.exception
    at.button(key="lm_diagnose").click().run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == charts + 1  # the depth chart
    at.run()  # the diagnosis is memoized: no button to press again
    assert not at.exception and not any(b.key == "lm_diagnose" for b in at.button)
    # each cell: shaded by its SQNR, its figure under the precision, both SQNRs in the hover
    diagnosis = Diagnosis(plan=FP32, sentences=2, rows=(
        OpRow(op="a", layer="a", kind="linear", block=0, precision="int8", local_sqnr_db=35.0,
              accumulated_sqnr_db=12.0, weight_sqnr_db=45.0, activation_sqnr_db=36.0),
        OpRow(op="b", layer="b", kind="linear", block=1, precision="fp32", local_sqnr_db=None,
              accumulated_sqnr_db=None, weight_sqnr_db=None, activation_sqnr_db=None)))
    cells = [{"layer": "a", "tip": "a"}, {"layer": "b", "tip": "b"}]
    error_map.annotate(cells, diagnosis, "accumulated")
    assert cells[0]["note"] == "12 dB" and "local SQNR 35.0 dB" in cells[0]["tip"] and "weights 45.0" in cells[0]["tip"]
    assert cells[1]["note"] == "exact"
    error_map.annotate(cells, diagnosis, "local")
    assert cells[0]["note"] == "35 dB"
    assert error_map.shade(5.0)[1] == "#fff" and error_map.shade(None)[0] == "#d9d9d9"
    assert error_map.shade(60.0) != error_map.shade(15.0)
    assert len(error_map.depth_chart(diagnosis).data) == 2  # the line and the int8 markers
