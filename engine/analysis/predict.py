"""Each precision's answer to any text: predictions with every class's probability, word importance by
occlusion, and the planned models behind them.

Batch composition: an int8 layer with dynamic per-tensor activation scales (torch's CPU kernel,
simulated exactly) picks one scale for the whole batch tensor, padding included, so its answer for a
text depends slightly on the other texts in the batch. `predict` therefore runs such plans one text
at a time (an answer never depends on the other inputs); every other plan is batch-independent and
runs in batches of 64.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from cachetools import LRUCache
from torch import nn

from engine.data.sets import EvalSet, load_dataset
from engine.core.errors import EngineError
from engine.core.memo import memoized
from engine.core.plan import FP32, Plan, PlanLike, as_plan
from engine.core.tokens import clean_surrogates, encode, length_sorted, pad
from engine.core.vocabulary import ActScheme, Kernels
from engine.model.inventory import inventory
from engine.model.loading import fingerprint, input_limit, label_space
from engine.analysis.perturb import words
from engine.quant.prepare import build

BATCH = 64
MAX_OCCLUDED = 64  # occlusion scores at most this many words (one forward of up to 65 texts)
MAX_TOKENS = 8192  # padded tokens per forward


class RobustnessError(EngineError):
    """A robustness request that cannot run as asked (unknown precision name, empty sample)."""


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One text's answer under one plan, in `predict --json`'s order; `to_json()` is that object."""

    text: str
    label: str  # the top class's name from id2label, lower-cased
    confidence: float  # the top class's probability
    probs: dict[str, float]  # every class name to its probability, in class order
    truncated: bool
    tokens: int
    note: str | None = None  # for empty, all-unknown or truncated input

    def to_json(self) -> dict[str, Any]:
        """The contract's dict (no "note" key when there is nothing to say)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.note is None:
            del out["note"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prediction:
        """From `to_json()`'s dict; keys it does not know are ignored, a missing field is a TypeError."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True, kw_only=True)
class WordScore:
    """One word's occlusion score; `to_json()` is {"start", "end", "word", "importance", "class"}."""

    start: int
    end: int
    word: str
    importance: float | None  # None for a word the model never reads or beyond the first max_words
    label: str  # the class the importance is for ("class" in JSON, a Python keyword)

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "word": self.word, "importance": self.importance,
                "class": self.label}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WordScore:
        """From `to_json()`'s dict; a missing key is a KeyError."""
        return cls(start=data["start"], end=data["end"], word=data["word"], importance=data["importance"],
                   label=data["class"])


def reference_plans(current: Plan | None = None) -> dict[str, Plan]:
    """The precisions every view compares: FP32, uniform INT8, uniform INT4 and, if given, the current plan."""
    plans = {"fp32": FP32, "int8": Plan.uniform("int8"), "int4": Plan.uniform("int4")}
    if current is not None:
        plans["current"] = current
    return plans


def _calibration_source(data: EvalSet | None) -> EvalSet:
    return data if data is not None else load_dataset("embedded")


@memoized("analysis.planned_models", LRUCache(maxsize=8),
           key=lambda model, tokenizer, plan, kernels, data=None: (fingerprint(model), plan.key(), kernels,
                                                                    None if data is None else data.fingerprint))
def planned_model(model: nn.Module, tokenizer, plan: Plan, kernels: str, data: EvalSet | None = None) -> nn.Module:
    """The plan's model (a small process-wide LRU: building one copies the module tree); a plan that
    needs calibration is calibrated on `data`'s pool (the embedded set's when None)."""
    source = _calibration_source(data) if plan.needs_calibration else None
    return build(model, tokenizer, plan, kernels, source.calibration if source else (),
                 source.calibration_source if source else "")


def batch_independent(model: nn.Module, plan: Plan) -> bool:
    """False when some Linear runs int8 with per-tensor dynamic activation scales (one scale per batch)."""
    if plan.act != ActScheme.DYNAMIC:
        return True
    resolved = plan.resolve([layer.name for layer in inventory(model)], strict=False)
    return not any(resolved[layer.name] == "int8" for layer in inventory(model) if layer.kind == "linear")


def class_probs(model: nn.Module, tokenizer, ids: Sequence[Sequence[int]], plan: Plan, kernels: str = Kernels.SIMULATED,
                batch_size: int | None = None, data: EvalSet | None = None) -> np.ndarray:
    """Probabilities [n, classes] in input order, from length-sorted padded batches.

    batch_size None: one text at a time when the plan's answers depend on batch composition, else BATCH.
    """
    if batch_size is None:
        batch_size = BATCH if batch_independent(model, plan) else 1
    plan.resolve([layer.name for layer in inventory(model)])
    net = planned_model(model, tokenizer, plan, kernels, data)
    device = next(model.parameters()).device
    out = np.zeros((len(ids), model.config.num_labels), dtype=np.float64)
    with torch.inference_mode():
        for rows in length_sorted([len(row) for row in ids], batch_size, MAX_TOKENS):
            input_ids, mask = pad([ids[r] for r in rows], tokenizer.pad_token_id or 0)
            logits = net(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            out[rows] = torch.softmax(logits.double(), -1).cpu().numpy()
    return out


def _note(ids: list[int], truncated: bool, limit: int, tokenizer, text: str) -> str | None:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    content = [i for i in ids if i not in special or i == tokenizer.unk_token_id]
    if not content:
        return "no tokens: the model saw only its special tokens, so this is its answer to an empty input"
    if tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in content):
        return "every token is unknown to the vocabulary: the answer ignores the text's content"
    if truncated:
        total = len(tokenizer(clean_surrogates(text), verbose=False)["input_ids"])
        return f"truncated: the model read the first {limit} of {total} tokens"
    return None


def predictions(model: nn.Module, tokenizer, texts: Sequence[str] | str, plan: PlanLike = FP32,
                kernels: str = Kernels.SIMULATED, batch_size: int | None = None,
                data: EvalSet | None = None) -> list[Prediction]:
    """One Prediction per text, in order, with a note for empty, all-unknown or truncated input.

    Any string is valid: texts longer than the model reads are truncated (truncated: true), and a text
    with no tokens still gets the model's answer for its special tokens alone.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t if isinstance(t, str) else str(t) for t in texts]
    if not texts:
        return []
    plan = as_plan(plan)
    classes = label_space(model)
    limit = input_limit(model, tokenizer)
    encoded = encode(tokenizer, texts, limit)
    probs = class_probs(model, tokenizer, encoded.ids, plan, kernels, batch_size, data)
    results = []
    for text, p, ids, truncated in zip(texts, probs, encoded.ids, encoded.truncated):
        index = int(np.argmax(p))
        results.append(Prediction(text=text, label=classes.display(index), confidence=float(p[index]),
                                  probs={classes.display(i): float(value) for i, value in enumerate(p)},
                                  truncated=truncated, tokens=len(ids),
                                  note=_note(ids, truncated, limit, tokenizer, text)))
    return results


def predict(model: nn.Module, tokenizer, texts: Sequence[str] | str, plan: PlanLike = FP32,
            kernels: str = Kernels.SIMULATED, batch_size: int | None = None, data: EvalSet | None = None) -> list[dict]:
    """The predict command's documents: each of `predictions`' `to_json()`, {"text", "label", "confidence",
    "probs", "truncated", "tokens"} plus "note" when there is one."""
    return [p.to_json() for p in predictions(model, tokenizer, texts, plan, kernels, batch_size, data)]


def predict_all(model: nn.Module, tokenizer, text: str, plans: Mapping[str, Plan], kernels: str = Kernels.SIMULATED,
                data: EvalSet | None = None) -> dict[str, Prediction]:
    """The prediction of every named plan for one text (plans with the same key are computed once)."""
    by_key: dict[str, Prediction] = {}
    for plan in plans.values():
        if plan.key() not in by_key:
            by_key[plan.key()] = predictions(model, tokenizer, [text], plan, kernels, data=data)[0]
    return {name: by_key[plan.key()] for name, plan in plans.items()}


def disagreement(answers: Mapping[str, Prediction], names: Mapping[str, str] | None = None) -> str | None:
    """A plain sentence when the predictions do not all carry the same label, else None."""
    labels = {p.label for p in answers.values()}
    if len(labels) < 2:
        return None
    names = names or {}
    parts = [f"{names.get(k, k)} says {p.label} ({p.confidence:.0%})" for k, p in answers.items()]
    return "The precisions disagree: " + ", ".join(parts) + "."


# ---- occlusion ------------------------------------------------------------------------------
def _kept_chars(tokenizer, text: str, limit: int) -> int:
    """How many leading characters of `text` the model reads after truncation (all when it is not cut)."""
    try:
        encoded = tokenizer(clean_surrogates(text), truncation=True, max_length=limit, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return len(text)
    if not encoded.encodings or not encoded.encodings[0].overflowing:
        return len(text)
    return max((end for _, end in encoded["offset_mapping"]), default=0)


def occlusion(model: nn.Module, tokenizer, text: str, plan: PlanLike = FP32, kernels: str = Kernels.SIMULATED,
              max_words: int = MAX_OCCLUDED, target: int | None = None,
              data: EvalSet | None = None) -> list[WordScore]:
    """One WordScore per word of `perturb.words(text)`.

    importance = P(c | text) - P(c | text without that word) for the class c the plan predicts for the
    text (or `target`): above 0 the word supports c, below 0 it argues against it. The text and its
    variants run as one batch. Words the model never reads (cut off by truncation) or beyond the first
    `max_words` get importance None.
    """
    plan = as_plan(plan)
    spans = words(text)
    limit = input_limit(model, tokenizer)
    read = _kept_chars(tokenizer, text, limit)
    scored = [i for i, (start, _, _) in enumerate(spans) if start < read][:max_words]
    variants = [text] + [text[:spans[i][0]] + text[spans[i][1]:] for i in scored]
    probs = class_probs(model, tokenizer, encode(tokenizer, variants, limit).ids, plan, kernels, len(variants), data)
    c = int(np.argmax(probs[0])) if target is None else target
    name = label_space(model).display(c)
    importance = {i: float(probs[0, c] - probs[j + 1, c]) for j, i in enumerate(scored)}
    return [WordScore(start=s, end=e, word=w, importance=importance.get(i), label=name)
            for i, (s, e, w) in enumerate(spans)]


def importance_html(text: str, scores: Sequence[WordScore]) -> str:
    """`text` as escaped HTML, each scored word on a green (supports the predicted class) or red (argues
    against it) background whose strength follows |importance| relative to the largest in the text."""
    largest = max((abs(s.importance) for s in scores if s.importance is not None), default=0.0)
    parts, cursor = [], 0
    for s in scores:
        parts.append(html.escape(text[cursor:s.start]))
        word = html.escape(s.word)
        value = s.importance
        if value is None or largest == 0:
            parts.append(word)
        else:
            alpha = 0.1 + 0.7 * abs(value) / largest
            color = f"rgba(26,152,80,{alpha:.2f})" if value > 0 else f"rgba(215,48,39,{alpha:.2f})"
            parts.append(f'<span style="background:{color};border-radius:3px;padding:0 2px" '
                         f'title="{value:+.3f}">{word}</span>')
        cursor = s.end
    parts.append(html.escape(text[cursor:]))
    return "".join(parts)
