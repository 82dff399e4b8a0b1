"""Quantization methods on the pages: the layer map's method beside the precision (the rule a click sets, its undo,
the cell's label, a refused combination), and the comparison page's methods view, on a tiny saved BERT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import zoo
from app_pages.layer_rules import ClickChoice, cell_text, click_tags, method_choices, method_tag
from engine.analysis.toggle import change_label, set_layers
from engine.analysis import methods as mth
from engine.core.plan import FP32, Plan, PlanError
from engine.core.rules import Rule
from engine.core.vocabulary import ActScheme, Calibrator, Runtime, WeightMethod
from engine.model.inventory import list_layers
from engine.model.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return zoo.save("bert", tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture(scope="module")
def names(folder):
    return list_layers(load_model(str(folder))[0])


def _page(name: str, folder: Path, tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{name}.py"), default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = LIMIT
    return at


def _click(at: AppTest, layer: str) -> None:
    """What the grid sends after one more click: its whole click log."""
    log = list(at.session_state["test_log"]) if "test_log" in at.session_state else []
    log.append({"seq": len(log) + 1, "layer": layer})
    at.session_state["test_log"] = log
    at.session_state["lm_grid"] = {"clicks": {"epoch": "e1", "log": log, "total": len(log)}}


def _grid_cells(at: AppTest) -> list[dict]:
    """The cells the page sent to the grid component."""
    import json

    element = next(e for e in at.get("bidi_component") if "cells" in e.proto.json)
    return json.loads(element.proto.json)["cells"]


# ---- plain functions ----------------------------------------------------------------------------
def test_a_click_rule_carries_only_the_options_its_precision_takes():
    gptq = ClickChoice(WeightMethod.GPTQ, bias_correction=True, group_size=32)
    assert gptq.rule(FP32, "int4") == Rule("int4", (("method", "gptq"), ("bias_correction", True),
                                                    ("group_size", 32)))
    assert gptq.rule(FP32, "int8") == Rule("int8", (("bias_correction", True),))  # GPTQ takes INT4 only
    assert gptq.rule(FP32, "fp32") == Rule("fp32")  # a cycle's FP32 step stays plain
    assert ClickChoice().rule(FP32, "int4") == Rule("int4")  # the plan's own options: no option of its own
    static = ClickChoice(act=ActScheme.STATIC, calibration=Calibrator.ENTROPY)
    assert static.rule(FP32, "int8").get("calibration") == Calibrator.ENTROPY
    assert [m.value for m in method_choices("int4")] == ["rtn", "gptq", "awq", "hqq"]
    assert method_choices("int8") == [WeightMethod.RTN, WeightMethod.AWQ]
    assert method_choices("fp16") == [WeightMethod.RTN]


def test_cells_and_history_name_the_method(names):
    plan = set_layers(FP32, names, [names[3]], Rule("int4", (("method", "gptq"),)))
    spec = plan.specs(names)[names[3]]
    assert method_tag(spec) == "GPTQ" and cell_text("int4", method_tag(spec)) == "INT4·GPTQ"
    assert method_tag(plan.specs(names)[names[4]]) == ""
    rtn = set_layers(FP32, names, [names[3]], "int4")
    assert change_label(rtn, plan, names) == f"{names[3]} → INT4 GPTQ"  # same precision, another method
    assert change_label(FP32, rtn, names) == f"{names[3]} → INT4"
    tags = click_tags(ClickChoice(WeightMethod.GPTQ), FP32, "cycle", ["fp32", "int8", "int4"])
    assert tags == {"fp32": "", "int8": "", "int4": "GPTQ"}


# ---- the layer map -------------------------------------------------------------------------------
def test_a_click_sets_the_chosen_method_and_undo_restores_the_rule(folder, names, tmp_path, monkeypatch):
    at = _page("layer_map", folder, tmp_path, monkeypatch)
    at.run()
    assert not at.exception and not at.error
    at.radio(key="click_action").set_value("set INT4").run()
    _click(at, names[3])
    at.run()
    first = at.session_state["plan"]
    assert first.specs(names)[names[3]].method == WeightMethod.RTN
    at.selectbox(key="lm_method").set_value(WeightMethod.GPTQ).run()
    _click(at, names[3])
    at.run()
    assert not at.exception and not at.error
    plan = at.session_state["plan"]
    assert dict(plan.layer_rules(names))[names[3]] == Rule("int4", (("method", "gptq"),))
    cell = next(c for c in _grid_cells(at) if c["layer"] == names[3])
    assert cell["precision"] == "int4" and cell["tag"] == "GPTQ"
    assert at.session_state["plan_history"][-1].changed == f"{names[3]} → INT4 GPTQ"
    next(b for b in at.button if b.label == "Undo").click().run()
    assert not at.exception
    assert at.session_state["plan"].key() == first.key()
    assert dict(at.session_state["plan"].layer_rules(names))[names[3]] == Rule("int4")


def test_a_combination_the_runtime_refuses_shows_one_error_and_changes_nothing(folder, names, tmp_path,
                                                                                 monkeypatch):
    at = _page("layer_map", folder, tmp_path, monkeypatch)
    at.run()
    at.radio(key="lm_runtime").set_value(Runtime.ONNXRUNTIME).run()
    before = at.session_state["plan"]
    at.radio(key="click_action").set_value("set INT4").run()
    at.number_input(key="lm_group_size").set_value(48).run()  # MatMulNBits takes powers of two only
    _click(at, names[3])
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "power of two" in at.error[0].value
    assert at.session_state["plan"].key() == before.key()
    with pytest.raises(PlanError):
        set_layers(before, names, [names[3]], Rule("int4", (("group_size", 48),))).resolve(names)


# ---- the comparison page's methods view ----------------------------------------------------------
def test_the_methods_view_says_its_cost_then_runs_and_keeps_its_table(folder, tmp_path, monkeypatch):
    from app_pages import methods_view

    at = _page("compare", folder, tmp_path, monkeypatch)
    at.session_state["compare_tab"] = "Methods"
    at.run()
    assert not at.exception and not at.error
    assert any(c.value.startswith("About ") for c in at.caption)  # the estimate, before anything runs
    at.multiselect(key="mv_methods").set_value([WeightMethod.GPTQ])
    at.multiselect(key="mv_groups").set_value([32])
    at.multiselect(key="mv_calibrators").set_value([Calibrator.PERCENTILE])
    at.multiselect(key="mv_curve_sizes").set_value([16, 32])
    at.run()
    at.button(key="mv_methods-compare").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["setting"]) == ["int4 rtn g32", "int4 gptq g32", "w8a8 static minmax", "w8a8 static percentile"]
    assert list(table["against"]) == ["(the reference)", "int4 rtn g32", "(the reference)", "w8a8 static minmax"]
    assert table["McNemar p against it"].isna().tolist() == [True, False, True, False]
    at.button(key="mv_methods-curve").click().run()
    assert not at.exception and not at.error
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # the methods' accuracies and the curve
    fresh = _page("compare", folder, tmp_path, monkeypatch)  # another session: answered from the disk
    fresh.session_state["compare_tab"] = "Methods"
    for key, value in (("mv_methods", [WeightMethod.GPTQ]), ("mv_groups", [32]),
                       ("mv_calibrators", [Calibrator.PERCENTILE]), ("mv_curve_sizes", [16, 32])):
        fresh.session_state[key] = value
    fresh.run()
    assert not fresh.exception and len(fresh.dataframe) == 1 and len(fresh.get("plotly_chart")) == 2
    # the builders, on what the page stored
    rows = (mth.MethodRow(label="int4 rtn g32", precision="int4", method=WeightMethod.RTN, group_size=32,
                          calibrator=None, accuracy=0.5, ci95=(0.3, 0.7), agreement=1.0, flips=0, kl=0.0, n=10,
                          mcnemar_p_fp32=1.0, versus=None, mcnemar_p_versus=None, prepare_s=0.1, seconds=1.0,
                          plan=Plan.uniform("int4")),
            mth.MethodRow(label="w8a8 static entropy", precision="int8", method=WeightMethod.RTN, group_size=None,
                          calibrator=Calibrator.ENTROPY, accuracy=0.6, ci95=(0.4, 0.8), agreement=0.9, flips=3,
                          kl=0.1, n=10, mcnemar_p_fp32=0.25, versus="w8a8 static minmax", mcnemar_p_versus=0.01,
                          prepare_s=0.2, seconds=1.0, plan=Plan.uniform("int8")))
    report = mth.MethodsReport(rows=rows, fp32_accuracy=0.5, data="embedded", n=10, seconds=2.0)
    assert mth.MethodsReport.from_json(json.loads(json.dumps(report.to_json()))) == report  # as the cache keeps it
    frame = methods_view.methods_frame(report)
    assert frame["differs"].tolist() == [False, True] and frame["Δ vs FP32 (points)"].round(6).tolist() == [0, 10]
    assert [trace.name for trace in methods_view.methods_chart(report).data] == ["g32", "w8a8"]
    points = [mth.CurvePoint(calibrator=Calibrator.MINMAX, requested=size, texts=size, accuracy=accuracy,
                             ci95=(accuracy - 0.1, accuracy + 0.1), agreement=1.0, mcnemar_p_fp32=1.0, seconds=1.0)
              for size, accuracy in ((32, 0.6), (16, 0.5))]
    assert [mth.CurvePoint.from_json(json.loads(json.dumps(p.to_json()))) for p in points] == points
    curve = methods_view.curve_chart(points, 0.55)
    assert list(curve.data[0].x) == [16, 32] and list(curve.data[0].error_y.array) == pytest.approx([0.1, 0.1])


# ---- the sensitivity page ------------------------------------------------------------------------
def test_the_sweep_measures_each_method_and_keeps_its_rows(folder, names, tmp_path, monkeypatch):
    at = _page("sensitivity", folder, tmp_path, monkeypatch)
    at.run()
    assert not at.exception and not at.error
    assert at.multiselect(key="sens_methods").value == [WeightMethod.RTN]  # RTN only, unless asked
    at.multiselect(key="sens_precisions").set_value(["int4"])
    at.multiselect(key="sens_methods").set_value([WeightMethod.GPTQ]).run()
    rows = len(names) + len([n for n in names if "embeddings" not in n])  # RTN everywhere, GPTQ on the Linears
    assert any(f"0 of {rows} rows done" in c.value and "the rest will take about" in c.value for c in at.caption)
    at.button(key="sens_run").click().run()
    assert not at.exception and not at.error
    ranked = next(frame.value for frame in at.dataframe if "rescued by" in frame.value.columns)
    linears = [n for n in names if "embeddings" not in n]
    assert sorted(ranked[ranked["method"] == "GPTQ"]["layer"]) == sorted(linears)  # GPTQ where it applies
    assert len(ranked[ranked["method"] == "RTN"]) == len(names)
    again = _page("sensitivity", folder, tmp_path, monkeypatch)  # another session: every row is stored
    again.session_state["sens_precisions"] = ["int4"]
    again.session_state["sens_methods"] = [WeightMethod.GPTQ]
    again.run()
    assert not again.exception and again.button(key="sens_run").disabled


def test_rescued_by_names_the_cheapest_method_within_noise():
    from app_pages.methods_view import rescue_words
    from engine.analysis.sensitivity import Row

    def row(layer: str, method: WeightMethod, p: float) -> Row:
        return Row(layer, 0, "query", "int4", "one", 0.8, (0.7, 0.9), 3, 0.01, p, None, 1.0, 0.9, 100, 1, 0.1, method)

    rows = [row("a", WeightMethod.RTN, 0.001), row("a", WeightMethod.GPTQ, 0.5), row("a", WeightMethod.HQQ, 0.6),
            row("b", WeightMethod.RTN, 0.001), row("b", WeightMethod.GPTQ, 0.01),
            row("c", WeightMethod.RTN, 0.9), row("c", WeightMethod.GPTQ, 0.9), row("d", WeightMethod.RTN, 0.001)]
    # a: HQQ is cheaper than GPTQ; b: nothing swept keeps it; c: needs no rescue; d: no other method was swept
    assert rescue_words(rows) == {("a", "int4"): "HQQ", ("b", "int4"): "none swept"}
