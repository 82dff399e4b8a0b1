"""The model as stages, so evaluation can start at any cut and reuse what came before it.

Cuts, in forward order: cut 2b is the input of block b (cut 0 = the embeddings' output), cut
2b+1 the input of block b's feed-forward part (after the attention LayerNorm), cut 2N the
final hidden state ([CLS] only, all the head reads). A layer's plan change can only alter what
is computed after its cut, so an update resumes from the states the previous plan left there.

The embeddings' and blocks' call arguments (the processed attention mask) are captured once
from a real forward of the model, so the stages run exactly what the model's own forward runs;
`check_stages` verifies that on every new model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.layers import Layer, UnsupportedModel, inventory, num_blocks

EMBEDDING_CUT = -1  # a change to the word embeddings re-runs everything from the tokens


def base_model(model: nn.Module) -> nn.Module:
    return model.base_model


def blocks(model: nn.Module) -> nn.ModuleList:
    """The encoder's list of blocks: the longest ModuleList in the base model."""
    lists = [m for m in base_model(model).modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        return max(lists, key=len)
    raise UnsupportedModel(f"no encoder block list found in {type(model).__name__}")


def layer_cut(layer: Layer, n_blocks: int) -> int:
    """The first cut whose state this layer's precision can change."""
    if layer.role == "embedding":
        return EMBEDDING_CUT
    if layer.block is None:
        return 2 * n_blocks
    return 2 * layer.block + (1 if layer.role in ("ffn-in", "ffn-out") else 0)


def _attention_part(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    if hasattr(block, "feed_forward_chunk"):  # BERT family: attention includes its LayerNorm
        return block.attention(hidden, *args, **kwargs)[0]
    if hasattr(block, "sa_layer_norm"):  # DistilBERT family
        attention = block.attention(hidden, *args, **kwargs)[0]
        return block.sa_layer_norm(attention + hidden)
    raise UnsupportedModel(f"unknown encoder block {type(block).__name__}")


def _ffn_part(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    if hasattr(block, "feed_forward_chunk"):
        return block.feed_forward_chunk(hidden)
    return block.output_layer_norm(block.ffn(hidden) + hidden)


def _ffn_modules(block: nn.Module) -> list[nn.Module]:
    if hasattr(block, "feed_forward_chunk"):
        return [block.intermediate, block.output]
    return [block.ffn, block.output_layer_norm]


def _tokenwise(module: nn.Module) -> bool:
    """Whether every token's output depends on that token alone (not on a per-tensor activation range)."""
    from engine.quantize import CastLinear, Int4Linear, SimLinear

    for leaf in module.modules():
        if isinstance(leaf, SimLinear):
            if leaf.precision == "int8" and leaf.act == "dynamic":
                return False
        elif type(leaf).__module__.startswith(("torch.ao", "torchao")):
            return False
        elif not isinstance(leaf, (nn.Linear, CastLinear, Int4Linear, nn.LayerNorm, nn.Dropout, nn.Sequential,
                                   nn.ModuleList)) and list(leaf.parameters(recurse=False)) + list(leaf.buffers(recurse=False)):
            return False
    return True


def _head(model: nn.Module, cls_hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the final [CLS] state ([batch, 1, hidden])."""
    if hasattr(model, "pre_classifier"):  # DistilBERT: Linear, ReLU, dropout, classifier
        pooled = nn.functional.relu(model.pre_classifier(cls_hidden[:, 0]))
        return model.classifier(model.dropout(pooled))
    pooler = getattr(base_model(model), "pooler", None)
    if pooler is not None and hasattr(model, "classifier"):  # BERT: pooler on [CLS], dropout, classifier
        return model.classifier(model.dropout(pooler(cls_hidden)))
    raise UnsupportedModel(f"unknown classification head in {type(model).__name__}")


@dataclass
class Batch:
    """One length-sorted batch: its rows in the dataset, the tokens and the captured call arguments."""

    rows: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    embed_call: tuple[tuple, dict] = ((), {})
    block_call: tuple[tuple, dict] = ((), {})
    tokens: int = 0


class _Captured(Exception):
    """Raised by the capture hook to stop the probe forward once the first block's arguments are seen."""


def capture_calls(model: nn.Module, batch: Batch) -> None:
    """Record the arguments the model's forward passes to its embeddings and first block."""
    from engine.quantize import shallow_copy

    probe = shallow_copy(model)  # hooks go on a private copy: the shared model is never touched
    seen: dict[str, tuple[tuple, dict]] = {}

    def record_embed(_module, args, kwargs):
        seen["embed"] = (args, dict(kwargs))

    def record_block(_module, args, kwargs):
        seen["block"] = (args[1:], dict(kwargs))  # the hidden state is supplied per stage
        raise _Captured

    embeddings = base_model(probe).embeddings
    handles = [embeddings.register_forward_pre_hook(record_embed, with_kwargs=True),
               blocks(probe)[0].register_forward_pre_hook(record_block, with_kwargs=True)]
    try:
        with torch.inference_mode():
            probe(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    batch.embed_call, batch.block_call = seen["embed"], seen["block"]


@dataclass
class Trace:
    """The states one plan produced at every cut, per batch, and its logits."""

    states: list[dict[int, torch.Tensor]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def run_batch(model: nn.Module, batch: Batch, start: int = EMBEDDING_CUT,
              state: torch.Tensor | None = None, keep: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of `batch`, starting at cut `start` from `state`; stores every later cut's state in `keep`."""
    stack = blocks(model)
    n = len(stack)
    if start == EMBEDDING_CUT:
        args, kwargs = batch.embed_call
        hidden = base_model(model).embeddings(*args, **kwargs)
        start = 0
        if keep is not None:
            keep[0] = hidden
    else:
        hidden = state
    block_args, block_kwargs = batch.block_call
    for cut in range(start, 2 * n):
        block = stack[cut // 2]
        if cut % 2 == 0:
            hidden = _attention_part(block, hidden, block_args, block_kwargs)
        elif cut == 2 * n - 1 and all(_tokenwise(m) for m in _ffn_modules(block)):
            # The head reads [CLS] alone; a token-wise last feed-forward needs no other row.
            hidden = _ffn_part(block, hidden[:, :1])
        else:
            hidden = _ffn_part(block, hidden)
        if keep is not None:
            keep[cut + 1] = hidden if cut + 1 < 2 * n else hidden[:, :1]
    cls = hidden[:, :1] if start < 2 * n else hidden
    return _head(model, cls)


def check_stages(model: nn.Module, batch: Batch, atol: float = 1e-4) -> None:
    """Raise UnsupportedModel unless the staged forward reproduces the model's own logits."""
    with torch.inference_mode():
        staged = run_batch(model, batch)
        direct = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    if not torch.allclose(staged, direct, atol=atol, rtol=1e-4):
        raise UnsupportedModel(f"staged forward of {type(model).__name__} differs from its own forward "
                               f"by {(staged - direct).abs().max().item():.2e}")


def state_at(trace: Trace, batch_index: int, cut: int) -> torch.Tensor | None:
    return trace.states[batch_index].get(cut) if cut >= 0 else None


def layer_cuts(model: nn.Module) -> dict[str, int]:
    n = num_blocks(model)
    return {layer.name: layer_cut(layer, n) for layer in inventory(model)}
