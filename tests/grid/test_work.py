"""The grid's adapter to the engine: a model described by its fingerprint and layers, one model kept loaded,
a worker state that serves many tasks with the results the engine gives directly, and a task whose weights,
sentences, plan or layer differ from the driver's refused in one line. On a tiny saved BERT."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

import zoo
from engine.core.plan import Plan, PlanError
from engine.core.vocabulary import TaskKind
from engine.data.sets import load_dataset
from engine.grid import work
from engine.grid.tasks import Task
from engine.model.inventory import list_layers
from engine.model.loading import fingerprint
from engine.runtime.size import model_size_bytes

LIMIT = 16
DATA = "embedded"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {family: str(zoo.save(family, tmp_path_factory.mktemp(family) / "model"))
            for family in ("bert", "distilbert")}


@pytest.fixture(scope="module")
def state(folders):
    threads = torch.get_num_threads()
    opened = work.open_state(folders["bert"], DATA, limit=LIMIT, keep_states=True, threads=1)
    yield opened
    torch.set_num_threads(threads)


def _figures(row) -> dict:
    """A summary or row as JSON, without its timing (which no two runs share)."""
    data = row if isinstance(row, dict) else row.to_json()
    return {k: v for k, v in data.items() if k != "seconds"}


def _eval(folder: str, plan: dict, state, **fields) -> Task:
    return Task(kind=TaskKind.EVAL, model=folder, data=DATA, limit=LIMIT, plan=json.dumps(plan), plan_name="test",
                model_fp=state.model_fp, data_fp=state.data.fingerprint, **fields)


def test_describe_names_the_weights_and_the_layers_in_forward_order(folders):
    model = work.driver_model(folders["bert"])
    info = work.describe(model)
    assert info.fingerprint == fingerprint(model)
    assert info.layers == tuple(list_layers(model)) and len(info.layers) > 4
    assert info != work.describe(work.driver_model(folders["distilbert"]))


def test_the_driver_keeps_only_the_last_model_loaded(folders):
    bert = work.driver_model(folders["bert"])
    assert work.driver_model(folders["bert"]) is bert  # loaded once while it is the last
    work.driver_model(folders["distilbert"])
    again = work.driver_model(folders["bert"])
    assert again is not bert and fingerprint(again) == fingerprint(bert)  # let go, then loaded anew


def test_data_fingerprint_follows_the_rows():
    assert work.data_fingerprint(DATA, LIMIT) == load_dataset(DATA).head(LIMIT).fingerprint
    assert work.data_fingerprint(DATA, LIMIT) != work.data_fingerprint(DATA, LIMIT + 1)


def test_worker_id_names_the_host_and_the_process():
    assert work.worker_id() == f"{socket.gethostname()}:{os.getpid()}"


def test_open_state_loads_the_model_and_the_set_once(folders, state):
    assert torch.get_num_threads() == 1
    assert state.model_fp == fingerprint(state.model) == work.describe(work.driver_model(folders["bert"])).fingerprint
    assert len(state.data) == LIMIT and state.evaluator is not None and state.open_s > 0


def test_an_eval_task_gives_the_evaluators_summary_and_the_plans_size(folders, state):
    plan = {"*": "int8"}
    out = work.run_task(state, _eval(folders["bert"], plan, state))
    assert set(out) == {"summary", "size_bytes"}
    result, _ = state.evaluator.run(Plan.from_json(plan), "simulated")
    assert _figures(out["summary"]) == _figures(result.summary())
    assert out["size_bytes"] == model_size_bytes(state.model, Plan.from_json(plan))
    assert out["size_bytes"] < model_size_bytes(state.model, Plan.uniform("fp32"))


def test_an_eval_task_with_latency_times_it_and_says_where(folders, state):
    out = work.run_task(state, _eval(folders["bert"], {"*": "fp32"}, state, latency=True))
    latency = out["latency"]
    assert 0 < latency["latency_ms_p50"] <= latency["latency_ms_p95"] and latency["throughput_per_s"] > 0
    assert latency["machine"]["host"] == socket.gethostname() and latency["machine"]["batch"] == 1


def test_a_sensitivity_task_gives_its_row_and_computes_the_proxy_once(folders, state):
    layer = work.describe(state.model).layers[3]
    task = Task(kind=TaskKind.SENSITIVITY, model=folders["bert"], data=DATA, limit=LIMIT, layer=layer,
                precision="int8", model_fp=state.model_fp, data_fp=state.data.fingerprint)
    row = work.run_task(state, task)["row"]
    assert (row["layer"], row["precision"], row["direction"]) == (layer, "int8", "one")
    assert 0 <= row["accuracy"] <= 1
    proxy = state.sqnr
    assert proxy and _figures(work.run_task(state, task)["row"]) == _figures(row) and state.sqnr is proxy


@pytest.mark.parametrize("change, message", [
    ({"model_fp": "0" * 16}, "differ from the driver's"),
    ({"data_fp": "0" * 16}, "differs from the driver's"),
    ({"layer": "no.such.layer"}, "has no layer 'no.such.layer'"),
])
def test_a_task_that_does_not_fit_the_worker_is_one_line(folders, state, change, message):
    fields = {"kind": TaskKind.SENSITIVITY, "model": folders["bert"], "data": DATA, "limit": LIMIT,
              "layer": work.describe(state.model).layers[0], "precision": "int8", "model_fp": state.model_fp,
              "data_fp": state.data.fingerprint}
    with pytest.raises(ValueError, match=message) as error:
        work.run_task(state, Task(**{**fields, **change}))
    assert "\n" not in str(error.value)


def test_a_plan_matching_no_layer_is_the_tasks_error(folders, state):
    with pytest.raises(PlanError, match="distilbert"):
        work.run_task(state, _eval(folders["bert"], {"distilbert.transformer.*": "int8"}, state))


def test_close_state_lets_go_of_the_evaluator_and_keeps_the_model(folders):
    opened = work.open_state(folders["bert"], DATA, limit=4)
    work.close_state(opened)
    assert opened.evaluator is None and opened.sqnr is None
    assert work.driver_model(folders["bert"]) is opened.model
