"""Each precision's answer to noisy text: predictions for any string, word importance by occlusion,
a greedy flip search, and accuracy and flip rate under perturbation over a whole evaluation set.

Batch composition: an int8 layer with dynamic per-tensor activation scales (torch's CPU kernel,
simulated exactly) picks one scale for the whole batch tensor, padding included, so its answer for a
text depends slightly on the other texts in the batch. `predict` therefore runs such plans one text
at a time (an answer never depends on the other inputs); every other plan is batch-independent and
runs in batches of 64. Occlusion batches a text's variants together, the flip
search scores its candidate edits in batches (confirming a flip on the text alone), and the batch sweep
uses length-sorted batches of 64, as a server batching requests would.
"""
from __future__ import annotations

import html
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine.data import LABEL_NAMES, EvalSet
from engine.layers import inventory
from engine.measure import wilson_interval
from engine.models import fingerprint, positive_index
from engine.perturb import KINDS, Edit, Perturbation, apply_edits, candidate_edits, perturb, words
from engine.plan import FP32, Plan, PlanError, parse_plan
from engine.quantize import KERNELS, apply_plan

BATCH = 64
MAX_OCCLUDED = 64  # occlusion scores at most this many words (one forward of up to 65 texts)
MAX_TOKENS = 8192  # padded tokens per forward
DEFAULT_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)

Progress = Callable[[float, str], None]  # (fraction done, what is happening)


class RobustnessError(ValueError):
    """A robustness request that cannot run as asked (unknown precision name, empty sample)."""


def reference_plans(current: Plan | None = None) -> dict[str, Plan]:
    """The precisions every view compares: FP32, uniform INT8, uniform INT4 and, if given, the current plan."""
    plans = {"fp32": FP32, "int8": Plan.uniform("int8"), "int4": Plan.uniform("int4")}
    if current is not None:
        plans["current"] = current
    return plans


def _as_plan(plan: Plan | str | dict) -> Plan:
    if isinstance(plan, Plan):
        return plan
    return parse_plan(plan) if isinstance(plan, str) else Plan.from_json(plan)


def clean_surrogates(text: str) -> str:
    """`text` made encodable as UTF-8: bytes smuggled in by surrogateescape (invalid UTF-8 on the command
    line or stdin) and other lone surrogates become U+FFFD, which tokenizers and JSON output accept."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---- plan-applied models --------------------------------------------------------------------
class _PlannedModels:
    """A small process-wide LRU of plan-applied models: building one copies the module tree."""

    def __init__(self, capacity: int = 8):
        self.capacity, self.items, self.lock = capacity, OrderedDict(), threading.Lock()

    def get(self, model: nn.Module, tokenizer, plan: Plan, kernels: str) -> nn.Module:
        if kernels not in KERNELS:
            raise PlanError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
        names = [layer.name for layer in inventory(model)]
        transforms = plan.smooth_alpha is not None or plan.act == "static"
        if not transforms and not plan.compact(names).rules:
            plan.resolve(names)  # still reject patterns that match nothing
            return model
        key = (fingerprint(model), plan.key(), kernels)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        calibration = None
        if transforms:
            from engine.smoothquant import calibrate

            calibration = calibrate(model, tokenizer, plan.calib)
        built = apply_plan(model, plan, kernels, calibration=calibration)
        with self.lock:
            self.items[key] = built
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return built


PLANNED = _PlannedModels()


def batch_independent(model: nn.Module, plan: Plan) -> bool:
    """False when some Linear runs int8 with per-tensor dynamic activation scales (one scale per batch)."""
    if plan.act != "dynamic":
        return True
    resolved = plan.resolve([layer.name for layer in inventory(model)], strict=False)
    return not any(resolved[layer.name] == "int8" for layer in inventory(model) if layer.kind == "linear")


def max_length(model: nn.Module, tokenizer) -> int:
    """The longest input the model takes: the tokenizer's and the position table's limits, at most 512."""
    limits = [512]
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < 1_000_000:
        limits.append(declared)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


@dataclass(frozen=True)
class _Encoded:
    ids: list[list[int]]
    truncated: list[bool]


def _encode(tokenizer, texts: Sequence[str], limit: int) -> _Encoded:
    encoded = tokenizer([clean_surrogates(t) for t in texts], truncation=True, max_length=limit)
    ids = [list(row) for row in encoded["input_ids"]]
    if encoded.encodings is not None:  # fast tokenizers keep what truncation cut off
        truncated = [bool(e.overflowing) for e in encoded.encodings]
    else:
        truncated = [len(row) >= limit and len(tokenizer(clean_surrogates(t), verbose=False)["input_ids"]) > limit
                     for t, row in zip(texts, ids)]
    return _Encoded(ids, truncated)


def _batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Length-sorted batches of at most `batch_size` texts and MAX_TOKENS padded tokens (bounds memory
    when long texts come in numbers, as occlusion of a truncated review does)."""
    order = np.argsort(lengths, kind="stable")
    batches, current = [], []
    for row in order:
        if current and (len(current) >= batch_size or (len(current) + 1) * lengths[row] > MAX_TOKENS):
            batches.append(np.array(current))
            current = []
        current.append(row)
    if current:
        batches.append(np.array(current))
    return batches


def _probs(model: nn.Module, tokenizer, ids: Sequence[Sequence[int]], plan: Plan, kernels: str,
           batch_size: int | None) -> np.ndarray:
    """Probabilities [n, 2] (negative, positive) in input order, from length-sorted padded batches.

    batch_size None: one text at a time when the plan's answers depend on batch composition, else BATCH.
    """
    if batch_size is None:
        batch_size = BATCH if batch_independent(model, plan) else 1
    net = PLANNED.get(model, tokenizer, plan, kernels)
    positive = positive_index(model)
    columns = [1 - positive, positive]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    out = np.zeros((len(ids), 2), dtype=np.float64)
    with torch.inference_mode():
        for rows in _batches([len(row) for row in ids], batch_size):
            width = max(len(ids[r]) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, :len(ids[r])] = torch.tensor(ids[r])
                mask[i, :len(ids[r])] = 1
            logits = net(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            out[rows] = torch.softmax(logits[:, columns].double(), -1).cpu().numpy()
    return out


def _label(probs: np.ndarray) -> int:
    return int(np.argmax(probs))


# ---- predict --------------------------------------------------------------------------------
def _note(ids: list[int], truncated: bool, limit: int, tokenizer, text: str) -> str | None:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    content = [i for i in ids if i not in special or i == tokenizer.unk_token_id]
    if not content:
        return "no tokens: the model saw only its special tokens, so this is its answer to an empty input"
    if all(i == tokenizer.unk_token_id for i in content):
        return "every token is unknown to the vocabulary ([UNK]): the answer ignores the text's content"
    if truncated:
        total = len(tokenizer(clean_surrogates(text), verbose=False)["input_ids"])
        return f"truncated: the model read the first {limit} of {total} tokens"
    return None


def predict(model: nn.Module, tokenizer, texts: Sequence[str] | str, plan: Plan | str | dict = FP32,
            kernels: str = "simulated", batch_size: int | None = None) -> list[dict]:
    """One prediction per text, in order: {"text", "label", "confidence", "probs", "truncated", "tokens"}
    plus a "note" for empty, all-unknown or truncated input.

    Any string is valid: texts longer than the model's maximum length are truncated (truncated: true),
    and a text with no tokens still gets the model's answer for [CLS] [SEP].
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t if isinstance(t, str) else str(t) for t in texts]
    if not texts:
        return []
    plan = _as_plan(plan)
    limit = max_length(model, tokenizer)
    encoded = _encode(tokenizer, texts, limit)
    probs = _probs(model, tokenizer, encoded.ids, plan, kernels, batch_size)
    results = []
    for text, p, ids, truncated in zip(texts, probs, encoded.ids, encoded.truncated):
        index = _label(p)
        result = {"text": text, "label": LABEL_NAMES[index], "confidence": float(p[index]),
                  "probs": {"negative": float(p[0]), "positive": float(p[1])},
                  "truncated": truncated, "tokens": len(ids)}
        note = _note(ids, truncated, limit, tokenizer, text)
        if note:
            result["note"] = note
        results.append(result)
    return results


def predict_all(model: nn.Module, tokenizer, text: str, plans: Mapping[str, Plan],
                kernels: str = "simulated") -> dict[str, dict]:
    """The prediction of every named plan for one text (plans with the same key are computed once)."""
    by_key: dict[str, dict] = {}
    for plan in plans.values():
        if plan.key() not in by_key:
            by_key[plan.key()] = predict(model, tokenizer, [text], plan, kernels)[0]
    return {name: by_key[plan.key()] for name, plan in plans.items()}


def disagreement(predictions: Mapping[str, dict], names: Mapping[str, str] | None = None) -> str | None:
    """A plain sentence when the predictions do not all carry the same label, else None."""
    labels = {p["label"] for p in predictions.values()}
    if len(labels) < 2:
        return None
    names = names or {}
    parts = [f"{names.get(k, k)} says {p['label']} ({p['confidence']:.0%})" for k, p in predictions.items()]
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


def occlusion(model: nn.Module, tokenizer, text: str, plan: Plan | str | dict = FP32, kernels: str = "simulated",
              max_words: int = MAX_OCCLUDED) -> list[dict]:
    """One entry per word of `perturb.words(text)`: {"start", "end", "word", "importance"}.

    importance = P(positive | text) - P(positive | text without that word): above 0 the word pushes
    towards positive, below 0 towards negative. The text and its variants run as one batch. Words the
    model never reads (cut off by truncation) or beyond the first `max_words` get importance None.
    """
    plan = _as_plan(plan)
    spans = words(text)
    limit = max_length(model, tokenizer)
    read = _kept_chars(tokenizer, text, limit)
    scored = [i for i, (start, _, _) in enumerate(spans) if start < read][:max_words]
    variants = [text] + [text[:spans[i][0]] + text[spans[i][1]:] for i in scored]
    encoded = _encode(tokenizer, variants, limit)
    probs = _probs(model, tokenizer, encoded.ids, plan, kernels, batch_size=len(variants))
    importance = {i: float(probs[0, 1] - probs[j + 1, 1]) for j, i in enumerate(scored)}
    return [{"start": s, "end": e, "word": w, "importance": importance.get(i)} for i, (s, e, w) in enumerate(spans)]


def importance_html(text: str, scores: Sequence[dict]) -> str:
    """`text` as escaped HTML, each scored word on a green (towards positive) or red (towards negative)
    background whose strength follows |importance| relative to the largest in the text."""
    largest = max((abs(s["importance"]) for s in scores if s["importance"] is not None), default=0.0)
    parts, cursor = [], 0
    for s in scores:
        parts.append(html.escape(text[cursor:s["start"]]))
        word = html.escape(s["word"])
        value = s["importance"]
        if value is None or largest == 0:
            parts.append(word)
        else:
            alpha = 0.1 + 0.7 * abs(value) / largest
            color = f"rgba(26,152,80,{alpha:.2f})" if value > 0 else f"rgba(215,48,39,{alpha:.2f})"
            parts.append(f'<span style="background:{color};border-radius:3px;padding:0 2px" '
                         f'title="{value:+.3f}">{word}</span>')
        cursor = s["end"]
    parts.append(html.escape(text[cursor:]))
    return "".join(parts)


# ---- flip search ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FlipResult:
    """A greedy attack on one precision: the edits found and every precision's answer before and after."""

    target: str
    perturbation: Perturbation
    flipped: bool
    queries: int
    before: dict[str, dict]
    after: dict[str, dict]
    seconds: float

    def as_dict(self) -> dict:
        return {"target": self.target, **self.perturbation.as_dict(), "n_edits": len(self.perturbation.edits),
                "queries": self.queries, "flipped": self.flipped, "before": self.before, "after": self.after,
                "seconds": self.seconds}


def _search(model, tokenizer, text: str, plan: Plan, kernels: str, budget: int, kinds: Sequence[str],
            seed: int, keep_ends: bool, progress: Progress | None) -> tuple[tuple[Edit, ...], int, bool]:
    """Greedy word-importance search: (edits, model queries, whether the plan's label flipped)."""
    limit = max_length(model, tokenizer)

    def score(texts: list[str]) -> np.ndarray:
        # Candidates share one batch: fast, and for INT8 approximate (one activation scale per batch), which
        # is why a flip is confirmed on the text alone below.
        return _probs(model, tokenizer, _encode(tokenizer, texts, limit).ids, plan, kernels, BATCH)

    base = score([text])[0]
    original, confidence = _label(base), float(base[_label(base)])
    scores = occlusion(model, tokenizer, text, plan, kernels)
    scored = [s for s in scores if s["importance"] is not None]
    queries = 1 + (1 + len(scored) if scored else 0)
    # A word supports the original label when removing it lowers that label's probability.
    sign = 1.0 if original == 1 else -1.0
    ranked = sorted(scored, key=lambda s: -sign * s["importance"])
    edits: list[Edit] = []
    for step, word in enumerate(ranked):
        if len(edits) >= budget:
            break
        if progress is not None:
            progress(step / len(ranked), f"trying edits on {word['word'][:30]!r} ({len(edits)} of {budget} edits)")
        candidates = [edit for kind in kinds
                      for edit in candidate_edits(word["word"], word["start"], kind, seed, keep_ends)]
        if not candidates:
            continue
        probs = score([apply_edits(text, edits + [c]) for c in candidates])
        queries += len(candidates)
        best = int(np.argmin(probs[:, original]))
        if probs[best, original] >= confidence:
            continue
        edits.append(candidates[best])
        confidence = float(probs[best, original])
        if _label(probs[best]) != original:
            # A flip counts only as `predict` sees it: the text alone, not inside a batch of candidates.
            queries += 1
            if _label(score([apply_edits(text, edits)])[0]) != original:
                return tuple(edits), queries, True
    return tuple(edits), queries, False


def flip_search(model: nn.Module, tokenizer, text: str, target: str = "int4", plans: Mapping[str, Plan] | None = None,
                budget: int = 3, kinds: Sequence[str] = KINDS, seed: int = 0, keep_ends: bool = False,
                kernels: str = "simulated", progress: Progress | None = None) -> FlipResult:
    """Find a few character edits that flip `target`'s prediction (a name in `plans`).

    Words are ranked by how much they support the target's original label (occlusion); for each in turn,
    every candidate edit of the chosen kinds is scored and the one that most lowers that label's
    probability is kept, until the label flips or `budget` edits are spent. The result carries every
    plan's prediction on the original and the perturbed text (from `predict`, so a flip is real).
    """
    plans = dict(plans or reference_plans())
    if target not in plans:
        raise RobustnessError(f"unknown target {target!r}; choose one of {', '.join(plans)}")
    if budget < 1:
        raise RobustnessError(f"the edit budget must be at least 1, got {budget}")
    for kind in kinds:
        if kind not in KINDS:
            raise RobustnessError(f"unknown perturbation kind {kind!r}; choose from {', '.join(KINDS)}")
    started = time.perf_counter()
    edits, queries, _ = _search(model, tokenizer, text, plans[target], kernels, budget, kinds, seed, keep_ends,
                                progress)
    perturbed = apply_edits(text, edits)
    before = predict_all(model, tokenizer, text, plans, kernels)
    after = predict_all(model, tokenizer, perturbed, plans, kernels)
    if progress is not None:
        progress(1.0, "done")
    return FlipResult(target, Perturbation(text, perturbed, edits), after[target]["label"] != before[target]["label"],
                      queries, before, after, time.perf_counter() - started)


# ---- batch robustness -----------------------------------------------------------------------
def sample(dataset: EvalSet, size: int | None, seed: int = 0) -> EvalSet:
    """A seeded random subset of `size` rows in dataset order (the whole set when size is None or larger)."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise RobustnessError(f"the sample size must be at least 1, got {size}")
    rows = sorted(random.Random(f"sample:{seed}:{dataset.fingerprint}").sample(range(len(dataset)), size))
    return EvalSet(f"{dataset.name}~{size}@{seed}", tuple(dataset.texts[i] for i in rows),
                   tuple(dataset.labels[i] for i in rows), dataset.description)


def perturb_texts(texts: Sequence[str], kind: str, rate: float, seed: int = 0, keep_ends: bool = False) -> list[str]:
    """Every text perturbed with its own seed (derived from `seed` and its position), deterministically."""
    return [perturb(t, kind, rate, seed * 1_000_003 + i, keep_ends).perturbed for i, t in enumerate(texts)]


def _interval_row(hits: int, n: int) -> tuple[float, list[float]]:
    return (hits / n if n else 0.0), list(wilson_interval(hits, n))


def sweep(model: nn.Module, tokenizer, dataset: EvalSet, kinds: Sequence[str] = ("swap", "keyboard", "homoglyph"),
          rates: Sequence[float] = DEFAULT_RATES, plans: Mapping[str, Plan] | None = None, seed: int = 0,
          keep_ends: bool = False, kernels: str = "simulated", batch_size: int = BATCH,
          progress: Progress | None = None) -> dict:
    """Accuracy (95% Wilson CI) and flip rate of every plan on `dataset` perturbed by each kind at each rate.

    The flip rate is the share of texts whose prediction changed against the same plan on the clean
    text (with its Wilson CI); `changed` is the share of texts the perturbation actually edited.
    Rate 0 is the clean text itself, so its accuracy is the clean accuracy.
    """
    if len(dataset) == 0:
        raise RobustnessError(f"dataset {dataset.name} is empty")
    plans = dict(plans or reference_plans())
    for kind in kinds:
        if kind not in KINDS:
            raise RobustnessError(f"unknown perturbation kind {kind!r}; choose from {', '.join(KINDS)}")
    started = time.perf_counter()
    labels = np.asarray(dataset.labels)
    n, limit = len(dataset), max_length(model, tokenizer)
    unique = {plan.key(): plan for plan in plans.values()}
    rates = sorted({float(r) for r in rates} | {0.0})
    steps = len(unique) * (1 + len(kinds) * sum(r > 0 for r in rates))
    done = 0

    def run_all(texts: Sequence[str], what: str) -> dict[str, np.ndarray]:
        nonlocal done
        ids = _encode(tokenizer, texts, limit).ids
        out = {}
        for key, plan in unique.items():
            if progress is not None:
                progress(done / steps, f"{what}: {plan.label()}")
            out[key] = _probs(model, tokenizer, ids, plan, kernels, batch_size).argmax(-1)
            done += 1
        return out

    clean = run_all(dataset.texts, "clean text")
    rows = []
    for kind in kinds:
        for rate in rates:
            texts = dataset.texts if rate == 0 else perturb_texts(dataset.texts, kind, rate, seed, keep_ends)
            predictions = clean if rate == 0 else run_all(texts, f"{kind} at rate {rate:g}")
            changed = sum(a != b for a, b in zip(texts, dataset.texts)) / n
            for name, plan in plans.items():
                pred = predictions[plan.key()]
                accuracy, ci = _interval_row(int((pred == labels).sum()), n)
                flip_rate, flip_ci = _interval_row(int((pred != clean[plan.key()]).sum()), n)
                rows.append({"precision": name, "plan": plan.label(), "kind": kind, "rate": rate,
                             "accuracy": accuracy, "ci95": ci, "flip_rate": flip_rate, "flip_ci95": flip_ci,
                             "changed": changed, "n": n})
    if progress is not None:
        progress(1.0, "done")
    clean_rows = {name: dict(zip(("accuracy", "ci95"), _interval_row(int((clean[p.key()] == labels).sum()), n)))
                  for name, p in plans.items()}
    return {"dataset": dataset.name, "n": n, "kinds": list(kinds), "rates": rates, "seed": seed,
            "keep_ends": keep_ends, "batch_size": batch_size, "clean": clean_rows, "rows": rows,
            "seconds": time.perf_counter() - started}


def attack_success(model: nn.Module, tokenizer, dataset: EvalSet, plans: Mapping[str, Plan] | None = None,
                   targets: Sequence[str] | None = None, budget: int = 3, kinds: Sequence[str] = KINDS,
                   seed: int = 0, keep_ends: bool = False, kernels: str = "simulated",
                   progress: Progress | None = None) -> dict:
    """The flip search's success rate (95% Wilson CI) per target over every text of `dataset` (pass a
    `sample`): success = the target's label flipped within `budget` edits; also the mean number of
    edits of the successes and the mean number of model queries."""
    plans = dict(plans or reference_plans())
    targets = list(targets or plans)
    for target in targets:
        if target not in plans:
            raise RobustnessError(f"unknown target {target!r}; choose one of {', '.join(plans)}")
    started = time.perf_counter()
    total, rows = len(targets) * len(dataset), []
    searched: dict[str, list[tuple[tuple[Edit, ...], int, bool]]] = {}  # per plan key: targets may share a plan
    for t, target in enumerate(targets):
        key = plans[target].key()
        if key not in searched:
            searched[key] = []
            for i, text in enumerate(dataset.texts):
                if progress is not None:
                    progress((t * len(dataset) + i) / total, f"attacking {target}: text {i + 1} of {len(dataset)}")
                searched[key].append(_search(model, tokenizer, text, plans[target], kernels, budget, kinds, seed,
                                             keep_ends, None))
        queries = [used for _, used, _ in searched[key]]
        edit_counts = [len(edits) for edits, _, flipped in searched[key] if flipped]
        successes = len(edit_counts)
        rate, ci = _interval_row(successes, len(dataset))
        rows.append({"precision": target, "plan": plans[target].label(), "success_rate": rate, "ci95": ci,
                     "successes": successes, "n": len(dataset),
                     "mean_edits": float(np.mean(edit_counts)) if edit_counts else None,
                     "mean_queries": float(np.mean(queries)) if queries else 0.0})
    if progress is not None:
        progress(1.0, "done")
    return {"dataset": dataset.name, "n": len(dataset), "budget": budget, "kinds": list(kinds), "seed": seed,
            "rows": rows, "seconds": time.perf_counter() - started}
