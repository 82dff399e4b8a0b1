"""The CPU an ONNX Runtime plan is for: each CPU's int8 path, the plan option, its cache key, the CLI flag."""
from __future__ import annotations

import pytest

from engine.core.cpu import TARGET_NAMES, TargetCpu, as_target, features_line, target_for, this_cpu
from engine.core.plan import Plan, PlanError

# Feature sets of real CPUs, as torch's cpuinfo names them.
CPUS = {
    "AMD EPYC 7002 (Zen 2)": ({"avx2": True}, TargetCpu.AVX2),
    "Intel Skylake-SP": ({"avx2": True, "avx512_f": True, "avx512_bw": True}, TargetCpu.AVX512),
    "Intel Cascade Lake": ({"avx2": True, "avx512_f": True, "avx512_bw": True, "avx512_vnni": True}, TargetCpu.VNNI),
    "Intel Alder Lake (AVX-VNNI)": ({"avx2": True, "avx_vnni": True}, TargetCpu.VNNI),
    "Intel Sapphire Rapids": ({"avx2": True, "avx512_bw": True, "avx512_vnni": True, "amx_int8": True},
                              TargetCpu.AMX),
    "ARM Neoverse": ({}, TargetCpu.OTHER),
}


@pytest.mark.parametrize("name", CPUS)
def test_each_cpu_gets_the_path_its_instructions_give(name):
    features, expected = CPUS[name]
    target = target_for(features)
    assert target is expected
    # only vpmaddubsw's saturating pairs need 7-bit weights
    assert target.saturates == (expected in (TargetCpu.AVX2, TargetCpu.AVX512))
    assert target.int8_weight_bits == (7 if target.saturates else 8)
    assert ("reduce_range" in target.kernel) == target.saturates


def test_this_machine_and_its_features_are_named():
    assert this_cpu() in TargetCpu and this_cpu() is target_for({f: True for f in features_line().split(", ")})
    assert as_target(None) is this_cpu() and as_target("avx2") is TargetCpu.AVX2
    with pytest.raises(ValueError, match="choose one of"):
        as_target("sse2")


def test_the_plan_option_round_trips_and_keys_by_what_it_changes():
    plan = Plan.uniform("int8", runtime="onnxruntime")
    for name in TARGET_NAMES:
        chosen = plan.for_cpu(name)
        assert Plan.from_json(chosen.to_json()) == chosen and chosen.to_json()["options"]["target_cpu"] == name
        assert Plan.uniform("int8").for_cpu(name).label() == "int8"  # the target is not a different plan to a reader
        assert chosen.int8_weight_bits == TargetCpu(name).int8_weight_bits
    # the same numerics share one key, whichever name chose them; different numerics never do
    assert plan.for_cpu("avx2").key() == plan.for_cpu("avx512").key() != plan.for_cpu("vnni").key()
    assert plan.for_cpu("vnni").key() == plan.for_cpu("amx").key() == plan.for_cpu("other").key()
    assert plan.key() == plan.for_cpu(this_cpu().value).key()
    # on a CPU whose GEMM is exact, keys made before targets existed still find their results
    assert plan.for_cpu("vnni").key() == Plan.uniform("int8", runtime="onnxruntime").for_cpu(None).key() \
        or this_cpu().saturates
    # torch's int8 is the same on every CPU: its plans' keys never depend on a target
    torch_plan = Plan.uniform("int8")
    assert torch_plan.for_cpu("avx2").key() == torch_plan.for_cpu("vnni").key() == torch_plan.key()
    assert torch_plan.int8_weight_bits == 8
    with pytest.raises(PlanError, match="target_cpu"):
        Plan.from_json({"*": "int8", "options": {"target_cpu": "pentium"}})


def test_the_cli_takes_a_target_and_refuses_an_unknown_one(capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--plan", "int8", "--target-cpu", "pentium", "--json"])
    assert exit_.value.code == 2 and "--target-cpu" in capsys.readouterr().err


def test_grid_tasks_carry_the_drivers_cpu_for_ort_plans():
    """A Ray worker on another kind of CPU must compute what the driver's key says: the target is named."""
    from engine.grid.tasks import _pinned

    ort = Plan.uniform("int8", runtime="onnxruntime")
    assert _pinned(ort).target_cpu == this_cpu().value and _pinned(ort).key() == ort.key()
    assert _pinned(ort.for_cpu("avx2")).target_cpu == "avx2"
    assert _pinned(Plan.uniform("int8")).target_cpu is None  # torch's int8 is the same everywhere
