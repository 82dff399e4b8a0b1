"""The one evaluation path: staged forward = the model's forward, incremental runs = full runs, evaluate()'s fields."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from engine.data.sets import EvalSet, load_dataset
from engine.core.plan import FP32, PRECISIONS, Plan, PlanError
from engine.core.stats import compare
from engine.evaluation.evaluate import evaluate, get_evaluator
from engine.evaluation.evaluator import EvalError, Evaluator, RunSummary
from engine.evaluation.session import Session, StateBudget
from engine.model.inventory import list_layers
from engine.quant.apply import apply_plan
from engine.runtime.device import DeviceError, model_on, resolve_device

from conftest import _tiny

CONTRACT_FIELDS = ("accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p", "size_bytes")


@pytest.fixture(scope="module")
def small_set() -> EvalSet:
    return load_dataset("embedded").head(96)


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def tiny_evaluator(request, tokenizer, small_set):
    return Evaluator(_tiny(request.param), tokenizer, small_set, batch_size=16, keep_states=True)


def test_staged_forward_equals_the_models_own(tiny_evaluator):
    evaluator = tiny_evaluator
    assert evaluator.stages.block_cuts and evaluator.stages.mid_cuts, evaluator.stages.notes
    for plan in (FP32, Plan.uniform("int8"), Plan.from_json({"*.layer.1.*": "int4", "classifier": "fp16"})):
        direct_model = apply_plan(evaluator.model, plan)
        staged = evaluator.stages.staged(apply_plan(evaluator.model, plan))
        for batch in evaluator.batches:
            with torch.inference_mode():
                keep: dict = {}
                full = staged(batch.inputs, keep=keep)
                direct = direct_model(**batch.inputs).logits
                assert torch.allclose(full, direct, atol=1e-5, rtol=1e-5)
                for cut, state in keep.items():  # resuming at any kept cut gives the same logits
                    assert torch.equal(staged(batch.inputs, cut, state), full), cut


def test_batches_are_length_sorted_and_logits_in_dataset_order(tiny_evaluator, tokenizer, small_set):
    evaluator = tiny_evaluator
    widths = [batch.inputs["input_ids"].shape[1] for batch in evaluator.batches]
    assert widths == sorted(widths)
    rows = np.concatenate([batch.rows for batch in evaluator.batches])
    assert sorted(rows.tolist()) == list(range(len(small_set)))
    # row i of the logits is text i, in (negative, positive) order
    for i in (0, 17, 95):
        encoded = tokenizer(small_set.texts[i], return_tensors="pt")
        with torch.inference_mode():
            own = evaluator.model(**encoded).logits[0].numpy()
        assert np.allclose(evaluator.baseline_logits[i], own, atol=1e-5)
    result = evaluator.baseline
    assert result.comparison.n == len(small_set) and result.comparison.agreement == 1.0
    assert np.array_equal(result.predictions, evaluator.baseline_logits.argmax(-1))
    assert np.allclose(result.probs.sum(-1), 1.0)


def _random_plan(rng: random.Random, names: list[str]) -> Plan:
    chosen = rng.sample(names, rng.randint(1, 5))
    rules = [(name, rng.choice(PRECISIONS)) for name in chosen]
    if rng.random() < 0.3:
        rules.insert(0, (rng.choice(["*", "*.layer.1.*", "*attention*"]), rng.choice(("int8", "int4"))))
    options = {}
    if rng.random() < 0.15:
        options["act"] = "token"
    if rng.random() < 0.15:
        options["group_size"] = 16
    return Plan(tuple(rules), **options)


def test_incremental_runs_equal_full_runs(tiny_evaluator):
    evaluator = tiny_evaluator
    names = list_layers(evaluator.model)
    rng = random.Random(7)
    source = evaluator.baseline_trace
    starts = set()
    for _ in range(20):
        plan = _random_plan(rng, names)
        full, _ = evaluator.run(plan)
        incremental, trace = evaluator.run(plan, source=source, keep=True)
        assert np.array_equal(incremental.logits, full.logits), plan.to_json()
        assert incremental.comparison == full.comparison
        starts.add(incremental.start_cut)
        source = trace
    assert len(starts) > 2  # the runs really started at different cuts
    assert max(starts) > 0


def test_session_updates_equal_full_runs(tiny_evaluator):
    evaluator = tiny_evaluator
    names = list_layers(evaluator.model)
    rng = random.Random(11)
    session = Session(evaluator, StateBudget())
    plan = FP32
    for step in range(20):
        # the layer map's gesture: toggle one layer of the current plan
        name = rng.choice(names)
        plan = Plan(plan.rules + ((name, rng.choice(PRECISIONS)),))
        updated = session.update(plan)
        full, _ = evaluator.run(plan)
        assert np.array_equal(updated.logits, full.logits), (step, plan.to_json())
        assert session.plan == plan
    again = session.update(plan)
    assert again is session.result  # the current plan answers at once
    assert np.array_equal(session.update(FP32).logits, evaluator.baseline_logits)


def test_progress_reports_a_running_estimate(tiny_evaluator):
    seen = []
    result, _ = tiny_evaluator.run(Plan.uniform("int8"), progress=seen.append)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == seen[-1].total == len(tiny_evaluator.dataset)
    assert seen[-1].accuracy == pytest.approx(result.comparison.accuracy)
    assert seen[-1].ci95 == pytest.approx(result.comparison.ci95)
    assert all(0 <= p.ci95[0] <= p.accuracy <= p.ci95[1] <= 1 for p in seen)


def test_run_result_matches_compare(tiny_evaluator):
    evaluator = tiny_evaluator
    result, _ = evaluator.run(Plan.uniform("int4"))
    expected = compare(result.logits, evaluator.labels, evaluator.baseline_logits)
    assert result.comparison == expected
    assert result.kernels == "simulated" and result.plan == Plan.uniform("int4")


def test_a_summary_is_the_results_figures_and_survives_its_stored_form(tiny_evaluator):
    result, _ = tiny_evaluator.run(Plan.uniform("int4"))
    summary = result.summary()
    assert summary.comparison == result.comparison
    assert np.array_equal(summary.predictions, result.predictions) and len(summary.confidence) == summary.n
    stored = json.loads(json.dumps(summary.to_json()))  # what the cache and the grid's workers keep
    assert RunSummary.from_json(stored) == summary
    assert list(stored)[:7] == ["accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p"]


def test_evaluate_returns_the_contract_fields(tokenizer, small_set):
    model = _tiny("distilbert")
    out = evaluate(model, tokenizer, small_set, Plan.uniform("int8"), limit=64)
    for key in CONTRACT_FIELDS:
        assert key in out, key
    assert out["n"] == 64
    assert 0 <= out["ci95"][0] <= out["accuracy"] <= out["ci95"][1] <= 1
    assert 0 <= out["agreement"] <= 1 and out["flips"] == round((1 - out["agreement"]) * 64)
    assert out["kl"] >= 0 and 0 <= out["mcnemar_p"] <= 1 and out["size_bytes"] > 0
    fp32 = evaluate(model, tokenizer, small_set, "fp32", limit=64)
    assert (fp32["agreement"], fp32["flips"], fp32["kl"], fp32["mcnemar_p"]) == (1.0, 0, 0.0, 1.0)
    assert fp32["size_bytes"] > out["size_bytes"]


def test_a_model_edited_after_its_evaluator_was_built_never_serves_its_old_weights(tokenizer, small_set):
    edited, fresh = _tiny("bert"), _tiny("bert")  # the same weights: the same key at first
    get_evaluator(edited, tokenizer, small_set)
    with torch.no_grad():
        edited.classifier.bias += 5.0  # its evaluator now holds other weights than its key says
    served = get_evaluator(fresh, tokenizer, small_set)
    assert served.model is fresh
    built = Evaluator(_tiny("bert"), tokenizer, small_set)  # outside the memo
    assert np.array_equal(served.baseline_logits, built.baseline_logits)
    assert np.array_equal(served.run(Plan.uniform("int8"))[0].logits, built.run(Plan.uniform("int8"))[0].logits)


def test_evaluate_rejects_bad_input(tokenizer, small_set):
    model = _tiny("bert")
    with pytest.raises(PlanError, match="matches no layer"):
        evaluate(model, tokenizer, small_set, {"*.nothing": "int8"})
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(EvalError, match="empty"):
        Evaluator(model, tokenizer, EvalSet("none", (), ()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moving_to_cuda_leaves_the_shared_model_on_cpu():
    model = _tiny("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moved = model_on(model, torch.device("cuda"))
    assert next(moved.parameters()).is_cuda
    assert all(not p.is_cuda for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_embedded_reaches_its_accuracy(embedded):
    model, tokenizer = embedded
    out = evaluate(model, tokenizer, "embedded")
    assert out["n"] >= 1000
    assert out["accuracy"] >= 0.85, out
    assert out["ci95"][0] < out["accuracy"] < out["ci95"][1]


def test_one_sessions_states_never_exceed_the_budget_and_stay_exact(tiny_evaluator):
    evaluator = tiny_evaluator
    names = list_layers(evaluator.model)
    last_query = Plan.from_mapping({names[-8]: "int4"})  # the head's input stays its first row: small
    last_ffn_out = Plan.from_mapping({names[-3]: "int8"})  # per-tensor scales: the head's input kept token-wide
    probe = Session(evaluator, StateBudget())
    probe.update(last_query)
    first_new_cut = min(c for c in probe.trace.states[0] if c > probe.result.start_cut)
    one_cut = sum(batch[first_new_cut].numel() * batch[first_new_cut].element_size() for batch in probe.trace.states)
    budget = StateBudget(limit_bytes=one_cut // 2)  # not even one token-wide cut fits
    first, second = Session(evaluator, budget), Session(evaluator, budget)
    first.update(last_query)
    assert 0 < first.owned_bytes() <= budget.limit  # the latest cut, which fits; not the one before it
    assert max(first.trace.states[0]) == max(probe.trace.states[0])
    assert len(first.trace.states[0]) < len(probe.trace.states[0])
    second.update(last_ffn_out)
    assert second.owned_bytes() <= budget.limit  # its token-wide head input did not fit: dropped after the run
    for session, plan in ((first, Plan.from_mapping({names[-8]: "int4", names[-2]: "int8"})),
                          (second, Plan.from_mapping({names[-3]: "int8", names[-1]: "int4"}))):
        again = session.update(plan)
        full, _ = evaluator.run(again.plan)
        assert np.array_equal(again.logits, full.logits)  # resumed from fewer or the FP32 states, still exact
        assert session.owned_bytes() <= budget.limit
    nothing = Session(evaluator, StateBudget(limit_bytes=1))
    assert np.array_equal(nothing.update(last_query).logits, probe.result.logits) and nothing.owned_bytes() == 0


def test_room_for_an_update_is_made_before_it_runs(tiny_evaluator, monkeypatch):
    evaluator = tiny_evaluator
    names = list_layers(evaluator.model)
    first_plan, second_plan = Plan.from_mapping({names[1]: "int8"}), Plan.from_mapping({names[2]: "int4"})
    probe = Session(evaluator, StateBudget())
    probe.update(first_plan)
    one_session = probe.owned_bytes()
    budget = StateBudget(limit_bytes=int(one_session * 1.5))  # one session's states fit, not two
    first, second = Session(evaluator, budget), Session(evaluator, budget)
    first.update(first_plan)
    assert first.owned_bytes() == one_session
    run = evaluator.run
    alive_at_start = []

    def watched(*args, **kwargs):
        alive_at_start.append(first.trace is not None)
        return run(*args, **kwargs)

    monkeypatch.setattr(evaluator, "run", watched)
    second.update(second_plan)
    assert alive_at_start == [False]  # dropped before the new states were computed, not after
    assert second.owned_bytes() > 0
    monkeypatch.undo()
    assert np.array_equal(second.result.logits, evaluator.run(second_plan)[0].logits)


def test_a_baseline_over_its_budget_keeps_fewer_cuts_and_stays_exact(tokenizer, small_set):
    model = _tiny("bert")
    full_states = Evaluator(model, tokenizer, small_set, batch_size=16, keep_states=True)
    assert full_states.kept_cuts is None  # the tiny model's states fit
    needed = full_states.baseline_trace.nbytes() / 1024**2
    kept = full_states.affordable_cuts(needed / 2)
    assert kept and len(kept) < len(full_states.baseline_trace.states[0]) and max(kept) == full_states.last_cut
    evaluator = Evaluator(model, tokenizer, small_set, batch_size=16, keep_states=True, kept_cuts=kept)
    assert set(evaluator.baseline_trace.states[0]) == set(kept)
    names = list_layers(model)
    session = Session(evaluator, StateBudget())
    rng = random.Random(3)
    for _ in range(8):
        plan = _random_plan(rng, names)
        updated = session.update(plan)
        assert np.array_equal(updated.logits, evaluator.run(plan)[0].logits), plan.to_json()
        assert set(session.trace.states[0]) <= set(kept)


def test_a_budget_too_small_for_token_states_still_keeps_the_first_row_head_state(tokenizer, small_set):
    model = _tiny("bert")
    everything = Evaluator(model, tokenizer, small_set, batch_size=16, keep_states=True)
    sizes = {cut: sum(batch[cut].numel() * batch[cut].element_size() for batch in everything.baseline_trace.states)
             for cut in everything.baseline_trace.states[0]}
    row_cuts = [cut for cut in sizes if everything.baseline_trace.states[0][cut].shape[1] == 1]
    assert row_cuts, "the tiny BERT's last block hands its head only the first row"
    wide = min(size for cut, size in sizes.items() if cut not in row_cuts)
    kept = everything.affordable_cuts(min(wide * 0.9, sizes[max(row_cuts)] * 1.5) / 1024**2)
    assert kept == {max(row_cuts)}
    evaluator = Evaluator(model, tokenizer, small_set, batch_size=16, keep_states=True, kept_cuts=kept)
    last = [layer.name for layer in evaluator.layers if evaluator.cuts[layer.name] >= max(row_cuts)]
    assert last, "some layer runs after the first-row cut"
    session = Session(evaluator, StateBudget())
    plan = Plan.from_mapping({last[-1]: "int8"})
    updated = session.update(plan)
    assert updated.start_cut == max(row_cuts)
    assert np.array_equal(updated.logits, evaluator.run(plan)[0].logits)
