"""Plans: JSON round trip, rule order, shorthand, validation errors that name the entry, stable keys, parsing."""
from __future__ import annotations

import json

import pytest

from engine.model.inventory import list_layers
from engine.core.plan import FP32, PRECISIONS, Plan, PlanError, parse_plan

NAMES = ["bert.embeddings.word_embeddings",
         "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
         "bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.self.query",
         "bert.pooler.dense", "classifier"]


@pytest.mark.parametrize("plan", [
    FP32,
    Plan.uniform("int8"),
    Plan.from_mapping({"*": "int8", "*.query": "int4", "classifier": "fp32"}),
    Plan.uniform("int4", group_size=32),
    Plan.uniform("int8", act="token", calib=16),
    Plan.uniform("int8", act="static", smooth_alpha=0.5),
    Plan.uniform("int8", smooth_alpha=(("*.query", 0.25), ("*", 0.75))),
])
def test_json_round_trip(plan):
    text = json.dumps(plan.to_json())
    again = Plan.from_json(json.loads(text))
    assert again == plan
    assert again.key() == plan.key()
    assert parse_plan(text) == plan


def test_later_entries_win():
    plan = Plan.from_json({"*": "int8", "*.query": "int4", "bert.encoder.layer.1.*": "fp16"})
    resolved = plan.resolve(NAMES)
    assert resolved["bert.encoder.layer.0.attention.self.query"] == "int4"
    assert resolved["bert.encoder.layer.1.attention.self.query"] == "fp16"
    assert resolved["bert.encoder.layer.0.output.dense"] == "int8"
    assert resolved["classifier"] == "int8"
    reversed_order = Plan.from_json({"*.query": "int4", "*": "int8"})
    assert set(reversed_order.resolve(NAMES).values()) == {"int8"}


def test_unmatched_layers_stay_fp32():
    resolved = Plan.from_json({"*.value": "int8"}).resolve(NAMES)
    assert resolved.pop("bert.encoder.layer.0.attention.self.value") == "int8"
    assert set(resolved.values()) == {"fp32"}
    assert set(FP32.resolve(NAMES).values()) == {"fp32"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bare_precision_is_shorthand_for_star(precision):
    assert Plan.from_json(precision) == Plan.from_json({"*": precision}) == Plan.uniform(precision)
    assert parse_plan(precision) == Plan.uniform(precision)
    assert parse_plan(f" {precision}\n") == Plan.uniform(precision)
    assert parse_plan(json.dumps(precision)) == Plan.uniform(precision)
    assert set(Plan.uniform(precision).resolve(NAMES).values()) == {precision}


def test_unknown_precision_names_the_entry():
    with pytest.raises(PlanError, match=r"plan entry '\*\.query': unknown precision 'int3'"):
        Plan.from_json({"*": "int8", "*.query": "int3"})
    with pytest.raises(PlanError, match=r"'int2'"):
        parse_plan('"int2"')
    with pytest.raises(PlanError, match=r"plan entry 'classifier': a rule is a precision or an object"):
        Plan.from_json({"classifier": 8})
    with pytest.raises(PlanError, match="non-empty"):
        Plan.from_json({"": "int8"})
    with pytest.raises(PlanError, match="JSON object or a precision, not list"):
        Plan.from_json(["int8"])


def test_pattern_matching_no_layer_names_the_entry(tiny_bert):
    plan = Plan.from_json({"*": "int8", "*.no_such_layer": "int4"})
    with pytest.raises(PlanError, match=r"plan entry '\*\.no_such_layer': matches no layer"):
        plan.resolve(list_layers(tiny_bert))
    assert plan.resolve(list_layers(tiny_bert), strict=False)["classifier"] == "int8"


@pytest.mark.parametrize("options, message", [
    ({"group_size": 0}, "group_size"),
    ({"group_size": -64}, "group_size"),
    ({"group_size": "64"}, "group_size"),
    ({"group_size": 32.0}, "group_size"),
    ({"group_size": True}, "group_size"),
    ({"act": "per-channel"}, "act"),
    ({"smooth_alpha": 1.5}, "smooth_alpha"),
    ({"smooth_alpha": -0.1}, "smooth_alpha"),
    ({"smooth_alpha": "0.5"}, "smooth_alpha"),
    ({"smooth_alpha": True}, "smooth_alpha"),
    ({"smooth_alpha": {"*.query": 2}}, "smooth_alpha"),
    ({"calib": 0}, "calib"),
    ({"calib": False}, "calib"),
    ({"bits": 4}, "'bits'"),
])
def test_option_validation(options, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json({"*": "int4", "options": options})


def test_valid_options():
    plan = Plan.from_json({"*": "int8", "options": {"group_size": 128, "act": "token", "calib": 8,
                                                    "smooth_alpha": {"*": 0.5, "*.query": 0.8}}})
    assert (plan.group_size, plan.act, plan.calib) == (128, "token", 8)
    assert plan.alpha_for("bert.encoder.layer.0.attention.self.query") == 0.8
    assert plan.alpha_for("classifier") == 0.5
    assert Plan.uniform("int8", smooth_alpha=0).alpha_for("classifier") == 0.0
    assert Plan.uniform("int8").alpha_for("classifier") is None
    assert Plan.uniform("int8", smooth_alpha=(("*.query", 0.5),)).alpha_for("classifier") is None
    for act in ("dynamic", "static", "token"):
        assert Plan.uniform("int8", act=act).act == act


def test_key_is_stable_across_dict_order():
    first = Plan.from_json({"*": "int8", "options": {"group_size": 32, "act": "token", "calib": 16}})
    second = Plan.from_json({"options": {"calib": 16, "act": "token", "group_size": 32}, "*": "int8"})
    assert first == second and first.key() == second.key()
    assert len(first.key()) == 16
    assert Plan.uniform("int8").key() == Plan.from_json("int8").key() == parse_plan("int8").key()
    # defaults spelled out are the defaults
    assert Plan.from_json({"*": "int8", "options": {"group_size": 64, "act": "dynamic"}}).key() == \
        Plan.uniform("int8").key()


def test_key_differs_for_different_plans():
    plans = [
        FP32, Plan.uniform("int8"), Plan.uniform("int4"), Plan.uniform("fp16"), Plan.uniform("bf16"),
        Plan.uniform("int4", group_size=32), Plan.uniform("int8", act="token"), Plan.uniform("int8", calib=64),
        Plan.uniform("int8", smooth_alpha=0.5), Plan.uniform("int8", smooth_alpha=0.6),
        Plan.from_json({"*": "int8", "*.query": "int4"}),
        Plan.from_json({"*.query": "int4", "*": "int8"}),  # same rules, other order: another meaning
        # per-layer alphas where order decides which one a query layer gets
        Plan.uniform("int8", smooth_alpha=(("*", 0.5), ("*.query", 0.8))),
        Plan.uniform("int8", smooth_alpha=(("*.query", 0.8), ("*", 0.5))),
    ]
    keys = [plan.key() for plan in plans]
    assert len(set(keys)) == len(keys)


def test_compact_and_label():
    plan = Plan.from_json({"*": "int8", "*.query": "fp32"})
    compact = plan.compact(NAMES)
    assert compact.resolve(NAMES) == plan.resolve(NAMES)
    assert all("*" not in pattern for pattern, _ in compact.rules)
    assert Plan.uniform("int4").label() == "int4"
    assert FP32.label() == "fp32"
    assert plan.label().startswith("plan-")


def test_parse_plan_sources(tmp_path):
    assert parse_plan(None) == FP32 and parse_plan("  ") == FP32
    inline = parse_plan('{"*.query": "int8", "classifier": "fp16"}')
    assert inline == Plan.from_mapping({"*.query": "int8", "classifier": "fp16"})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"*": "int4", "options": {"group_size": 32}}))
    from_file = parse_plan(str(path))
    assert from_file == Plan.uniform("int4", group_size=32)


def test_parse_plan_errors(tmp_path):
    with pytest.raises(PlanError, match="neither a precision"):
        parse_plan('{"*": "int8"')
    with pytest.raises(PlanError, match="neither a precision"):
        parse_plan("int9")
    with pytest.raises(PlanError, match="does not exist"):
        parse_plan(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PlanError, match="valid JSON"):
        parse_plan(str(broken))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"*": "int7"}')
    with pytest.raises(PlanError, match="'int7'"):
        parse_plan(str(wrong))
