"""The layer map, the typo playground and the SmoothQuant page on a user's own encoder and decoder (tiny
random RoBERTa with three classes, Llama with grouped KV heads), saved to folders as a user brings them."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import zoo

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"roberta": ("negative", "neutral", "positive"), "llama": ("negative", "positive")}


@pytest.fixture(scope="module", params=["roberta", "llama"])
def folder(request, tmp_path_factory):
    family = request.param
    return family, zoo.save(family, tmp_path_factory.mktemp(family) / "model", names=CLASSES[family])


def _page(name: str, folder: Path, tmp_path, monkeypatch) -> AppTest:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{name}.py"), default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = 32
    return at


def test_layer_map(folder, tmp_path, monkeypatch):
    family, path = folder
    at = _page("layer_map", path, tmp_path, monkeypatch)
    at.run()
    assert not at.exception and not at.error
    from engine.model.inventory import list_layers
    from engine.model.loading import load_model

    names = list_layers(load_model(str(path))[0])
    at.session_state["lm_grid"] = {"clicks": {"epoch": "e", "log": [{"seq": 1, "layer": names[2]}], "total": 1}}
    at.run()
    assert not at.exception
    assert at.session_state["plan"].resolve(names)[names[2]] == "int8"
    assert len(at.session_state["plan_history"]) == 2
    assert any(m.label.startswith("Accuracy") for m in at.metric)


def test_playground_shows_every_class(folder, tmp_path, monkeypatch):
    family, path = folder
    at = _page("robustness", path, tmp_path, monkeypatch)
    at.run()
    assert not at.exception and not at.error
    labels = {m.value for m in at.metric}
    assert labels <= set(CLASSES[family]) and labels
    bars = at.get("plotly_chart")
    assert bars and all(len(__import__("json").loads(b.proto.spec)["data"]) == len(CLASSES[family])
                        for b in bars[:4])


def test_smoothquant_page_says_which_form_each_layer_got(folder, tmp_path, monkeypatch):
    family, path = folder
    at = _page("smoothquant", path, tmp_path, monkeypatch)
    at.run()
    assert not at.exception and not at.error
    forms = at.dataframe[-1].value["form"].tolist()
    if family == "llama":  # pre-LN: the norms before attention and MLP take the 1/s
        assert any("layernorm" in form for form in forms)
    else:  # post-LN: explicit divides, attention-out folded into the value projection
        assert "explicit input scale" in forms and any("value" in form for form in forms)
    at.button(key="sq_evaluate").click().run()
    assert not at.exception and any(m.label.startswith("Accuracy") for m in at.metric)
