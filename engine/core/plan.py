"""The one plan type: ordered (layer-name glob, precision) rules plus quantizer options.

JSON form (the contract): an object mapping globs to precisions, applied in order, later entries
winning; unmatched layers stay fp32. A bare precision means {"*": precision}. Options ride along
under the reserved key "options" (an object, never a precision, so it cannot be mistaken for a
rule): int4 `group_size`, int8 activation scheme `act`, SmoothQuant's `smooth_alpha`, the calibration
size `calib`, the `runtime` whose numerics the simulation follows, and the `target_cpu` an ONNX Runtime
plan's int8 weights are written for (engine.core.cpu; unset: this machine).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence, Union

from engine.core.cpu import TARGET_NAMES, TargetCpu, as_target
from engine.core.errors import EngineError
from engine.core.numerics import ACT_SCHEMES
from engine.core.precisions import PRECISION_NAMES as PRECISIONS
from engine.core.precisions import PRECISIONS as REGISTRY
from engine.core.precisions import RUNTIMES

OPTIONS_KEY = "options"
DEFAULT_GROUP_SIZE = 64
DEFAULT_CALIB = 128


class PlanError(EngineError):
    """A plan that cannot be used; the message names the bad entry."""


@dataclass(frozen=True)
class Plan:
    """Ordered glob rules and options. Immutable and hashable, so it can key caches."""

    rules: tuple[tuple[str, str], ...] = ()
    group_size: int = DEFAULT_GROUP_SIZE
    act: str = "dynamic"
    smooth_alpha: float | tuple[tuple[str, float], ...] | None = None
    calib: int = DEFAULT_CALIB
    runtime: str = "torch"  # whose numerics the simulation reproduces: the runtime the plan is deployed on
    target_cpu: str | None = None  # the CPU an ONNX Runtime plan's int8 is for (None: this machine)

    def __post_init__(self) -> None:
        for pattern, precision in self.rules:
            if not isinstance(pattern, str) or not pattern:
                raise PlanError(f"plan entry {pattern!r}: a layer pattern must be a non-empty string")
            if precision not in PRECISIONS:
                raise PlanError(f"plan entry {pattern!r}: unknown precision {precision!r} "
                                f"(use {', '.join(PRECISIONS)})")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise PlanError(f"plan option group_size: {self.group_size!r} is not a positive integer")
        if self.act not in ACT_SCHEMES:
            raise PlanError(f"plan option act: {self.act!r} is not one of {', '.join(ACT_SCHEMES)}")
        if isinstance(self.calib, bool) or not isinstance(self.calib, int) or self.calib < 1:
            raise PlanError(f"plan option calib: {self.calib!r} is not a positive integer")
        if self.runtime not in RUNTIMES:
            raise PlanError(f"plan option runtime: {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.target_cpu is not None and self.target_cpu not in TARGET_NAMES:
            raise PlanError(f"plan option target_cpu: {self.target_cpu!r} is not one of {', '.join(TARGET_NAMES)}")
        alpha = self.smooth_alpha
        if alpha is not None and not isinstance(alpha, (int, float, tuple)):
            raise PlanError(f"plan option smooth_alpha: {alpha!r} is not a number or an object of layer: alpha")
        alphas = [alpha] if isinstance(alpha, (int, float)) else [a for _, a in alpha or ()]
        for alpha in alphas:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
                raise PlanError(f"plan option smooth_alpha: {alpha!r} is not a number in [0, 1]")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def uniform(cls, precision: str, **options) -> "Plan":
        return cls(rules=(("*", precision),), **options)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], **options) -> "Plan":
        return cls(rules=tuple(mapping.items()), **options)

    @classmethod
    def from_json(cls, data: object) -> "Plan":
        """A plan from its JSON value: a bare precision string or an object of rules (+ options)."""
        if isinstance(data, str):
            if data not in PRECISIONS:
                raise PlanError(f"plan {data!r}: unknown precision (use {', '.join(PRECISIONS)})")
            return cls.uniform(data)
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object or a precision, not {type(data).__name__}")
        rules, options = [], {}
        for key, value in data.items():
            if key == OPTIONS_KEY and isinstance(value, dict):
                options = dict(value)
            elif not isinstance(value, str):
                raise PlanError(f"plan entry {key!r}: the precision must be a string, not {value!r}")
            else:
                rules.append((key, value))
        unknown = set(options) - {"group_size", "act", "smooth_alpha", "calib", "runtime", "target_cpu"}
        if unknown:
            raise PlanError(f"plan options: unknown option {sorted(unknown)[0]!r}")
        if isinstance(options.get("smooth_alpha"), dict):
            options["smooth_alpha"] = tuple(options["smooth_alpha"].items())
        return cls(rules=tuple(rules), **options)

    def to_json(self) -> dict:
        data: dict = dict(self.rules)
        options = self.options()
        if options:
            data[OPTIONS_KEY] = options
        return data

    def options(self) -> dict:
        """The options that differ from the defaults, in JSON form."""
        options: dict = {}
        if self.group_size != DEFAULT_GROUP_SIZE:
            options["group_size"] = self.group_size
        if self.act != "dynamic":
            options["act"] = self.act
        if self.smooth_alpha is not None:
            options["smooth_alpha"] = self.smooth_alpha if isinstance(self.smooth_alpha, (int, float)) \
                else dict(self.smooth_alpha)
        if self.calib != DEFAULT_CALIB:
            options["calib"] = self.calib
        if self.runtime != "torch":
            options["runtime"] = self.runtime
        if self.target_cpu is not None:
            options["target_cpu"] = self.target_cpu
        return options

    @property
    def cpu(self) -> TargetCpu:
        """The CPU this plan's ONNX Runtime int8 is for: its target_cpu, else this machine."""
        return as_target(self.target_cpu)

    @property
    def int8_weight_bits(self) -> int:
        """Bits of the int8 weights the plan's runtime computes with: ORT's reduce_range (7) for a CPU whose
        int8 GEMM saturates, else 8. Torch's kernels keep their 8-bit weights on every CPU."""
        return self.cpu.int8_weight_bits if self.runtime == "onnxruntime" else 8

    def key(self) -> str:
        """A stable hash of the resolved meaning, independent of dict order in the source JSON."""
        options = self.options()
        if isinstance(self.smooth_alpha, tuple):  # per-layer alphas: order decides (later wins), so keep it
            options["smooth_alpha"] = [list(pair) for pair in self.smooth_alpha]
        # The target CPU counts by what it changes: the same numerics share a key, whichever name chose them
        # (a plan for this machine and one naming it), and a key made on a VNNI machine is what it always was.
        options.pop("target_cpu", None)
        if self.int8_weight_bits != 8:
            options["int8_weight_bits"] = self.int8_weight_bits
        text = json.dumps({"rules": self.rules, "options": options}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_rules(self, rules: Sequence[tuple[str, str]]) -> "Plan":
        return replace(self, rules=tuple(rules))

    def on(self, runtime: str) -> "Plan":
        """The same plan with the numerics of another runtime."""
        return replace(self, runtime=runtime)

    def for_cpu(self, target_cpu: str | None) -> "Plan":
        """The same plan with its ONNX Runtime int8 written for another CPU (None: this machine)."""
        return replace(self, target_cpu=target_cpu)

    def precisions_only(self) -> "Plan":
        """The same precisions and group size, without activation scheme or smoothing (what bytes depend on)."""
        return Plan(self.rules, self.group_size)

    def check_runtime(self, resolved: dict[str, str]) -> None:
        """Raise PlanError when the plan's runtime cannot run what `resolved` (its per-layer precisions) asks."""
        used = set(resolved.values())
        for precision in used:
            entry = REGISTRY[precision]
            if self.runtime not in entry.numerics:
                layer = next(name for name, p in resolved.items() if p == precision)
                raise PlanError(f"layer {layer}: {precision} on {self.runtime}: {entry.unsupported[self.runtime]}")
        if self.runtime != "onnxruntime":
            return
        if "int8" in used and self.act == "token":
            raise PlanError("int8 with act 'token': ONNX Runtime has no per-token dynamic int8 MatMul "
                            "(use act 'dynamic' or 'static')")
        if "int4" in used and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise PlanError(f"int4 group_size {self.group_size}: ONNX Runtime's MatMulNBits needs a power of two "
                            "of at least 16")

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales and smoothing are computed from calibration data."""
        return self.act == "static" or self.smooth_alpha is not None

    # ---- resolution ---------------------------------------------------------------------
    def resolve(self, layer_names: Sequence[str], strict: bool = True) -> dict[str, str]:
        """Each layer's precision. With strict, a pattern that matches no layer is an error, and so is a
        precision the plan's runtime cannot run."""
        resolved = {name: "fp32" for name in layer_names}
        for pattern, precision in self.rules:
            matched = [name for name in layer_names if fnmatch.fnmatchcase(name, pattern)]
            if not matched and strict:
                raise PlanError(f"plan entry {pattern!r}: matches no layer of this model")
            for name in matched:
                resolved[name] = precision
        if strict:
            self.check_runtime(resolved)
        return resolved

    def alpha_for(self, layer_name: str) -> float | None:
        """SmoothQuant's alpha for one layer, or None when that layer is not smoothed."""
        if self.smooth_alpha is None or isinstance(self.smooth_alpha, (int, float)):
            return None if self.smooth_alpha is None else float(self.smooth_alpha)
        alpha = None
        for pattern, value in self.smooth_alpha:
            if fnmatch.fnmatchcase(layer_name, pattern):
                alpha = float(value)
        return alpha

    def compact(self, layer_names: Sequence[str]) -> "Plan":
        """The same meaning as explicit per-layer rules for the layers that are not fp32."""
        resolved = self.resolve(layer_names, strict=False)
        return self.with_rules([(n, p) for n, p in resolved.items() if p != "fp32"])

    def label(self) -> str:
        """A short human name: the bare precision for uniform plans, else a summary."""
        options = {name: value for name, value in self.options().items() if name != "target_cpu"}
        if len(self.rules) == 1 and self.rules[0][0] == "*" and not options:
            return self.rules[0][1]
        if not self.rules and not options:
            return "fp32"
        return f"plan-{self.key()[:8]}"


FP32 = Plan()
PlanLike = Union[Plan, str, Mapping, None]


def as_plan(value: PlanLike) -> Plan:
    """The one coercion: a Plan as is, CLI text (precision, inline JSON, .json path) or a JSON value."""
    if isinstance(value, Plan):
        return value
    if value is None or isinstance(value, str):
        return parse_plan(value)
    return Plan.from_json(dict(value))


def parse_plan(text: str | None) -> Plan:
    """A plan from the CLI: inline JSON, a bare precision, or a path to a .json file."""
    if text is None or text.strip() == "":
        return FP32
    text = text.strip()
    if text in PRECISIONS:
        return Plan.uniform(text)
    if text.endswith(".json") and not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise PlanError(f"plan file {text} does not exist")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PlanError(f"plan is neither a precision ({', '.join(PRECISIONS)}), a .json file nor valid JSON: "
                        f"{error.msg}") from None
    return Plan.from_json(data)
