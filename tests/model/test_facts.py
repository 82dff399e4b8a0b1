"""What the engine learns about a model is kept beside it (engine.model.facts): nothing in the model's __dict__,
none on a copy, gone with the model."""
from __future__ import annotations

import copy
import gc
import threading
import weakref

import torch

from engine.core.plan import as_plan
from engine.model.facts import facts
from engine.model.graph import model_graph
from engine.model.inventory import inventory
from engine.model.loading import fingerprint
from engine.model.stages import stages_of
from engine.quant.apply import apply_plan, shallow_copy
from engine.quant.smoothing import verified_folds


def _learn_everything(model) -> None:
    fingerprint(model)
    inventory(model)
    model_graph(model)
    stages_of(model)
    verified_folds(model)


def test_nothing_is_written_into_the_model_and_every_fact_is_kept_once(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    before = set(vars(model))
    _learn_everything(model)
    assert set(vars(model)) == before
    known = facts(model)
    assert known.fingerprint and known.fingerprint_of and known.inventory and known.graph and known.stages
    assert known.folds is not None
    # the second asks answer the same objects: computed once
    assert inventory(model) is known.inventory and model_graph(model) is known.graph
    assert stages_of(model) is known.stages and verified_folds(model) is known.folds


def test_a_copy_starts_without_facts_and_a_built_model_carries_its_plan(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    _learn_everything(model)
    for twin in (copy.deepcopy(model), shallow_copy(model)):
        assert facts(twin).graph is None and facts(twin).inventory is None and facts(twin).fingerprint is None
        assert [layer.name for layer in inventory(twin)] == [layer.name for layer in inventory(model)]
    plan = as_plan("int8")
    built = apply_plan(model, plan)
    assert facts(built).plan == (plan, "simulated") and facts(model).plan is None
    assert facts(built).graph is None  # the built model's structure differs: learnt afresh if asked


def test_an_in_place_edit_is_hashed_afresh(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    first = fingerprint(model)
    assert fingerprint(model) == first
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert fingerprint(model) != first


def test_facts_go_with_their_model(tiny_bert):
    from engine.core.memo import registered

    model = copy.deepcopy(tiny_bert)
    _learn_everything(model)
    apply_plan(model, "int8")
    held = registered()["model.facts"][0]
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the facts hold nothing that keeps their model alive
    assert registered()["model.facts"][0] < held


def test_threads_asking_at_once_share_one_record(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    found, start = [], threading.Barrier(8)

    def ask():
        start.wait()
        found.append(facts(model))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(record) for record in found}) == 1
