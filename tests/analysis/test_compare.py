"""The precision comparison: rows and fields, plan items, findings that follow the numbers, export,
the CUDA kernels (skipped without a GPU), the CLI and the page."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.analysis.compare import (CONTRACT_FIELDS, ComparisonRecord, ComparisonRow, SetOutcome, disagreements,
                                     run_comparison, variant)
from engine.analysis.findings import accuracy_finding, domain_finding, findings, size_finding, speed_finding
from engine.analysis.presets import preset_plan, resolve_plan_item, split_plan_list
from engine.analysis.report import to_csv, to_markdown
from engine.data.sets import EvalSet
from engine.core.plan import FP32, Plan, PlanError
from engine.core.stats import compare, median_interval
from engine.core.vocabulary import Runtime
from engine.evaluation.evaluate import EvalSummary, evaluate, summarize
from engine.evaluation.evaluator import EvalResult
from engine.model.inventory import list_layers
from engine.runtime.device import DeviceError

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
EXTRAS = ("n", "lost", "gained", "latency_ms_p95", "speedup", "speedup_ci95", "size_ratio", "load_average",
          "threads", "accuracy_delta", "accuracy_delta_ci95", "fp32_accuracy", "machine", "kernel_notes", "plan_json")


# ---- rows ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_report(tiny_bert, tokenizer):
    plans = [resolve_plan_item(name, tiny_bert) for name in ("fp32", "int8", "int8-linear", "int4")]
    return run_comparison(tiny_bert, tokenizer, plans, ["embedded", "amazon"], limit=40, bench_seconds=0.05)


def test_rows_have_every_field_per_plan_and_set(tiny_report):
    rows = tiny_report.rows
    assert [(r.plan, r.data) for r in rows] == [
        (p, d) for p in ("fp32", "int8", "int8-linear", "int4") for d in ("embedded[:40]", "amazon[:40]")]
    for row in rows:
        assert set(CONTRACT_FIELDS) | set(EXTRAS) <= set(row.to_json())
        low, high = row.ci95
        assert low <= row.accuracy <= high and row.n == 40 and row.device == "cpu"
        assert row.latency_ms_p50 <= row.latency_ms_p95 and row.throughput_per_s > 0
        low, high = row.speedup_ci95
        assert low <= row.speedup <= high
        assert row.lost + row.gained <= row.flips and row.timing_repeats >= 20
        assert row.accuracy_delta == pytest.approx((row.gained - row.lost) / row.n)
        json.dumps(row.to_json())  # plain JSON values only
    fp32 = rows[0]
    assert fp32.agreement == 1.0 and fp32.flips == 0 and fp32.speedup == 1.0 and fp32.size_ratio == 1.0
    by_plan = {r.plan: r for r in rows}
    assert by_plan["int4"].size_bytes < by_plan["int8"].size_bytes < by_plan["int8-linear"].size_bytes \
        < fp32.size_bytes


# What `compare --json` printed before its rows were typed: the same keys, in the same order.
CLI_KEYS = ["plan", "data", "accuracy", "ci95", "agreement", "flips", "mcnemar_p", "kl", "size_bytes", "latency_ms_p50",
            "throughput_per_s", "device", "runtime", "protocol", "n", "lost", "gained", "accuracy_delta",
            "accuracy_delta_ci95", "fp32_accuracy", "latency_ms_p95", "fp32_latency_ms_p50", "fp32_latency_ms_p95",
            "speedup", "speedup_ci95", "fp32_size_bytes", "size_ratio", "peak_memory_bytes", "threads", "load_average",
            "tokens", "throughput_batch", "timing_repeats", "machine", "kernel_notes", "plan_json", "cpu_kernel"]


def test_rows_are_typed_and_their_json_round_trips(tiny_report):
    for row in tiny_report.rows:
        assert isinstance(row, ComparisonRow)
        stored = json.loads(json.dumps(row.to_json()))  # as the cache and the CLI see it
        assert list(stored) == CLI_KEYS and isinstance(stored["ci95"], list)
        assert ComparisonRow.from_json(stored) == row and ComparisonRow.from_json(stored).to_json() == stored
    with pytest.raises(AttributeError):
        tiny_report.rows[0].accuracy = 1.0  # frozen: a row is a measured value


def test_the_pages_record_of_a_comparison_round_trips(tiny_report):
    record = tiny_report.record()
    assert record.rows == tuple(tiny_report.rows) and record.machine == tiny_report.machine
    assert list(record.disagreements) == disagreements(tiny_report.outcomes)
    assert ComparisonRecord.from_json(json.loads(json.dumps(record.to_json()))) == record  # as the cache keeps it


def test_a_row_stored_by_an_older_version_loads_or_is_refused(tiny_report):
    stored = tiny_report.rows[2].to_json() | {"retired_field": 1}  # a key no longer written: ignored
    for optional in ("runtime", "protocol", "peak_memory_bytes", "kernel_notes", "cpu_kernel"):
        stored.pop(optional, None)
    row = ComparisonRow.from_json(stored)
    assert row.runtime == "torch" and row.kernel_notes == () and row.cpu_kernel is None and row.plan == "int8"
    assert row.ci95 == tuple(stored["ci95"])
    del stored["speedup_ci95"]
    with pytest.raises(ValueError, match="without speedup_ci95"):
        ComparisonRow.from_json(stored)


def test_one_name_per_variant():
    assert variant("int8", "torch") == "int8" and variant("INT8", "onnxruntime") == "INT8 · ORT"


def test_fp32_is_timed_as_the_reference_even_when_not_listed(tiny_distilbert, tokenizer):
    rows = run_comparison(tiny_distilbert, tokenizer, [resolve_plan_item("int8", tiny_distilbert)], ["nyt"],
                          limit=8, bench_seconds=0.01).rows
    assert [(r.plan, r.data) for r in rows] == [("int8", "nyt[:8]")]
    assert rows[0].speedup_ci95[0] <= rows[0].speedup <= rows[0].speedup_ci95[1]
    assert rows[0].fp32_latency_ms_p50 > 0
    assert rows[0].size_ratio < 0.5


def test_rows_match_the_one_evaluation_path(tiny_report, tiny_bert, tokenizer):
    for row in tiny_report.rows[2:4]:  # int8 on both sets
        data = "embedded" if row.data.startswith("embedded") else "amazon"
        direct = evaluate(tiny_bert, tokenizer, data, "int8", limit=40)
        for key in ("accuracy", "ci95", "agreement", "flips", "kl", "mcnemar_p", "size_bytes"):
            assert getattr(row, key) == pytest.approx(direct[key]), key
        assert row.accuracy_delta == pytest.approx(row.accuracy - row.fp32_accuracy)


def test_the_evaluation_summary_is_typed_and_evaluate_keeps_its_dict(tiny_bert, tokenizer):
    summary = summarize(tiny_bert, tokenizer, "embedded", "int8", limit=16)
    assert isinstance(summary, EvalSummary) and summary.n == 16 and summary.ci95[0] <= summary.accuracy
    stored = json.loads(json.dumps(summary.to_json()))
    assert list(stored) == ["accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p", "plan", "kernels", "data",
                            "seconds", "size_bytes", "device", "classes"]  # eval --json's keys, no calibration
    assert EvalSummary.from_json(stored) == summary
    direct = evaluate(tiny_bert, tokenizer, "embedded", "int8", limit=16)
    assert direct == {**stored, "seconds": direct["seconds"]}


def test_int8_linear_keeps_the_embedding_in_fp32(tiny_distilbert):
    names = list_layers(tiny_distilbert)
    resolved = preset_plan("int8-linear", tiny_distilbert).resolve(names)
    assert resolved[names[0]] == "fp32" and set(resolved[n] for n in names[1:]) == {"int8"}
    assert set(preset_plan("int8", tiny_distilbert).resolve(names).values()) == {"int8"}


def test_plan_items(tiny_bert, tmp_path):
    path = tmp_path / "attention-int4.json"
    path.write_text(json.dumps({"*": "int8", "*attention*": "int4"}))
    assert split_plan_list(f'fp32,{path}, {{"*": "int8", "*query": "int4"}}') == [
        "fp32", str(path), '{"*": "int8", "*query": "int4"}']
    label, plan = resolve_plan_item(str(path), tiny_bert)
    assert label == "attention-int4" and plan == Plan.from_mapping({"*": "int8", "*attention*": "int4"})
    assert resolve_plan_item("bf16", tiny_bert) == ("bf16", Plan.uniform("bf16"))
    with pytest.raises(PlanError, match="int9.*preset"):
        resolve_plan_item("int9", tiny_bert)
    with pytest.raises(PlanError, match="nothing"):
        resolve_plan_item('{"nothing*": "int8"}', tiny_bert)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_bert, tokenizer):
    with pytest.raises(DeviceError, match="no CUDA device"):
        run_comparison(tiny_bert, tokenizer, [("fp32", FP32)], ["embedded"], device="cuda", limit=8)


# ---- disagreements --------------------------------------------------------------------------------
def _result(plan: Plan, logits, labels, reference) -> EvalResult:
    logits = np.asarray(logits, dtype=np.float32)
    return EvalResult(plan, "simulated", "toy", logits, compare(logits, labels, reference), 0.0)


def test_disagreements_list_exactly_the_disputed_examples():
    data = EvalSet("toy", ("good", "bad", "fine", "awful"), (1, 0, 1, 0))
    labels = np.array([1, 0, 1, 0])
    fp32_logits = [[0, 2], [2, 0], [0, 1], [1, 0]]
    fp32 = _result(FP32, fp32_logits, labels, fp32_logits)
    int8 = _result(Plan.uniform("int8"), [[0, 2], [2, 0], [1, 0], [1, 0]], labels, fp32_logits)
    int4 = _result(Plan.uniform("int4"), [[0, 2], [0, 3], [0, 1], [1, 0]], labels, fp32_logits)
    outcome = SetOutcome(data, fp32, ("negative", "positive"), labels, {"fp32": fp32, "int8": int8, "int4": int4})
    rows = disagreements([outcome])
    assert [r["text"] for r in rows] == ["bad", "fine"]  # "bad" has the wider probability spread
    assert rows[0]["label"] == "negative" and rows[0]["fp32"] == "negative" and rows[0]["int4"] == "positive"
    # the probability of FP32's class ("positive" for "fine") falls under INT8, which says negative
    assert rows[1]["int8"] == "negative" and rows[1]["int8 p(fp32 class)"] < 0.5 < rows[1]["fp32 p(fp32 class)"]


# ---- findings follow the numbers ------------------------------------------------------------------
def _row(**changes) -> ComparisonRow:
    row = {"plan": "int4", "data": "embedded", "n": 1056, "device": "cpu", "threads": 2, "tokens": 32,
           "accuracy": 0.80, "ci95": [0.775, 0.823], "agreement": 0.987, "kl": 0.004, "fp32_accuracy": 0.804,
           "accuracy_delta": -4 / 1056, "accuracy_delta_ci95": [-0.011, 0.003], "mcnemar_p": 0.52,
           "flips": 14, "lost": 9, "gained": 5, "latency_ms_p50": 61.0, "latency_ms_p95": 70.0,
           "fp32_latency_ms_p50": 60.0, "fp32_latency_ms_p95": 66.0, "speedup": 0.98, "speedup_ci95": [0.9, 1.05],
           "timing_repeats": 20, "throughput_per_s": 150.0, "throughput_batch": 32, "load_average": None,
           "size_bytes": 15_000_000, "fp32_size_bytes": 90_000_000, "size_ratio": 1 / 6, "machine": "test",
           "plan_json": {"*": "int4"}}
    return ComparisonRow.from_json({**row, **changes})


def test_accuracy_finding_follows_the_interval_and_the_test():
    inside = accuracy_finding(_row())
    assert "-0.4 points, inside the interval [-1.1, +0.3]" in inside and "McNemar p = 0.52" in inside
    significant = accuracy_finding(_row(accuracy_delta=-0.05, accuracy_delta_ci95=[-0.07, -0.03], mcnemar_p=1e-5))
    assert "significantly less accurate" in significant and "-5.0 points [-7.0, -3.0]" in significant
    assert "inside the interval" not in significant
    better = accuracy_finding(_row(accuracy_delta=0.03, accuracy_delta_ci95=[0.01, 0.05], mcnemar_p=0.01))
    assert "significantly more accurate" in better
    borderline = accuracy_finding(_row(accuracy_delta=-0.01, accuracy_delta_ci95=[-0.02, -0.001], mcnemar_p=0.07))
    assert "borderline" in borderline and "significantly" not in borderline
    assert "exactly FP32's prediction on all 1056" in accuracy_finding(_row(flips=0))


def test_speed_finding_needs_a_difference_beyond_the_noise():
    slower = speed_finding(_row(plan="fp16", latency_ms_p50=414.0, speedup=0.145, speedup_ci95=[0.13, 0.16]))
    assert slower.startswith("FP16 is 6.9x slower than FP32 on this CPU") and "[0.13, 0.16]" in slower
    assert "over 20 interleaved rounds" in slower
    assert "2 threads" in slower
    assert speed_finding(_row(speedup=2.0, speedup_ci95=[1.8, 2.3])).startswith("INT4 is 2.0x faster")
    assert "25% slower" in speed_finding(_row(speedup=0.8, speedup_ci95=[0.75, 0.9]))
    noise = speed_finding(_row(speedup=0.95, speedup_ci95=[0.7, 1.2]))
    assert "within timing noise" in noise and "slower" not in noise
    assert "this GPU" in speed_finding(_row(device="cuda", speedup=2.0, speedup_ci95=[1.9, 2.1]))
    assert speed_finding(_row(runtime=Runtime.ONNXRUNTIME, speedup=2.0, speedup_ci95=[1.8, 2.3])).startswith(
        "INT4 on onnxruntime is 2.0x faster")


def test_median_interval_covers_the_median():
    values = np.arange(1.0, 27.0)
    low, high = median_interval(values)
    assert low < np.median(values) < high and (low, high) == (8.0, 19.0)
    assert median_interval(np.array([3.0, 1.0])) == (1.0, 3.0)  # too few rounds: the whole range


def test_size_and_domain_findings_follow_the_numbers():
    assert "6.0x smaller than FP32 (15.0 MB vs 90.0 MB" in size_finding(_row())
    assert "20% smaller" in size_finding(_row(size_bytes=72_000_000))
    home = _row(lost=10, gained=12, accuracy_delta=2 / 1056)

    def away(lost: int, gained: int) -> ComparisonRow:
        return _row(data="amazon", n=3610, lost=lost, gained=gained, accuracy_delta=(gained - lost) / 3610)

    similar = domain_finding(home, away(40, 38))
    assert "inside the interval" in similar and "amazon (out of domain)" in similar
    worse = domain_finding(home, away(250, 40))
    assert "loses significantly more on out-of-domain amazon" in worse and "-6.0" in worse
    assert "loses significantly less" in domain_finding(_row(lost=60, gained=10, accuracy_delta=-50 / 1056),
                                                         away(40, 40))
    # a handful of flips: the normal interval alone could mislead, the exact test keeps it from a claim
    few = domain_finding(_row(lost=0, gained=1, accuracy_delta=1 / 1056), away(3, 0))
    assert "significantly" not in few and ("inside the interval" in few or "borderline" in few)
    assert domain_finding(_row(lost=0, gained=0, accuracy_delta=0.0), away(0, 0)) is None


def test_findings_cover_each_quantized_plan_and_skip_fp32():
    rows = [_row(plan="fp32", plan_json={}, accuracy_delta=0.0, accuracy_delta_ci95=[0.0, 0.0], flips=0),
            _row(), _row(data="amazon", n=3610, lost=250, gained=33, accuracy_delta=-217 / 3610,
                         accuracy_delta_ci95=[-0.075, -0.045], mcnemar_p=1e-6)]
    sentences = findings(rows)
    assert not any(s.startswith("FP32") for s in sentences)
    assert sum("INT4" in s for s in sentences) == len(sentences) == 5  # speed, 2 accuracy, domain, size
    assert any("significantly less accurate than FP32 on amazon" in s for s in sentences)


# ---- export -----------------------------------------------------------------------------------
def test_csv_and_markdown_export(tiny_report):
    rows = tiny_report.rows
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert len(parsed) == len(rows)
    assert float(parsed[3]["ci95_low"]) == pytest.approx(rows[3].ci95[0])
    assert float(parsed[3]["accuracy_delta_ci95_high"]) == pytest.approx(rows[3].accuracy_delta_ci95[1])
    assert json.loads(parsed[5]["plan_json"]) == rows[5].plan_json
    sentences = findings(rows)
    report = to_markdown(rows, sentences, tiny_report.machine)
    assert tiny_report.machine in report and report.count("\n| INT8 (Linear only) |") == 2
    assert all(f"- {s}" in report for s in sentences)
    # the page's rows come back from the cache as JSON: the same findings and the same files
    cached = [ComparisonRow.from_json(json.loads(json.dumps(row.to_json()))) for row in rows]
    assert findings(cached) == sentences and to_csv(cached) == to_csv(rows)
    assert to_markdown(cached, sentences, tiny_report.machine) == report


@needs_cuda
def test_compare_on_cuda(tiny_bert, tokenizer):
    plans = [resolve_plan_item(name, tiny_bert) for name in ("fp32", "fp16", "int8", "int4")]
    rows = run_comparison(tiny_bert, tokenizer, plans, ["embedded"], device="cuda", limit=32, bench_seconds=0.05).rows
    assert len(rows) == 4 and all(r.device == "cuda" for r in rows)
    assert all(r.peak_memory_bytes and r.latency_ms_p50 > 0 for r in rows)


# ---- CLI ----------------------------------------------------------------------------------------
def _cli(*args: str, env_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ENGINE_CACHE_DIR": str(env_dir)}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_cli_compare_on_the_embedded_model(tmp_path):
    done = _cli("compare", "--plans", "fp32,fp16,int8,int4", "--data", "embedded,amazon", "--limit", "48", "--json",
                env_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 8 and all(list(row) == CLI_KEYS for row in rows)
    for row in rows:
        assert all(row[key] is not None for key in CONTRACT_FIELDS), row
    assert {r["plan"] for r in rows} == {"fp32", "fp16", "int8", "int4"}


@pytest.fixture(scope="module")
def tiny_folder(tiny_bert, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_compare_errors_are_one_line(tiny_folder, tmp_path):
    for args, expected in ((["--plans", "fp32,int9"], "unknown plan 'int9'"),
                           (["--data", "embedded,imdb"], "unknown dataset 'imdb'"),
                           (["--plans", ""], "at least one plan")):
        done = _cli("compare", "--model", str(tiny_folder), "--limit", "4", *args, "--json", env_dir=tmp_path)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stdout == ""
    if not torch.cuda.is_available():
        done = _cli("compare", "--device", "cuda", "--json", env_dir=tmp_path)
        assert done.returncode == 2 and "no CUDA device" in done.stderr


# ---- page -------------------------------------------------------------------------------------
def test_page_runs_reacts_and_answers_a_second_visit_at_once(tiny_folder, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))

    def visit() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app_pages" / "compare.py"), default_timeout=300)
        at.session_state["model_name"] = str(tiny_folder)
        at.session_state["limit"] = 16
        return at.run()

    at = visit()
    assert not at.exception and not at.error
    assert at.multiselect(key="compare_presets").value == ["fp32", "fp16", "int8", "int4"]
    assert len(at.radio(key="compare_device").options) == (2 if torch.cuda.is_available() else 1)
    at.multiselect(key="compare_presets").set_value(["fp32", "int8"]).run()
    assert not at.dataframe  # nothing is computed before Run
    next(b for b in at.button if b.label == "Run comparison").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert list(table["plan"]) == ["FP32", "FP32", "INT8", "INT8"]
    assert len(at.get("plotly_chart")) == 3
    assert any("INT8" in m.value for m in at.markdown)

    at.multiselect(key="compare_presets").set_value(["fp32", "int4", "int8"]).run()
    next(b for b in at.button if b.label == "Run comparison").click().run()
    assert list(at.dataframe[0].value["plan"]) == ["FP32", "FP32", "INT4", "INT4", "INT8", "INT8"]

    again = visit()  # a new session with the first visit's default choices: nothing cached yet
    assert not again.dataframe
    again.multiselect(key="compare_presets").set_value(["fp32", "int8"]).run()
    assert list(again.dataframe[0].value["plan"]) == ["FP32", "FP32", "INT8", "INT8"]  # no click: from the cache


def test_page_profiles_a_plan_against_fp32_on_either_runtime(tiny_folder, tmp_path, monkeypatch):
    """'Why is it (not) faster here?': the plan's time by op group beside torch FP32's, with the CPU's features."""
    from streamlit.testing.v1 import AppTest

    from app_pages.profile_view import chart

    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app_pages" / "compare.py"), default_timeout=300)
    at.session_state["model_name"] = str(tiny_folder)
    at.session_state["limit"] = 16
    at.run()
    at.multiselect(key="compare_presets").set_value(["fp32", "int8"]).run()
    assert at.selectbox(key="profile_plan").options == ["int8"]  # FP32 is the reference, not a choice
    charts = len(at.get("plotly_chart"))
    for runtime in ("torch", "onnxruntime"):
        at.radio(key="profile_runtime").set_value(runtime).run()
        at.button(key="profile_run").click().run()
        assert not at.exception and not at.error
        assert len(at.get("plotly_chart")) == charts + 1
        assert any(c.value.startswith("This CPU (") for c in at.caption)
    profile = next(iter(at.session_state["profiles"].values()))
    figure = chart(profile)
    assert len(figure.data) == 8 and len(figure.data[0].x) == 4  # 7 groups and the time outside ops; 2 x 2 bars
