"""Shared fixtures: tiny random models of the real architectures, and the embedded model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "embedded"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests run torch on one thread: tiny models run fastest so, on a shared CPU extra threads only
    spin, and the float reduction order (hence the int8 simulated/real agreement) stays the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(family: str):
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification)

    torch.manual_seed(0)
    labels = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    if family == "bert":
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, **labels)
        model = BertForSequenceClassification(config)
    else:
        config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=128, **labels)
        model = DistilBertForSequenceClassification(config)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED)


@pytest.fixture(scope="session", params=["bert", "distilbert"])
def tiny_model(request):
    return _tiny(request.param)


@pytest.fixture(scope="session")
def tiny_bert():
    return _tiny("bert")


@pytest.fixture(scope="session")
def tiny_distilbert():
    return _tiny("distilbert")


@pytest.fixture(scope="session")
def embedded():
    from engine.model.loading import load_model

    return load_model("embedded")
