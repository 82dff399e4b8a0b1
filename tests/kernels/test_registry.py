"""The real kernels registered per (precision, device type): every precision on both device types, one line for a
device without them, and the CPU entries being the modules people deploy."""
from __future__ import annotations

import pytest
import torch

from engine.core.errors import EngineError
from engine.core.precisions import PRECISION_NAMES
from engine.core.qmodules import Int4Linear
from engine.kernels.registry import KERNELS, real_kernels


def test_every_precision_has_real_kernels_on_the_cpu_and_on_cuda():
    assert set(KERNELS) == {(precision, kind) for precision in PRECISION_NAMES for kind in ("cpu", "cuda")}


def test_a_device_without_kernels_is_one_line():
    with pytest.raises(EngineError, match="no real int8 kernel on meta: registered on cpu, cuda"):
        real_kernels("int8", torch.device("meta"))


def test_the_cpu_kernels_are_the_modules_people_deploy():
    weight, bias = torch.randn(16, 32), torch.randn(16)
    cpu = torch.device("cpu")
    assert type(real_kernels("int8", cpu).linear(weight, bias, 32, cpu)).__name__ == "Linear"  # torch's dynamic one
    assert real_kernels("int8", cpu).linear(weight, bias, 32, cpu).__module__.startswith("torch.ao.nn.quantized")
    assert isinstance(real_kernels("int4", cpu).linear(weight, bias, 32, cpu), Int4Linear)
    plain = real_kernels("fp32", cpu).linear(weight, bias, 32, cpu)
    x = torch.randn(3, 32)
    assert torch.equal(plain(x), torch.nn.functional.linear(x, weight, bias))
