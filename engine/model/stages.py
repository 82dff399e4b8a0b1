"""The staged forward: resume a model's own forward at any cut, from states a previous run kept.

Cuts, in forward order: cut 2b is the input of block b (cut 0: from the tokens), cut 2b+1 the input
of block b's feed-forward part where the family allows that cut, cut 2N the output of the last
block (all the head reads). A plan change at some layer can only alter what is computed after that
layer's cut, so an update resumes there.

Nothing of the model is re-implemented: the model runs its own forward (masks, rotary embeddings,
pooling and head are whatever it does), while its blocks' `forward`, on a private copy, hands back
what is cached: blocks before the cut pass their input through, the last of them returns the kept
state; a block resumed at its feed-forward input runs only that part. Where the head reads only the
first token and the last block's feed-forward part is token-wise, that part runs for the first row
alone. Every cut kind is verified on the model's first batch before use, and dropped if it does
not reproduce the model's own logits, so an unknown family still runs, with fewer cuts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.core.qmodules import is_tokenwise
from engine.model.facts import facts
from engine.model.graph import ModelGraph, model_graph

VERIFY_ATOL = 1e-5


@dataclass
class _Context:
    """Per batch: where to start, the state to start from, where to keep states, the block counter."""

    start: int = 0
    state: torch.Tensor | None = None
    keep: dict[int, torch.Tensor] | None = None
    kept_cuts: frozenset[int] | None = None
    block: int = 0
    length: int = 0


@dataclass
class Stages:
    """The cuts of one model and which kinds were verified to reproduce its own forward."""

    graph: ModelGraph
    block_cuts: bool = True
    mid_cuts: bool = True
    first_row_head: bool = True
    verified: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.graph.n_blocks == 0:
            self.block_cuts = self.mid_cuts = self.first_row_head = False
        if self.graph.feed_forward is None:
            self.mid_cuts = self.first_row_head = False

    @property
    def n_blocks(self) -> int:
        return self.graph.n_blocks

    @property
    def last_cut(self) -> int:
        return 2 * self.n_blocks

    def cut_of_place(self, part: str, block: int | None) -> int:
        """The first cut whose state a layer in this place can change."""
        if not self.block_cuts or part == "pre" or block is None and part != "head":
            return 0
        if part == "head":
            return self.last_cut
        return 2 * block + (1 if part == "ffn" and self.mid_cuts else 0)

    def cut_of(self, name: str) -> int:
        """The cut of a quantizable layer (the embedding table: 0, from the tokens)."""
        place = self.graph.places.get(name)
        return 0 if place is None else self.cut_of_place(place.part, place.block)

    def staged(self, net: nn.Module) -> "StagedNet":
        """`net` (a private module tree, e.g. from apply_plan) made resumable; `net` is modified."""
        return StagedNet(self, net)

    def verify(self, net: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        """Drop every cut kind that does not reproduce `net`'s own logits on `inputs` (a real batch).

        `net` must be private: it is staged here.
        """
        with torch.inference_mode():
            own = net(**inputs).logits
            staged = self.staged(net)

            def agrees(kind: str, run) -> bool:
                try:
                    logits = run()
                except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as error:
                    self.notes.append(f"{kind} cuts fail on this model ({type(error).__name__}: {error}); not used")
                    return False
                if logits.shape == own.shape and torch.allclose(logits, own, atol=VERIFY_ATOL, rtol=VERIFY_ATOL):
                    return True
                self.notes.append(f"{kind} cuts do not reproduce this model's forward; not used")
                return False

            keep: dict[int, torch.Tensor] = {}
            if not agrees("first-row head", lambda: staged(inputs, keep=keep)):
                self.first_row_head = staged.first_row = False
                keep = {}
                if not agrees("block", lambda: staged(inputs, keep=keep)):
                    self.block_cuts = self.mid_cuts = False
            for cut in self._probe_cuts():
                mid = cut % 2 == 1 and cut != self.last_cut
                if (mid and not self.mid_cuts) or (not mid and not self.block_cuts):
                    continue
                if not agrees("feed-forward" if mid else "block", lambda: staged(inputs, cut, keep[cut])):
                    if mid:
                        self.mid_cuts = False
                    else:
                        self.block_cuts = self.mid_cuts = False
        self.verified = True

    def _probe_cuts(self) -> list[int]:
        """One cut of each kind: a block input in the middle, a feed-forward input, the head."""
        middle = max(1, self.n_blocks // 2)
        cuts = [2 * middle if 2 * middle < self.last_cut else self.last_cut, self.last_cut]
        if self.mid_cuts:
            cuts.insert(1, 2 * (self.n_blocks - 1) + 1)
        return sorted(set(cuts))


def stages_of(model: nn.Module) -> Stages:
    """The model's Stages (unverified until an evaluator verifies them on its first batch)."""
    known = facts(model)
    if known.stages is None:
        known.stages = Stages(model_graph(model))
    return known.stages


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class StagedNet:
    """A private module tree whose blocks replay kept states; call it per batch."""

    def __init__(self, stages: Stages, net: nn.Module):
        self.stages, self.net, self.ctx = stages, net, _Context()
        graph = stages.graph
        if getattr(net.config, "use_cache", None):
            net.config.use_cache = False  # a private copy's config: classification never decodes
        blocks = [net.get_submodule(path) for path in graph.block_paths]
        self.first_row = False
        for module in {id(b): b for b in blocks}.values():
            original = type(module).forward.__get__(module)
            module.forward = functools.partial(self._block_forward, module, original)
        if stages.mid_cuts or stages.first_row_head:
            cut = graph.feed_forward
            for index, block in enumerate(blocks):
                getattr(block, cut.entry).register_forward_pre_hook(functools.partial(self._entry, index))
            last = blocks[-1]
            parts = [getattr(last, name) for name in cut.parts]
            self.first_row = stages.first_row_head and all(is_tokenwise(part) for part in parts)
        self.blocks = blocks

    # ---- the replay ------------------------------------------------------------------------
    def _rebuild(self, hidden: torch.Tensor):
        graph = self.stages.graph
        return (hidden,) + graph.block_extras if graph.block_output == "tuple" else hidden

    def _keep(self, cut: int, tensor: torch.Tensor) -> None:
        ctx = self.ctx
        if ctx.keep is not None and cut > ctx.start and (ctx.kept_cuts is None or cut in ctx.kept_cuts):
            ctx.keep[cut] = tensor

    def _block_forward(self, module: nn.Module, original, *args, **kwargs):
        ctx, n = self.ctx, self.stages.n_blocks
        index = ctx.block
        ctx.block += 1
        block, at_mid = (n, False) if ctx.start >= 2 * n else divmod(ctx.start, 2)
        if index < block:
            if index == block - 1 and not at_mid:
                state = ctx.state
                if state.shape[1] != ctx.length:  # kept as the first row only: the head reads nothing else
                    state = state.expand(-1, ctx.length, -1)
                return self._rebuild(state)
            return self._rebuild(_hidden_of(args, kwargs))
        if at_mid and index == block:
            hidden = self.stages.graph.feed_forward.run(module, ctx.state)
        else:
            output = original(*args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        last = index == n - 1
        self._keep(2 * (index + 1), hidden[:, :1].clone() if last and self.first_row else hidden)
        return self._rebuild(hidden)

    def _entry(self, index: int, _module, args):
        """Before block `index`'s feed-forward part: keep its input, and for the last block of a
        first-row head, hand the part only the first row (the broadcast residual keeps shapes)."""
        if self.stages.mid_cuts:
            self._keep(2 * index + 1, args[0])
        if self.first_row and index == self.stages.n_blocks - 1:
            return (args[0][:, :1],) + args[1:]
        return None

    def __call__(self, inputs: dict[str, torch.Tensor], start: int = 0, state: torch.Tensor | None = None,
                 keep: dict[int, torch.Tensor] | None = None, kept_cuts: frozenset[int] | None = None) -> torch.Tensor:
        """Logits of one batch, resuming at cut `start` from `state`; states after `start` go into `keep`."""
        if start > 0 and state is None:
            raise ValueError(f"resuming at cut {start} needs that cut's state")
        self.ctx = _Context(start if self.stages.block_cuts else 0, state, keep, kept_cuts, 0,
                            inputs["input_ids"].shape[1])
        if not self.stages.block_cuts:
            self.ctx.start = 0
        return self.net(**inputs).logits
