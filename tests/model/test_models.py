"""The model registry: offline loading, the hub fallback, local folders, errors and the weight fingerprint."""
from __future__ import annotations

import copy
import socket
import time

import pytest
import torch

from engine.data import hub
from engine.model import loading as models
from engine.data.hub import HUB_TIMEOUT_S
from engine.model.loading import (HubUnavailable, ModelError, fingerprint, label_space, load_model,
                                  load_model_or_fallback)

from conftest import _tiny


def _no_network(*_args, **_kwargs):
    raise OSError("network is disabled in this test")


def test_embedded_loads_offline_without_touching_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    model, tokenizer = load_model("embedded")
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.config.num_labels == 2
    assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id
    assert label_space(model).names == ("negative", "positive")


def _assert_fell_back(name: str, started: float):
    model, tokenizer, warning = load_model_or_fallback(name)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"fallback took {elapsed:.1f} s"
    assert warning is not None and "\n" not in warning
    assert "unreachable" in warning and "embedded" in warning
    assert fingerprint(model) == fingerprint(load_model("embedded")[0])
    assert tokenizer is not None


def test_fallback_when_hub_reachable_says_no(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=HUB_TIMEOUT_S: False)
    _assert_fell_back("distilbert-sst2", time.perf_counter())


def test_fallback_when_connections_fail(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    assert hub.hub_reachable() is False
    _assert_fell_back("distilbert-sst2", time.perf_counter())


def test_fallback_when_the_connection_hangs(monkeypatch):
    """A DNS look-up or connect that never returns must not hang the app: the probe gives up after its time-out."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hang(*_args, **_kwargs):
        time.sleep(15)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    started = time.perf_counter()
    assert hub.hub_reachable(1.0) is False
    assert time.perf_counter() - started < 3
    _assert_fell_back("distilbert-sst2", started)


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnavailable) as error:
        load_model("no/such-model")
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "no/such-model" in message and "unreachable" in message and "\n" not in message
    assert isinstance(error.value, ModelError)


def test_local_folder_loads(tmp_path, tokenizer):
    original = _tiny("distilbert")
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_model(str(tmp_path))
    assert type(model) is type(original)
    assert not model.training
    reference = original.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert loaded_tokenizer("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    assert fingerprint(model) == fingerprint(original)


def test_local_folder_errors(tmp_path, tokenizer):
    with pytest.raises(ModelError, match="cannot load model") as error:
        load_model(str(tmp_path))  # an empty folder
    assert not isinstance(error.value, HubUnavailable)
    with pytest.raises(ModelError, match="no model folder at") as error:
        load_model(str(tmp_path / "missing"))  # a path that does not exist is not the hub's fault
    assert not isinstance(error.value, HubUnavailable)


def test_models_that_cannot_be_analysed_say_what_is_missing(tmp_path, tokenizer):
    from transformers import BertConfig, BertForMaskedLM, BertModel, T5Config, T5ForConditionalGeneration

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    for model, expected in ((BertModel(config), "no sequence-classification head"),
                            (BertForMaskedLM(config), "no sequence-classification head"),
                            (T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                                 d_kv=16)), "encoder-decoder")):
        folder = tmp_path / type(model).__name__
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with pytest.raises(ModelError, match=expected) as error:
            load_model(str(folder))
        assert "\n" not in str(error.value)


def test_a_head_missing_from_the_checkpoint_is_not_invented(tmp_path, tokenizer):
    model = _tiny("bert")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    model.save_pretrained(tmp_path, state_dict=state)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="classifier"):
        load_model(str(tmp_path))


def test_the_app_falls_back_on_any_unusable_model(tmp_path):
    model, _, warning = load_model_or_fallback(str(tmp_path / "missing"), any_error=True)
    assert "no model folder" in warning and "embedded" in warning
    assert model.name_or_path == "embedded"
    with pytest.raises(ModelError):
        load_model_or_fallback(str(tmp_path / "missing"))  # the CLI: a missing folder is an error


def test_fingerprint_is_stable_for_equal_weights():
    first, second = _tiny("bert"), _tiny("bert")
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(first) == fingerprint(first)
    assert fingerprint(first) != fingerprint(_tiny("distilbert"))


def test_fingerprint_changes_when_a_weight_changes():
    model = _tiny("bert")
    before = fingerprint(model)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.classifier.weight[0, 0] += 1e-3
    assert fingerprint(edited) != before
    assert fingerprint(model) == before
    # an in-place edit of the fingerprinted model itself is seen too
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.bias[3] += 0.5
    assert fingerprint(model) != before


def test_classes_are_read_from_id2label():
    model = _tiny("bert")
    assert label_space(model).sentiment() == (0, 1)
    flipped = copy.deepcopy(model)
    flipped.config = copy.deepcopy(model.config)
    flipped.config.id2label = {0: "POSITIVE", 1: "NEGATIVE"}
    assert label_space(flipped).sentiment() == (1, 0)
    assert label_space(flipped).display(0) == "positive"
