"""The precision registry: each precision's simulated numerics on torch compute what its real CPU kernel
computes, layer by layer; ORT's int8 numerics are integers times scales (what the simulation sums); each
precision's byte count is its real format's; an unknown precision or one a runtime cannot run is one line.
ORT's numerics against ORT's own kernels are checked in tests/runtime/test_onnx.py and test_onnx_int4.py."""
from __future__ import annotations

import pytest
import torch

from engine.core.numerics import int8_reduce_range
from engine.core.plan import Plan, PlanError, parse_plan
from engine.core.precisions import PRECISION_NAMES, PRECISIONS
from engine.core.qmodules import SimLinear
from engine.core.vocabulary import ActScheme, Runtime
from engine.kernels.registry import real_kernels

CPU = torch.device("cpu")
GROUP = 16
FLOATS = ("fp16", "bf16")


def _tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 40, generator=generator) * 0.2
    bias = torch.randn(48, generator=generator) * 0.1
    x = torch.randn(3, 5, 40, generator=generator)
    table = torch.randn(50, 40, generator=generator)
    return weight, bias, x, table


def _simulated(precision: str, weight: torch.Tensor, bias: torch.Tensor | None) -> SimLinear:
    """The layer apply_plan simulates (engine.quant.apply.simulated_linear), built from the registry alone."""
    numerics = PRECISIONS[precision].numerics_for(Runtime.TORCH)
    reduce_range = numerics.reduce_range and int8_reduce_range()
    if numerics.integers is not None:
        integers, scales = numerics.integers(weight)
        return SimLinear(integers, bias, precision, ActScheme.DYNAMIC, None, None, reduce_range, scales,
                         numerics.activation)
    return SimLinear(numerics.weight(weight, GROUP), bias, precision, reduce_range=reduce_range,
                     quantize=numerics.activation)


def test_the_registry_names_every_precision_once_with_fp32_first():
    assert PRECISION_NAMES == ("fp32", "fp16", "bf16", "int8", "int4")
    assert all(PRECISIONS[name].name == name for name in PRECISION_NAMES)
    assert [name for name in PRECISION_NAMES if PRECISIONS[name].quantizes_activations] == ["int8"]


@pytest.mark.parametrize("precision", [p for p in PRECISION_NAMES if p not in FLOATS])
def test_simulated_linear_equals_the_real_cpu_kernel(precision):
    weight, bias, x, _ = _tensors()
    real = real_kernels(precision, CPU).linear(weight, bias, GROUP, CPU)
    simulated = _simulated(precision, weight, bias)
    assert torch.equal(simulated(x), real(x)), (simulated(x) - real(x)).abs().max()
    if precision != "fp32":  # and the layer is changed: the comparison is not FP32 against itself
        assert not torch.equal(real(x), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("precision", FLOATS)
def test_simulated_half_linear_without_bias_equals_the_real_cast_kernel(precision):
    weight, _, x, _ = _tensors()
    real = real_kernels(precision, CPU).linear(weight, None, GROUP, CPU)
    assert torch.equal(_simulated(precision, weight, None)(x), real(x))


@pytest.mark.parametrize("precision", FLOATS)
def test_simulated_half_linear_with_bias_equals_the_real_cast_kernel(precision):
    weight, bias, x, _ = _tensors()
    real = real_kernels(precision, CPU).linear(weight, bias, GROUP, CPU)
    assert torch.equal(_simulated(precision, weight, bias)(x), real(x))


@pytest.mark.parametrize("precision", [p for p in PRECISION_NAMES if p != "int8"])
def test_simulated_table_equals_the_real_cpu_lookup(precision):
    *_, table = _tensors()
    ids = torch.tensor([[0, 3, 49, 7, 3]])
    real = real_kernels(precision, CPU).table(table, None, GROUP, CPU)
    simulated = PRECISIONS[precision].numerics_for(Runtime.TORCH).table(table, GROUP)
    assert torch.equal(real(ids), simulated[ids])


def test_simulated_int8_table_equals_the_real_lookup():
    """torch's quantized Embedding computes q * scale + (-zero * scale) in one rounding, which differs from the
    quantized tensor's (q - zero) * scale by a float32 ulp in over half the entries: the simulation reads its rows
    from the lookup itself."""
    *_, table = _tensors()
    ids = torch.arange(table.shape[0])
    real = real_kernels("int8", CPU).table(table, None, GROUP, CPU)(ids)
    simulated = PRECISIONS["int8"].numerics_for(Runtime.TORCH).table(table, GROUP)
    assert torch.equal(real, simulated)
    assert not torch.equal(simulated, table)  # rounded to 256 levels a row


@pytest.mark.parametrize("runtime, bits, qmax", [(Runtime.TORCH, 8, 128), (Runtime.ONNXRUNTIME, 8, 127),
                                                 (Runtime.ONNXRUNTIME, 7, 64)])
def test_int8_integers_times_scales_are_the_simulated_weight(runtime, bits, qmax):
    weight, *_ = _tensors(seed=1)
    numerics = PRECISIONS["int8"].numerics_for(runtime, bits)
    integers, scales = numerics.integers(weight)
    assert torch.equal(integers, integers.round()) and integers.abs().max() <= qmax
    assert integers.abs().max() >= qmax - 1  # each row's largest weight reaches the end of the range
    assert torch.equal(integers * scales[:, None], numerics.weight(weight, GROUP))


def test_ort_int8_has_a_7_bit_variant_and_torch_does_not():
    int8 = PRECISIONS["int8"]
    assert int8.numerics_for(Runtime.ONNXRUNTIME, 7) is not int8.numerics_for(Runtime.ONNXRUNTIME, 8)
    assert int8.numerics_for(Runtime.TORCH, 7) is int8.numerics_for(Runtime.TORCH, 8)
    assert not int8.numerics[Runtime.ONNXRUNTIME].reduce_range  # ORT's activations use all 8 bits


@pytest.mark.parametrize("precision", PRECISION_NAMES)
def test_every_runtime_has_numerics_or_a_reason(precision):
    entry = PRECISIONS[precision]
    for runtime in Runtime:
        assert (runtime in entry.numerics) != (runtime in entry.unsupported), (precision, runtime)
    for runtime in entry.numerics:  # fp32 is the reference on every runtime; every other precision changes values
        weight, *_ = _tensors(seed=2)
        changed = not torch.equal(entry.numerics[runtime].weight(weight, GROUP), weight)
        assert changed == (precision != "fp32"), (precision, runtime)


@pytest.mark.parametrize("precision, rows, cols, group, expected", [
    ("fp32", 48, 40, 16, 4 * 48 * 40),
    ("fp16", 48, 40, 16, 2 * 48 * 40),
    ("bf16", 48, 40, 16, 2 * 48 * 40),
    ("int8", 48, 40, 16, 48 * 40 + 8 * 48),  # a byte a weight, a scale and zero point per row
    ("int4", 48, 40, 16, 48 * 20 + 48 * 3 * 8),  # two weights a byte; a scale and min per started group
    ("int4", 3, 7, 4, 3 * 4 + 3 * 2 * 8),  # odd widths round up to whole bytes and groups
])
def test_layer_bytes(precision, rows, cols, group, expected):
    assert PRECISIONS[precision].weight_bytes(rows, cols, group) == expected
    assert PRECISIONS[precision].layer_bytes(rows, cols, rows, group) == expected + 4 * rows  # a float32 bias


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int4"])
def test_layer_bytes_are_what_the_real_module_stores(precision):
    weight, *_ = _tensors()
    module = real_kernels(precision, CPU).linear(weight, None, GROUP, CPU)
    stored = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    rows, cols = weight.shape
    assert stored == PRECISIONS[precision].weight_bytes(rows, cols, GROUP)


@pytest.mark.parametrize("make", [lambda: parse_plan("int3"), lambda: Plan.uniform("int3"),
                                  lambda: Plan.from_json({"*": "int3"})])
def test_an_unknown_precision_is_one_line_naming_the_known_ones(make):
    with pytest.raises(PlanError) as error:
        make()
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in PRECISION_NAMES)
    with pytest.raises(KeyError):
        PRECISIONS["int3"]


def test_a_precision_a_runtime_cannot_run_is_refused_with_its_reason():
    plan = Plan.uniform("bf16").on(Runtime.ONNXRUNTIME)
    with pytest.raises(PlanError, match="bfloat16") as error:
        plan.specs(["encoder.layer.0.output.dense"])
    assert "\n" not in str(error.value)
