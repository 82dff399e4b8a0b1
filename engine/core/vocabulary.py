"""The one vocabulary: every name of a runtime, a kernel choice, an activation scheme, a quantization method,
an activation calibrator, a search budget and a grid task, as typed enums.

They are `StrEnum`s, so a member is its JSON name (`Runtime.ONNXRUNTIME == "onnxruntime"`), plans and cache
keys written before the enums existed read the same, and a page or the CLI offers `list(Enum)` rather than a
list of strings of its own. Elsewhere a name is spelled through its member (a test greps for bare strings).
"""
from __future__ import annotations

from enum import StrEnum


class Runtime(StrEnum):
    """Whose numerics a plan follows: the runtime it is deployed on."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"

    @property
    def label(self) -> str:
        return {"torch": "torch", "onnxruntime": "ONNX Runtime"}[self.value]


class Kernels(StrEnum):
    """Exact numerics in float (any device), or the device's low-precision kernels."""

    SIMULATED = "simulated"
    REAL = "real"


class ActScheme(StrEnum):
    """How an int8 layer quantizes its input: per tensor at run time, calibrated per tensor, per token."""

    DYNAMIC = "dynamic"
    STATIC = "static"
    TOKEN = "token"


class WeightMethod(StrEnum):
    """How a layer's weights become integers: round-to-nearest, or a method that compensates its error."""

    RTN = "rtn"  # round to nearest: the precision's own quantizer
    GPTQ = "gptq"  # error feedback through the inverse Hessian of the layer's calibration inputs
    AWQ = "awq"  # activation-aware per-input-channel scales, searched on calibration data, folded upstream
    HQQ = "hqq"  # half-quadratic optimisation of each group's zero point, without calibration data

    @property
    def needs_calibration(self) -> bool:
        return self in (WeightMethod.GPTQ, WeightMethod.AWQ)


class Calibrator(StrEnum):
    """How static int8 activation ranges are chosen from the calibration activations."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # KL divergence between the float and the quantized histogram (TensorRT's)
    MSE = "mse"  # the clipping range with the least quantization mean squared error


class BudgetKind(StrEnum):
    """What the mixed-precision search must satisfy."""

    MAX_DROP = "max_drop"
    NOT_WORSE = "not_worse"
    TARGET_BYTES = "target_bytes"
    LATENCY_MS = "latency_ms"


class TaskKind(StrEnum):
    """A unit of grid work."""

    EVAL = "eval"
    SENSITIVITY = "sensitivity"


def runtime_label(runtime: str) -> str:
    """How pages name a runtime ("ONNX Runtime"), from its member or its JSON name."""
    return Runtime(runtime).label


TIMING_TOKENS = 32  # the sequence length every latency figure is timed at, unless asked otherwise


def names(enum: type[StrEnum]) -> tuple[str, ...]:
    """The JSON names of an enum's members, in declaration order (for messages and choices)."""
    return tuple(member.value for member in enum)
