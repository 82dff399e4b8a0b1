"""The pages' deployment and cluster paths: the layer map's runtime selector and export button, the
comparison across runtimes, and "Run on the cluster" where RAY_ADDRESS is set."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import zoo
from engine.core.cpu import this_cpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return zoo.save("bert", tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _page(name: str, folder: Path, limit: int = 24) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{name}.py"), default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = limit
    return at.run()


def test_layer_map_runtime_selector_and_export(folder, cache_dir):
    from engine.analysis.deploy import archive, export_name

    at = _page("layer_map", folder)
    assert not at.exception and at.radio(key="lm_runtime").value == "torch"
    at.selectbox(key="bulk_precision").set_value("int8")
    next(b for b in at.button if b.label == "Apply to everything").click().run()
    tried = len(at.session_state["plan_history"])
    at.radio(key="lm_runtime").set_value("onnxruntime").run()
    assert not at.exception
    plan = at.session_state["plan"]
    assert plan.runtime == "onnxruntime" and set(plan.to_json()["options"].values()) == {"onnxruntime"}
    assert {p for k, p in plan.to_json().items() if k != "options"} == {"int8"}
    history = at.session_state["plan_history"]
    assert len(history) == tried + 1 and history[-1].key == plan.key()  # evaluated on ORT's numerics
    at.button(key="export_layer_map").click().run()
    assert not at.exception and not at.error
    assert any(c.value.startswith("Exported layer-map plan") for c in at.caption)
    made = next(iter(at.session_state["exports_made"].values()))
    card = json.loads((Path(made) / "card.json").read_text())
    # the folder's plan names the CPU its int8 was written for (this machine's, as the page's plan left it open)
    assert card["plan"] == plan.for_cpu(this_cpu().value).to_json() and card["measured"]["n"] == 24
    assert any(c.value.startswith("Written for") and this_cpu().value in c.value for c in at.caption)
    # a plan for an AVX2 server: the page says what its int8 is written for, and the plan carries the target
    assert at.selectbox(key="lm_target_cpu").value == "this machine"  # a choice shown, never "Choose an option"
    at.selectbox(key="lm_target_cpu").set_value("avx2").run()
    assert not at.exception and at.session_state["plan"].target_cpu == "avx2"
    assert any("7-bit" in c.value for c in at.caption)
    plan = at.session_state["plan"]
    named = export_name(str(folder), "layer-map plan", plan)  # the download: the model and plan, not the hash
    assert named.startswith("bert-layer-map-plan-int8-ort-")
    names = zipfile.ZipFile(io.BytesIO(archive(made, named))).namelist()
    assert {f"{named}/model.onnx", f"{named}/card.json"} <= set(names)
    # A BF16 layer cannot run on ONNX Runtime: the change is refused with its reason, the plan kept.
    at.selectbox(key="bulk_precision").set_value("bf16")
    next(b for b in at.button if b.label == "Apply to everything").click().run()
    assert at.session_state["plan"].key() == plan.key() and any("bfloat16" in e.value.lower() for e in at.error)


def test_compare_across_runtimes(folder, cache_dir):
    at = _page("compare", folder, limit=16)
    at.multiselect(key="compare_presets").set_value(["fp32", "int8"])
    at.multiselect(key="compare_sets").set_value(["embedded"])
    at.multiselect(key="compare_runtimes").set_value(["torch", "onnxruntime"]).run()
    assert not [b for b in at.button if b.label == "Evaluate on the cluster"]  # no RAY_ADDRESS, no cluster
    next(b for b in at.button if b.label == "Run comparison").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["plan"]) == ["FP32", "FP32 · ORT", "INT8", "INT8 · ORT"]
    at.button(key="export_compare").click().run()
    assert not at.exception and any(c.value.startswith("Exported FP32") for c in at.caption)


@pytest.fixture()
def ray_cluster(monkeypatch):
    pytest.importorskip("ray")
    from engine.grid.ray_backend import start_local_cluster, stop_local_cluster

    temp_dir = None
    try:
        temp_dir = start_local_cluster(num_cpus=1)
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # the pages see a cluster; this process is connected
        yield
    finally:
        stop_local_cluster(temp_dir)


def test_sensitivity_runs_on_the_cluster(folder, cache_dir, ray_cluster):
    at = _page("sensitivity", folder)
    assert not at.exception and not at.button(key="sens_run").disabled
    at.multiselect(key="sens_precisions").set_value(["int8"]).run()
    at.button(key="sens_cluster").click().run()
    assert not at.exception and not at.error
    assert at.button(key="sens_run").disabled  # every row landed in the page's own entries
    assert len(at.get("plotly_chart")) >= 3
