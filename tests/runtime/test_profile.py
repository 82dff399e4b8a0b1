"""Where the time goes: op groups from ORT's and torch's profilers, and the CPU's instruction sets."""
from __future__ import annotations

import json

import pytest

import zoo
from engine.analysis.benchmark import CpuReport, profile_against_fp32
from engine.core.cpu import FEATURES
from engine.data.sets import load_dataset
from engine.core.plan import Plan
from engine.runtime.onnx_export import export_onnx
from engine.runtime.profile import GROUPS, Profile, cpu_report

DATA = load_dataset("embedded").head(16)


def _accounts_for(profile: Profile) -> None:
    assert set(profile.groups) == set(GROUPS)
    assert profile.profiled_ms == pytest.approx(sum(profile.groups.values()), abs=1e-3)
    # the groups are the forward's own time: never more than the wall time around it. How much of it they
    # cover depends on the machine's load (a tiny model's forward is mostly overhead between ops, and a busy
    # CPU stretches that), so no lower bound here; the README gives the embedded model's share on a quiet machine
    assert 0 < profile.profiled_ms <= 1.25 * profile.wall_ms, profile


@pytest.mark.parametrize("runtime", ("torch", "onnxruntime"))
def test_int8_time_lands_in_the_quantized_matmuls_and_fp32_in_the_float_ones(runtime, tmp_path):
    model, tokenizer = zoo.build("bert")
    plan = Plan.uniform("int8")
    folder = None
    if runtime == "onnxruntime":
        folder = tmp_path / "int8"
        export_onnx(model, tokenizer, plan, folder)
    out = profile_against_fp32(model, tokenizer, plan, tokens=16, data=DATA, exported=folder, batches=(1, 4))
    assert [row.batch for row in out.profiles] == [1, 4]
    for row in out.profiles:
        mine, fp32 = row.plan, row.fp32_torch
        _accounts_for(mine)
        _accounts_for(fp32)
        assert mine.runtime == runtime and fp32.runtime == "torch"
        assert mine.groups["quantized matmul"] > 0 and fp32.groups["quantized matmul"] == 0
        assert fp32.groups["float matmul"] > 0 and mine.groups["attention"] > 0
        assert row.speedup > 0
    printed = json.loads(json.dumps(out.to_json()))  # what `bench --profile --json` prints
    assert list(printed) == ["profiles", "cpu", "machine"]
    assert list(printed["profiles"][0]) == ["batch", "tokens", "plan", "fp32_torch", "speedup"]
    assert printed["profiles"][-1]["plan"] == json.loads(json.dumps(mine.to_json()))
    assert printed["cpu"] == cpu_report()


def test_the_cpu_report_names_its_features_and_what_they_mean():
    report = cpu_report()
    assert CpuReport.from_json(report).to_json() == report  # the profile's typed report prints the same dict
    assert set(report["features"].split(", ")) <= set(FEATURES) or report["features"].startswith("none of")
    assert any("int4" in line for line in report["meaning"])
    assert report["target_cpu"] in ("avx2", "avx512", "vnni", "amx", "other")
