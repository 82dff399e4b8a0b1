"""The home page on its own: the chosen model's facts (parameters, FP32 size, layers, architecture, classes),
a note where blocks share weights, and the FP32 accuracy on the chosen set with its interval."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import zoo
from engine.model.inventory import inventory
from engine.model.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {family: zoo.save(family, tmp_path_factory.mktemp(family) / "model") for family in ("bert", "albert")}


def _home(folder: Path, cache: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))
    at = AppTest.from_file(str(ROOT / "app_pages" / "home.py"), default_timeout=300)
    at.session_state["model_name"] = str(folder)
    at.session_state["limit"] = LIMIT
    return at.run()


def test_home_shows_the_models_facts_and_fp32_accuracy(folders, tmp_path, monkeypatch):
    at = _home(folders["bert"], tmp_path, monkeypatch)
    assert not at.exception and not at.error
    model, _ = load_model(str(folders["bert"]))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Quantizable layers"] == str(len(inventory(model)))
    assert metrics["Architecture"] == "Bert"
    assert metrics["Parameters"] == f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"
    accuracy = next(value for label, value in metrics.items() if label.startswith("Accuracy"))
    assert f"n = {LIMIT}" in next(label for label in metrics if label.startswith("Accuracy"))
    assert "[" in accuracy and accuracy.endswith("]")
    assert any(c.value == "Classes, in output order: negative, positive" for c in at.caption)
    assert any(h.value == f"Model: {folders['bert']}" for h in at.subheader)
    assert len(at.dataframe[0].value) == len(inventory(model))  # the layers table, one row a layer
    assert not at.info  # BERT's blocks have weights of their own


def test_home_says_when_blocks_share_weights(folders, tmp_path, monkeypatch):
    at = _home(folders["albert"], tmp_path, monkeypatch)
    assert not at.exception and not at.error
    shared = max(layer.shared for layer in inventory(load_model(str(folders["albert"]))[0]))
    assert shared > 1
    assert [i.value for i in at.info] == [f"This model shares one set of block weights across {shared} blocks: "
                                          "quantizing a block layer quantizes it for every block that uses it."]
