"""Robustness to typos: a greedy flip search on one text, and accuracy, flip rate and the search's
success rate over a whole evaluation set perturbed at several rates.

The flip search scores its candidate edits in batches (confirming a flip on the text alone), and the
batch sweep uses length-sorted batches of 64, as a server batching requests would.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from engine.analysis.perturb import KINDS, Edit, Perturbation, apply_edits, candidate_edits, perturb
from engine.analysis.predict import (BATCH, Prediction, RobustnessError, class_probs, occlusion, predict_all,
                                     reference_plans)
from engine.analysis.robustness_results import AttackResult, AttackRow, CleanAccuracy, SweepResult, SweepRow
from engine.data.sets import EvalSet
from engine.core.plan import Plan
from engine.core.stats import wilson_interval
from engine.core.tokens import encode
from engine.core.vocabulary import Kernels
from engine.model.loading import input_limit, label_space

DEFAULT_RATES = (0.0, 0.05, 0.1, 0.2, 0.4)

Progress = Callable[[float, str], None]  # (fraction done, what is happening)


@dataclass(frozen=True)
class FlipResult:
    """A greedy attack on one precision: the edits found and every precision's answer before and after."""

    target: str
    perturbation: Perturbation
    flipped: bool
    queries: int
    before: dict[str, Prediction]
    after: dict[str, Prediction]
    seconds: float

    def to_json(self) -> dict:
        return {"target": self.target, **self.perturbation.to_json(), "n_edits": len(self.perturbation.edits),
                "queries": self.queries, "flipped": self.flipped,
                "before": {k: p.to_json() for k, p in self.before.items()},
                "after": {k: p.to_json() for k, p in self.after.items()},
                "seconds": self.seconds}


def _check_kinds(kinds: Sequence[str]) -> None:
    for kind in kinds:
        if kind not in KINDS:
            raise RobustnessError(f"unknown perturbation kind {kind!r}; choose from {', '.join(KINDS)}")


def search_flip(model, tokenizer, text: str, plan: Plan, kernels: str, budget: int, kinds: Sequence[str],
                seed: int, keep_ends: bool, progress: Progress | None = None,
                data: EvalSet | None = None) -> tuple[tuple[Edit, ...], int, bool]:
    """Greedy word-importance search for a change of the top class: (edits, model queries, flipped)."""
    limit = input_limit(model, tokenizer)

    def score(texts: list[str]) -> np.ndarray:
        # Candidates share one batch: fast, and for INT8 approximate (one activation scale per batch), which
        # is why a flip is confirmed on the text alone below.
        return class_probs(model, tokenizer, encode(tokenizer, texts, limit).ids, plan, kernels, BATCH, data)

    base = score([text])[0]
    original = int(np.argmax(base))
    confidence = float(base[original])
    scored = [s for s in occlusion(model, tokenizer, text, plan, kernels, target=original, data=data)
              if s.importance is not None]
    queries = 1 + (1 + len(scored) if scored else 0)
    ranked = sorted(scored, key=lambda s: -s.importance)  # the words that support the original class most
    edits: list[Edit] = []
    for step, word in enumerate(ranked):
        if len(edits) >= budget:
            break
        if progress is not None:
            progress(step / len(ranked), f"trying edits on {word.word[:30]!r} ({len(edits)} of {budget} edits)")
        candidates = [edit for kind in kinds for edit in candidate_edits(word.word, word.start, kind, seed, keep_ends)]
        if not candidates:
            continue
        probs = score([apply_edits(text, edits + [c]) for c in candidates])
        queries += len(candidates)
        best = int(np.argmin(probs[:, original]))
        if probs[best, original] >= confidence:
            continue
        edits.append(candidates[best])
        confidence = float(probs[best, original])
        if int(np.argmax(probs[best])) != original:
            # A flip counts only as `predict` sees it: the text alone, not inside a batch of candidates.
            queries += 1
            if int(np.argmax(score([apply_edits(text, edits)])[0])) != original:
                return tuple(edits), queries, True
    return tuple(edits), queries, False


def flip_search(model: nn.Module, tokenizer, text: str, target: str = "int4", plans: Mapping[str, Plan] | None = None,
                budget: int = 3, kinds: Sequence[str] = KINDS, seed: int = 0, keep_ends: bool = False,
                kernels: str = Kernels.SIMULATED, progress: Progress | None = None,
                data: EvalSet | None = None) -> FlipResult:
    """Find a few character edits that change `target`'s top class (a name in `plans`).

    Words are ranked by how much they support the target's original class (occlusion); for each in turn,
    every candidate edit of the chosen kinds is scored and the one that most lowers that class's
    probability is kept, until the top class changes or `budget` edits are spent. The result carries
    every plan's prediction on the original and the perturbed text (from `predict`, so a flip is real).
    """
    plans = dict(plans or reference_plans())
    if target not in plans:
        raise RobustnessError(f"unknown target {target!r}; choose one of {', '.join(plans)}")
    if budget < 1:
        raise RobustnessError(f"the edit budget must be at least 1, got {budget}")
    _check_kinds(kinds)
    started = time.perf_counter()
    edits, queries, _ = search_flip(model, tokenizer, text, plans[target], kernels, budget, kinds, seed, keep_ends,
                                    progress, data)
    perturbed = apply_edits(text, edits)
    before = predict_all(model, tokenizer, text, plans, kernels, data)
    after = predict_all(model, tokenizer, perturbed, plans, kernels, data)
    if progress is not None:
        progress(1.0, "done")
    flipped = after[target].label != before[target].label
    return FlipResult(target, Perturbation(text=text, perturbed=perturbed, edits=edits), flipped, queries, before,
                      after, time.perf_counter() - started)


# ---- batch robustness -----------------------------------------------------------------------
def sample(dataset: EvalSet, size: int | None, seed: int = 0) -> EvalSet:
    """A seeded random subset of `size` rows in dataset order (the whole set when size is None or larger)."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise RobustnessError(f"the sample size must be at least 1, got {size}")
    rows = sorted(random.Random(f"sample:{seed}:{dataset.fingerprint}").sample(range(len(dataset)), size))
    return EvalSet(f"{dataset.name}~{size}@{seed}", tuple(dataset.texts[i] for i in rows),
                   tuple(dataset.labels[i] for i in rows), dataset.description, dataset.calibration,
                   dataset.calibration_source)


def perturb_texts(texts: Sequence[str], kind: str, rate: float, seed: int = 0, keep_ends: bool = False) -> list[str]:
    """Every text perturbed with its own seed (derived from `seed` and its position), deterministically."""
    return [perturb(t, kind, rate, seed * 1_000_003 + i, keep_ends).perturbed for i, t in enumerate(texts)]


def _interval_row(hits: int, n: int) -> tuple[float, list[float]]:
    return (hits / n if n else 0.0), list(wilson_interval(hits, n))


def sweep(model: nn.Module, tokenizer, dataset: EvalSet, kinds: Sequence[str] = ("swap", "keyboard", "homoglyph"),
          rates: Sequence[float] = DEFAULT_RATES, plans: Mapping[str, Plan] | None = None, seed: int = 0,
          keep_ends: bool = False, kernels: str = Kernels.SIMULATED, batch_size: int = BATCH,
          progress: Progress | None = None) -> SweepResult:
    """Accuracy (95% Wilson CI) and flip rate of every plan on `dataset` perturbed by each kind at each rate.

    The flip rate is the share of texts whose top class changed against the same plan on the clean
    text (with its Wilson CI); `changed` is the share of texts the perturbation actually edited.
    Rate 0 is the clean text itself, so its accuracy is the clean accuracy.
    """
    if len(dataset) == 0:
        raise RobustnessError(f"dataset {dataset.name} is empty")
    plans = dict(plans or reference_plans())
    _check_kinds(kinds)
    started = time.perf_counter()
    labels = label_space(model).indices(dataset.labels, dataset.name)
    n, limit = len(dataset), input_limit(model, tokenizer)
    unique = {plan.key(): plan for plan in plans.values()}
    rates = sorted({float(r) for r in rates} | {0.0})
    steps = len(unique) * (1 + len(kinds) * sum(r > 0 for r in rates))
    done = 0

    def run_all(texts: Sequence[str], what: str) -> dict[str, np.ndarray]:
        nonlocal done
        ids = encode(tokenizer, texts, limit).ids
        out = {}
        for key, plan in unique.items():
            if progress is not None:
                progress(done / steps, f"{what}: {plan.label()}")
            out[key] = class_probs(model, tokenizer, ids, plan, kernels, batch_size, dataset).argmax(-1)
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
                rows.append(SweepRow(precision=name, plan=plan.label(), kind=kind, rate=rate, accuracy=accuracy,
                                     ci95=ci, flip_rate=flip_rate, flip_ci95=flip_ci, changed=changed, n=n))
    if progress is not None:
        progress(1.0, "done")
    clean_rows = {}
    for name, plan in plans.items():
        accuracy, ci = _interval_row(int((clean[plan.key()] == labels).sum()), n)
        clean_rows[name] = CleanAccuracy(accuracy=accuracy, ci95=ci)
    return SweepResult(dataset=dataset.name, n=n, kinds=kinds, rates=rates, seed=seed, keep_ends=keep_ends,
                       batch_size=batch_size, clean=clean_rows, rows=rows, seconds=time.perf_counter() - started)


def attack_success(model: nn.Module, tokenizer, dataset: EvalSet, plans: Mapping[str, Plan] | None = None,
                   targets: Sequence[str] | None = None, budget: int = 3, kinds: Sequence[str] = KINDS,
                   seed: int = 0, keep_ends: bool = False, kernels: str = Kernels.SIMULATED,
                   progress: Progress | None = None) -> AttackResult:
    """The flip search's success rate (95% Wilson CI) per target over every text of `dataset` (pass a
    `sample`): success = the target's top class changed within `budget` edits; also the mean number of
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
                searched[key].append(search_flip(model, tokenizer, text, plans[target], kernels, budget, kinds, seed,
                                                 keep_ends, None, dataset))
        queries = [used for _, used, _ in searched[key]]
        edit_counts = [len(edits) for edits, _, flipped in searched[key] if flipped]
        successes = len(edit_counts)
        rate, ci = _interval_row(successes, len(dataset))
        rows.append(AttackRow(precision=target, plan=plans[target].label(), success_rate=rate, ci95=ci,
                              successes=successes, n=len(dataset),
                              mean_edits=float(np.mean(edit_counts)) if edit_counts else None,
                              mean_queries=float(np.mean(queries)) if queries else 0.0))
    if progress is not None:
        progress(1.0, "done")
    return AttackResult(dataset=dataset.name, n=len(dataset), budget=budget, kinds=kinds, seed=seed, rows=rows,
                        seconds=time.perf_counter() - started)
