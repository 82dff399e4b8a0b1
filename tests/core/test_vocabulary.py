"""One typed vocabulary, enforced: outside engine/core/vocabulary.py no runtime, kernel choice, activation scheme,
weight method, calibrator, search budget or grid task is spelled as a bare string, and the 32-token timing length
has one name. The check reads the code with `ast`, so a word in prose (a docstring, an f-string's text, a comment)
is never a hit; a string literal equal to a vocabulary name is, wherever it stands.
"""
from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import pytest

from engine.core.vocabulary import (TIMING_TOKENS, ActScheme, BudgetKind, Calibrator, Kernels, Runtime, TaskKind,
                                    WeightMethod)

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("engine", "cache", "service", "app_pages", "dashboard.py")
VOCABULARY = "engine/core/vocabulary.py"
# Every name of every enum: none is too common to police (a coincidence goes in ALLOW, with its reason).
WORDS = frozenset(member.value for enum in (Runtime, Kernels, ActScheme, WeightMethod, Calibrator, BudgetKind,
                                            TaskKind) for member in enum)

# (file, word) -> (at most how many, why): strings spelled like a vocabulary name that name something else.
ALLOW = {
    ("engine/cli/__init__.py", "eval"): (1, "the `eval` command's name"),
    ("engine/cli/__init__.py", "sensitivity"): (1, "the `sensitivity` command's name"),
    ("engine/cli/evaluate.py", "eval"): (2, "the `eval` command's name"),
    ("engine/cli/sweep.py", "sensitivity"): (3, "the `sensitivity` command's name"),
    ("engine/cli/smoothquant.py", "static"): (2, "--act's words (the contract's `--act static|dynamic`), which ACTS "
                                                 "maps to ActScheme members"),
    ("engine/cli/smoothquant.py", "dynamic"): (1, "--act's word for SmoothQuant's per-token setting (ActScheme.TOKEN)"),
    ("engine/core/plan.py", "percentile"): (2, "the `percentile` rule option's key"),
    ("engine/core/rules.py", "percentile"): (2, "the `percentile` rule option's key"),
    ("engine/core/stats.py", "percentile"): (1, "scipy's bootstrap interval method"),
    ("engine/analysis/sensitivity.py", "max_drop"): (1, "a summary row's largest drop, an output field"),
    ("engine/runtime/latency.py", "torch"): (1, "the torch package's version in the machine description"),
    ("engine/runtime/onnx_card.py", "torch"): (1, "the torch package's version on the model card"),
    ("engine/runtime/onnx_card.py", "onnxruntime"): (1, "the onnxruntime package's version on the model card"),
    ("app_pages/sensitivity.py", "sensitivity"): (1, "the scheduler's job kind for the page's sweep"),
    ("app_pages/sensitivity.py", "max_drop"): (1, "a block summary's largest drop, a column of its rows"),
}


def bare_names(source: str) -> list[tuple[int, str]]:
    """(line, word) of every string literal in `source` equal to a vocabulary name, docstrings and the text of
    f-strings excepted."""
    tree = ast.parse(source)
    prose = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            prose.add(id(node.value))  # a docstring, or a bare string statement: text, not a value
        elif isinstance(node, ast.JoinedStr):
            prose.update(id(part) for part in node.values)  # an f-string's literal pieces are its wording
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in WORDS
                  and id(node) not in prose)


def timing_lengths(source: str) -> list[tuple[int, str]]:
    """(line, name) of every assignment of the timing length to a name about tokens: a second name for it."""
    return [(node.lineno, target.id) for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name) and "TOKENS" in target.id
            and isinstance(node.value, ast.Constant) and type(node.value.value) is int
            and node.value.value == TIMING_TOKENS]


def _sources() -> dict[str, str]:
    files = []
    for entry in CHECKED:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in files
            if path.relative_to(ROOT).as_posix() != VOCABULARY}


def test_no_vocabulary_name_is_spelled_as_a_bare_string():
    found: dict[tuple[str, str], list[int]] = {}
    for name, source in _sources().items():
        for line, word in bare_names(source):
            found.setdefault((name, word), []).append(line)
    allowed = {key: count for key, (count, _why) in ALLOW.items()}
    extra = {f"{name}:{lines}": word for (name, word), lines in found.items()
             if len(lines) > allowed.get((name, word), 0)}
    assert not extra, f"spell these through engine.core.vocabulary's enums: {extra}"
    stale = [key for key in allowed if key not in found]
    assert not stale, f"no longer needed in ALLOW: {stale}"


def test_the_check_reports_a_bare_name_and_not_prose_or_a_member():
    source = ('"""Compares on torch."""\n'
              'x = runtime == "onnxruntime"\n'
              'y = f"{runtime} on real kernels"\n'
              'z = plan.act == ActScheme.STATIC\n'
              'w = {"kernels": "real", "act": "token"}\n')
    assert bare_names(source) == [(2, "onnxruntime"), (5, "real"), (5, "token")]


def test_the_timing_length_has_one_name():
    found = {name: timing_lengths(source) for name, source in _sources().items()}
    seconds = {name: hits for name, hits in found.items() if hits}
    assert not seconds, f"use engine.core.vocabulary.TIMING_TOKENS: {seconds}"
    assert timing_lengths("BENCH_TOKENS = 32\nTEXT_TOKENS = 32.0\nEVAL_BATCH = 32\n") == [(1, "BENCH_TOKENS")]


def test_every_timing_default_is_the_one_length():
    from engine.analysis import benchmark
    from engine.cli import bench

    for function in (benchmark.bench, benchmark.bench_against, benchmark.bench_exported,
                     benchmark.profile_against_fp32):
        assert inspect.signature(function).parameters["tokens"].default == TIMING_TOKENS
    parser = argparse.ArgumentParser()
    bench.setup("bench", parser)
    assert parser.parse_args([]).tokens == TIMING_TOKENS


def test_every_budget_kind_is_described_and_an_unknown_one_is_one_line():
    from engine.analysis.search import Budget, SearchError

    for kind in BudgetKind:
        assert Budget(kind, 1.0).describe() and Budget(kind.value, 1.0).describe() == Budget(kind, 1.0).describe()
    with pytest.raises(SearchError, match="budget must be one of max_drop, not_worse, target_bytes, latency_ms"):
        Budget("max-drop", 1.0)
