"""`python -m engine` with quantization methods: compare --methods / --calib-curve, sensitivity and search
--methods, and a method a precision cannot take exiting 2 with one line naming the plan entry."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _tiny
from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, tokenizer) -> str:
    """A tiny random BERT saved as a model folder: its attention layers end in .query, as the embedded model's do."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    _tiny("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))


def _json(capsys, *args: str):
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _error(capsys, *args: str) -> str:
    assert main([*args, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_a_method_the_precision_cannot_take_exits_2_naming_the_entry(bert_folder, tmp_path):
    """In a fresh process, as a user runs it: exit 2 and exactly the one line."""
    plan = '{"*.query": {"precision": "int8", "method": "gptq"}}'
    result = subprocess.run([sys.executable, "-m", "engine", "eval", "--model", bert_folder, "--plan", plan,
                             "--limit", "8"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                                 "ENGINE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: plan entry '*.query': method gptq takes int4, not int8"]


@pytest.mark.parametrize("args, message", [
    (("compare", "--methods", "gptq,omniquant"), "omniquant"),
    (("compare", "--methods", "--groups", "per-channel,0"), "--groups"),
    (("compare", "--calib-curve", "kl"), "calibrator 'kl'"),
    (("compare", "--methods", "--data", "embedded,amazon"), "one set"),
    (("compare", "--methods", "--groups", "24", "--runtime", "onnxruntime"), "group_size 24"),
    (("sensitivity", "--methods", "gptq", "--direction", "all-but-one"), "--direction one"),
    (("search", "--not-worse", "--methods", "rtn,nope"), "nope"),
])
def test_bad_method_input_exits_2(capsys, bert_folder, args, message):
    assert message in _error(capsys, args[0], "--model", bert_folder, "--limit", "8", *args[1:])


def test_compare_methods_json_and_table(capsys, bert_folder):
    out = _json(capsys, "compare", "--model", bert_folder, "--methods", "gptq", "--groups", "per-channel,32",
                "--limit", "16")
    assert out["n"] == 16 and out["data"] == "embedded[:16]"
    assert [row["label"] for row in out["rows"]] == [
        "int4 rtn per channel", "int4 gptq per channel", "int4 rtn g32", "int4 gptq g32", "w8a8 static minmax",
        "w8a8 static percentile", "w8a8 static entropy", "w8a8 static mse"]
    for row in out["rows"]:
        assert 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1 and 0 <= row["mcnemar_p_fp32"] <= 1
        assert (row["versus"] is None) == (row["mcnemar_p_versus"] is None)
    assert main(["compare", "--model", bert_folder, "--methods", "hqq", "--groups", "32", "--limit", "16"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("embedded[:16]: 16 examples") and table[1].split()[:2] == ["setting", "accuracy"]
    assert [line.split("  ")[0].strip() for line in table[2:4]] == ["int4 rtn g32", "int4 hqq g32"]


def test_calibration_curve_json(capsys, bert_folder):
    points = _json(capsys, "compare", "--model", bert_folder, "--calib-curve", "entropy", "--calib-sizes", "8,4",
                   "--limit", "16")
    assert [(p["calibrator"], p["requested"], p["texts"]) for p in points] == [("entropy", 4, 4), ("entropy", 8, 8)]


def test_sensitivity_and_search_with_methods(capsys, bert_folder, tmp_path):
    rows = _json(capsys, "sensitivity", "--model", bert_folder, "--methods", "rtn,gptq", "--precisions", "int4",
                 "--limit", "16")
    linears = {row["layer"] for row in rows if row["method"] == "gptq"}
    assert {row["method"] for row in rows} == {"rtn", "gptq"} and len(linears) == len(rows) // 2
    assert all(row["precision"] == "int4" for row in rows)
    plain = _json(capsys, "sensitivity", "--model", bert_folder, "--precisions", "int4", "--limit", "16")
    assert all(row["method"] == "rtn" for row in plain)
    assert [{**r, "seconds": 0} for r in plain] == [{**r, "seconds": 0} for r in rows if r["method"] == "rtn"]
    sweep_file = tmp_path / "rows.json"
    sweep_file.write_text(json.dumps(rows))
    result = _json(capsys, "search", "--model", bert_folder, "--max-drop", "100", "--sweep", str(sweep_file),
                   "--no-latency", "--limit", "16")
    assert all(set(c["methods"].values()) <= {"gptq"} for c in result["candidates"])
    assert isinstance(result["methods"], dict)
