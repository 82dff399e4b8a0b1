"""Which integer path a CPU gives ONNX Runtime's int8 GEMM, and so which int8 format an export must use for
its figures to be what that CPU computes.

MLAS (ORT's kernels) multiplies uint8 activations by int8 weights (u8s8) with one of two kinds of
instruction, chosen from the CPU it runs on:
- VNNI (`vpdpbusd`: AVX-512 VNNI, AVX-VNNI) and AMX-INT8 add each product into a 32-bit sum: exact.
- Without them (AVX2, and AVX-512BW without VNNI), `vpmaddubsw` adds each pair of neighbouring products
  (k, k+1) into a 16-bit integer with saturation, before a second instruction sums the pairs in 32 bits.
  255 x 127 x 2 exceeds 32,767, so full-range int8 weights can saturate there, and the deployed model
  computes something else than exact integers. ORT's quantization guide recommends `reduce_range` for
  such CPUs: weights over [-64, 64], so that 255 x 64 x 2 = 32,640 always fits.

An export for a target that saturates therefore writes 7-bit weights (exact on every CPU), one for a
VNNI or AMX target full 8-bit weights (exact only there). Torch's x86 int8 kernels need no such choice:
their activations are 7-bit on every CPU (torch's default `reduce_range` for x86), 127 x 128 x 2 = 32,512.

No torch import here: the CLI lists the targets in its --help.
"""
from __future__ import annotations

import enum
import functools

from engine.core.memo import memo


class TargetCpu(str, enum.Enum):
    """The CPU a plan's ONNX Runtime numerics are for, named by the int8 instructions that decide them."""

    AVX2 = "avx2"  # AVX2 without any VNNI: vpmaddubsw, saturating pairs
    AVX512 = "avx512"  # AVX-512BW without VNNI: the same saturating pairs, twice as wide
    VNNI = "vnni"  # AVX-512 VNNI or AVX-VNNI: vpdpbusd, exact 32-bit sums
    AMX = "amx"  # AMX-INT8 tiles: exact 32-bit sums
    OTHER = "other"  # not x86 with AVX2 (ARM's dot products, SSE4.1's 16-bit widening): exact products

    @property
    def saturates(self) -> bool:
        """Whether ORT's u8s8 GEMM adds pairs of products in saturating 16-bit integers on this CPU."""
        return self in (TargetCpu.AVX2, TargetCpu.AVX512)

    @property
    def int8_weight_bits(self) -> int:
        """The int8 weights an export for this CPU writes: 7-bit (ORT's reduce_range) where pairs saturate."""
        return 7 if self.saturates else 8

    @property
    def kernel(self) -> str:
        """One line for cards and pages: the integer path and the weights that keep it exact."""
        if self.saturates:
            return (f"{self.value}: ORT's int8 GEMM adds pairs of products in saturating 16-bit integers "
                    "(vpmaddubsw), so int8 weights are 7-bit (reduce_range), exact on every CPU")
        if self is TargetCpu.OTHER:
            return "other: ORT's int8 GEMM sums exact products; int8 weights are 8-bit"
        return (f"{self.value}: ORT's int8 GEMM sums exact products (vpdpbusd or AMX tiles); int8 weights are "
                "8-bit, exact on VNNI and AMX CPUs only")


TARGET_NAMES = tuple(target.value for target in TargetCpu)
FEATURES = ("avx2", "avx512_f", "avx512_bw", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool]:
    """This CPU's instruction sets that decide int8 kernels (torch's cpuinfo reading)."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    return {name: bool(capabilities.get(name, False)) for name in FEATURES}


memo("core.cpu_features", cpu_features)


def target_for(features: dict[str, bool]) -> TargetCpu:
    """The target a CPU with these features is: the best int8 path MLAS picks on it."""
    if features.get("amx_int8"):
        return TargetCpu.AMX
    if features.get("avx512_vnni") or features.get("avx_vnni"):
        return TargetCpu.VNNI
    if features.get("avx512_bw"):
        return TargetCpu.AVX512
    if features.get("avx2"):
        return TargetCpu.AVX2
    return TargetCpu.OTHER


def this_cpu() -> TargetCpu:
    """The target this machine is."""
    return target_for(cpu_features())


def features_line(features: dict[str, bool] | None = None) -> str:
    """'avx2, avx512_bw, avx512_vnni' (or 'none of ...'): what cards and benchmarks name beside int8 figures."""
    features = cpu_features() if features is None else features
    present = [name for name in FEATURES if features.get(name)]
    return ", ".join(present) if present else f"none of {', '.join(FEATURES)}"


def as_target(value: str | TargetCpu | None) -> TargetCpu:
    """A target from its name; None is this machine."""
    if value is None:
        return this_cpu()
    try:
        return TargetCpu(value)
    except ValueError:
        raise ValueError(f"target CPU {value!r}: choose one of {', '.join(TARGET_NAMES)}") from None
