"""What this engine knows of model families, in small tables: roles from layer names, blocks whose
feed-forward part can be resumed alone, and the linear paths SmoothQuant may fold a scale through.

Nothing here is needed for a family to work: an unknown family gets the role "other" for layers it
cannot name, block-level cuts, and explicit SmoothQuant scales. Every finer cut is verified on the
model before use (engine.model.stages), so a table entry that does not hold for some model is
dropped for it rather than trusted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ATTENTION_ROLES = ("query", "key", "value", "qkv", "attention-pos", "attention-out")
FFN_ROLES = ("ffn-gate", "ffn-in", "ffn-out")
EXTRA_ROLES = ("bottleneck-in", "bottleneck-out", "other")
ROLES = ATTENTION_ROLES + FFN_ROLES + EXTRA_ROLES
HEAD_ROLES = ("pooler", "classifier")
ALL_ROLES = ("embedding", "embedding-proj") + ROLES + HEAD_ROLES

# (pattern on the layer's name inside its block, role): first match wins, so order matters.
_BLOCK_ROLES = (
    (r"(^|\.)(query|q_lin|q_proj|q|query_proj)$", "query"),
    (r"(^|\.)(key|k_lin|k_proj|k|key_proj)$", "key"),
    (r"(^|\.)(value|v_lin|v_proj|v|value_proj)$", "value"),
    (r"(^|\.)(c_attn|wqkv|qkv_proj|query_key_value|qkv)$", "qkv"),
    (r"(^|\.)pos_(key|query)_proj$", "attention-pos"),
    (r"bottleneck\.input\.dense$|bottleneck\.attention\.dense$", "bottleneck-in"),
    (r"output\.bottleneck\.dense$", "bottleneck-out"),
    (r"attention\.(output\.)?dense$|(^|\.)(out_lin|o_proj|out_proj|o)$|attn\.(wo|c_proj)$", "attention-out"),
    (r"(^|\.)gate_proj$", "ffn-gate"),
    (r"intermediate\.dense$|(^|\.)(lin1|fc1|up_proj|wi|c_fc|ffn|gate_up_proj)$", "ffn-in"),
    (r"(^|\.)output\.dense$|(^|\.)(lin2|fc2|down_proj|ffn_output)$|mlp\.(wo|c_proj)$", "ffn-out"),
)
_HEAD_ROLES = (
    (r"(^|\.)(pooler\.dense|pooler|pre_classifier|classifier\.dense|head\.dense)$", "pooler"),
    (r"(^|\.)(classifier|classifier\.out_proj|score|out_proj)$", "classifier"),
)


def _first(patterns, name: str) -> str | None:
    lowered = name.lower()
    return next((role for pattern, role in patterns if re.search(pattern, lowered)), None)


def block_role(inner_name: str) -> str:
    """The role of a Linear from its name inside its block ("other" when no pattern knows it)."""
    return _first(_BLOCK_ROLES, inner_name) or "other"


def outer_role(name: str, before_blocks: bool) -> str:
    """The role of a Linear outside the blocks: a projection of the embeddings, or part of the head."""
    if before_blocks:
        return "embedding-proj"
    return _first(_HEAD_ROLES, name) or "other"


@dataclass(frozen=True)
class FeedForwardCut:
    """A block whose feed-forward part can run alone from its input (the block's "mid" state).

    `entry` is the submodule whose first input is that state; `run(block, mid)` computes the block's
    output from it exactly as the block's own forward does; `parts` are the submodules it uses.
    """

    family: str
    entry: str
    parts: tuple[str, ...]
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    def applies(self, block: nn.Module) -> bool:
        return all(isinstance(getattr(block, name, None), nn.Module) for name in (self.entry,) + self.parts)


FEED_FORWARD_CUTS = (
    # Post-LN encoders (BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa, MPNet): output(intermediate(x), x)
    FeedForwardCut("post-ln intermediate/output", "intermediate", ("intermediate", "output"),
                   lambda block, mid: block.output(block.intermediate(mid), mid)),
    # DistilBERT: output_layer_norm(ffn(x) + x)
    FeedForwardCut("post-ln ffn", "ffn", ("ffn", "output_layer_norm"),
                   lambda block, mid: block.output_layer_norm(block.ffn(mid) + mid)),
    # Pre-LN decoders and ModernBERT: x + mlp(norm(x))
    FeedForwardCut("pre-ln post_attention_layernorm", "post_attention_layernorm", ("post_attention_layernorm", "mlp"),
                   lambda block, mid: mid + block.mlp(block.post_attention_layernorm(mid))),
    FeedForwardCut("pre-ln ln_2", "ln_2", ("ln_2", "mlp"), lambda block, mid: mid + block.mlp(block.ln_2(mid))),
    FeedForwardCut("pre-ln mlp_norm", "mlp_norm", ("mlp_norm", "mlp"),
                   lambda block, mid: mid + block.mlp(block.mlp_norm(mid))),
)


def feed_forward_cut(block: nn.Module) -> FeedForwardCut | None:
    return next((cut for cut in FEED_FORWARD_CUTS if cut.applies(block)), None)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm (torch's or a model's own class), with a per-channel weight to fold into."""
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))) \
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1


def folds_into_norm(module: nn.Module) -> bool:
    """Whether dividing the norm's weight (and bias) by s divides its output by s. Norms that scale by
    (1 + weight), as Gemma's do, would not; they are named so and left to an explicit scale."""
    return is_norm(module) and not type(module).__name__.startswith("Gemma")


@dataclass(frozen=True)
class LinearPath:
    """Where a Linear's input is a linear function of another Linear's output rows: SmoothQuant's 1/s
    can divide those rows instead of the input. `rows` is the slice of the source's outputs that feeds
    the input, and `repeat` how many consecutive head groups share one source channel (grouped KV)."""

    source: str
    rows: slice
    repeat: int = 1
    head_dim: int = 1


def attention_value_path(out_layer, block_layers, config) -> LinearPath | None:
    """softmax(QK^T) V is linear in V per head, so attention-out's input divides V's output rows (the
    last third of a fused q/k/v output). With grouped KV heads each V channel feeds `repeat` heads."""
    by_role = {layer.role: layer for layer in block_layers}
    value = by_role.get("value")
    if value is not None:
        rows = slice(0, value.shape[0])
    elif "qkv" in by_role and by_role["qkv"].shape[0] % 3 == 0:
        value = by_role["qkv"]
        third = value.shape[0] // 3
        rows = slice(2 * third, 3 * third)
    else:
        return None
    width = rows.stop - rows.start
    inputs = out_layer.shape[1]
    if inputs % width:
        return None
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    return LinearPath(value.name, rows, inputs // width, max(1, inputs // heads))


def gated_path(out_layer, block_layers) -> LinearPath | None:
    """A gated MLP's down projection reads act(gate(x)) * up(x), linear in up(x); a fused GLU input
    (one Linear giving both halves, as ModernBERT's Wi) is act(first half) * second half."""
    by_role = {layer.role: layer for layer in block_layers}
    up = by_role.get("ffn-in")
    if up is None:
        return None
    width = out_layer.shape[1]
    if "ffn-gate" in by_role and up.shape[0] == width:
        return LinearPath(up.name, slice(0, width))
    if up.shape[0] == 2 * width:
        return LinearPath(up.name, slice(width, 2 * width))
    return None
