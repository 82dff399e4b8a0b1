"""The layer inventory of both families: roles, blocks, forward order, counts, shapes and parameters."""
from __future__ import annotations

import pytest
from torch import nn

from engine.model.families import ALL_ROLES, HEAD_ROLES, block_role, outer_role
from engine.model.inventory import inventory, list_layers, num_blocks

ROLES = ("query", "key", "value", "attention-out", "ffn-in", "ffn-out")  # a BERT block's, in forward order

HIDDEN, FFN, BLOCKS, VOCAB = 32, 64, 2, 30522

EXPECTED = {
    "bert": {
        "embedding": "bert.embeddings.word_embeddings",
        "block": "bert.encoder.layer.{b}.",
        "inner": ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense"),
        "head": ("bert.pooler.dense", "classifier"),
    },
    "distilbert": {
        "embedding": "distilbert.embeddings.word_embeddings",
        "block": "distilbert.transformer.layer.{b}.",
        "inner": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"),
        "head": ("pre_classifier", "classifier"),
    },
}
SHAPES = {"query": (HIDDEN, HIDDEN), "key": (HIDDEN, HIDDEN), "value": (HIDDEN, HIDDEN),
          "attention-out": (HIDDEN, HIDDEN), "ffn-in": (FFN, HIDDEN), "ffn-out": (HIDDEN, FFN),
          "pooler": (HIDDEN, HIDDEN), "classifier": (2, HIDDEN), "embedding": (VOCAB, HIDDEN)}


def _family(model) -> str:
    return "distilbert" if hasattr(model, "distilbert") else "bert"


def test_inventory_names_roles_and_order(tiny_model):
    spec = EXPECTED[_family(tiny_model)]
    expected = [(spec["embedding"], None, "embedding")]
    for b in range(BLOCKS):
        expected += [(spec["block"].format(b=b) + inner, b, role) for inner, role in zip(spec["inner"], ROLES)]
    expected += [(name, None, role) for name, role in zip(spec["head"], HEAD_ROLES)]
    layers = inventory(tiny_model)
    assert [(layer.name, layer.block, layer.role) for layer in layers] == expected
    assert list_layers(tiny_model) == [name for name, _, _ in expected]
    assert num_blocks(tiny_model) == BLOCKS


def test_inventory_counts_shapes_and_params(tiny_model):
    layers = inventory(tiny_model)
    linears = [layer for layer in layers if layer.kind == "linear"]
    embeddings = [layer for layer in layers if layer.kind == "embedding"]
    assert len(embeddings) == 1 and embeddings[0].role == "embedding"
    assert len(linears) == 6 * BLOCKS + 2
    assert len(layers) == 6 * BLOCKS + 3
    for b in range(BLOCKS):
        assert sorted(layer.role for layer in layers if layer.block == b) == sorted(ROLES)
    for layer in layers:
        module = tiny_model.get_submodule(layer.name)
        assert isinstance(module, nn.Embedding if layer.kind == "embedding" else nn.Linear)
        assert layer.shape == tuple(module.weight.shape) == SHAPES[layer.role]
        bias = 0 if layer.kind == "embedding" or module.bias is None else module.bias.numel()
        assert layer.params == module.weight.numel() + bias
        assert layer.role in ALL_ROLES
    # every nn.Linear of the model is in the inventory, once
    all_linears = {name for name, module in tiny_model.named_modules() if isinstance(module, nn.Linear)}
    assert {layer.name for layer in linears} == all_linears


def test_to_json_has_the_contract_fields(tiny_model):
    for layer in inventory(tiny_model):
        data = layer.to_json()
        assert list(data) == ["name", "block", "role", "shape", "params"]
        assert data["shape"] == list(layer.shape)


@pytest.mark.parametrize("inner, role", [
    ("attention.self.query", "query"), ("self_attn.k_proj", "key"), ("attn.c_attn", "qkv"), ("attn.Wqkv", "qkv"),
    ("attention.dense", "attention-out"), ("attn.c_proj", "attention-out"), ("mlp.c_proj", "ffn-out"),
    ("mlp.gate_proj", "ffn-gate"), ("ffn_output", "ffn-out"), ("mlp.Wi", "ffn-in"),
    ("attention.mystery_projection", "other")])
def test_roles_come_from_names_and_unknown_names_are_other(inner, role):
    assert block_role(inner) == role


def test_outer_roles():
    assert outer_role("electra.embeddings_project", before_blocks=True) == "embedding-proj"
    assert outer_role("score", before_blocks=False) == "classifier"
    assert outer_role("classifier.dense", before_blocks=False) == "pooler"
    assert outer_role("some.head_thing", before_blocks=False) == "other"
