"""The one plan type: ordered (layer-name glob, rule) entries plus quantizer options.

JSON form (the contract): an object mapping globs to rules, applied in order, later entries winning
(a layer takes the whole of the last entry matching it); unmatched layers stay fp32. A rule is a
precision, or an object such as {"precision": "int4", "method": "gptq", "group_size": 32} whose options
replace the plan's for the layers it matches. A bare precision means {"*": precision}. Options ride
along under the reserved key "options" (an object, never a rule): every rule's defaults (LAYER_OPTIONS:
the weight `method`, int4 `group_size`, int8 activation scheme `act`, SmoothQuant's `smooth_alpha`, the
static activation `calibration` method and `percentile`, the calibration size `calib`, `bias_correction`,
GPTQ's `damp` and `act_order`), and the whole plan's `runtime` whose numerics the simulation follows and
`target_cpu` an ONNX Runtime plan's int8 weights are written for (engine.core.cpu; unset: this machine).
A plan-level option applies to the layers whose precision takes it; a rule's own option must apply.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Mapping, Sequence, Union

from engine.core.cpu import TargetCpu, as_target
from engine.core.precisions import PRECISION_NAMES as PRECISIONS
from engine.core.precisions import PRECISIONS as REGISTRY
from engine.core.rules import (DEFAULT_CALIB, DEFAULT_GROUP_SIZE, LAYER_OPTIONS, METHOD_PRECISIONS, OPTION_NAMES,
                               PLAN_OPTIONS, QUANTIZED, LayerSpec, PlanError, Rule, checked_option)
from engine.core.vocabulary import ActScheme, Calibrator, Runtime, WeightMethod

OPTIONS_KEY = "options"


@dataclass(frozen=True)
class Plan:
    """Ordered glob rules and options. Immutable and hashable, so it can key caches."""

    rules: tuple[tuple[str, Rule], ...] = ()
    group_size: int = DEFAULT_GROUP_SIZE
    act: str = ActScheme.DYNAMIC
    smooth_alpha: float | tuple[tuple[str, float], ...] | None = None
    calib: int = DEFAULT_CALIB
    runtime: str = Runtime.TORCH  # whose numerics the simulation reproduces: the runtime the plan is deployed on
    target_cpu: str | None = None  # the CPU an ONNX Runtime plan's int8 is for (None: this machine)
    method: str = WeightMethod.RTN
    calibration: str = Calibrator.MINMAX
    percentile: float = 99.999
    bias_correction: bool = False
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        rules = []
        for pattern, rule in self.rules:
            if not isinstance(pattern, str) or not pattern:
                raise PlanError(f"plan entry {pattern!r}: a layer pattern must be a non-empty string")
            try:
                rules.append((pattern, Rule.of(rule)))
            except PlanError as error:
                raise PlanError(f"plan entry {pattern!r}: {error}") from None
        object.__setattr__(self, "rules", tuple(rules))
        for name in OPTION_NAMES:
            value = getattr(self, name)
            if name == "smooth_alpha" and isinstance(value, tuple):  # per-layer alphas: (pattern, alpha) pairs
                for _, alpha in value:
                    checked_option(name, alpha, "plan option smooth_alpha")
                continue
            if name == "smooth_alpha" and value is None:
                continue
            object.__setattr__(self, name, checked_option(name, value, f"plan option {name}"))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def uniform(cls, precision: str, **options) -> "Plan":
        return cls(rules=(("*", precision),), **options)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, "str | Rule"], **options) -> "Plan":
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
                continue
            try:
                rules.append((key, Rule.from_json(value)))
            except PlanError as error:
                raise PlanError(f"plan entry {key!r}: {error}") from None
        unknown = set(options) - set(OPTION_NAMES)
        if unknown:
            raise PlanError(f"plan options: unknown option {sorted(unknown)[0]!r}")
        if isinstance(options.get("smooth_alpha"), dict):
            options["smooth_alpha"] = tuple(options["smooth_alpha"].items())
        return cls(rules=tuple(rules), **options)

    def to_json(self) -> dict:
        data: dict = {pattern: rule.to_json() for pattern, rule in self.rules}
        options = self.options()
        if options:
            data[OPTIONS_KEY] = options
        return data

    def options(self) -> dict:
        """The options that differ from the defaults, in JSON form."""
        defaults = {**LAYER_OPTIONS, **PLAN_OPTIONS}
        options: dict = {}
        for name in OPTION_NAMES:
            value = getattr(self, name)
            if value != defaults[name]:
                options[name] = dict(value) if name == "smooth_alpha" and isinstance(value, tuple) \
                    else value.value if isinstance(value, StrEnum) else value
        return options

    @property
    def cpu(self) -> TargetCpu:
        """The CPU this plan's ONNX Runtime int8 is for: its target_cpu, else this machine."""
        return as_target(self.target_cpu)

    @property
    def int8_weight_bits(self) -> int:
        """Bits of the int8 weights the plan's runtime computes with: ORT's reduce_range (7) for a CPU whose
        int8 GEMM saturates, else 8. Torch's kernels keep their 8-bit weights on every CPU."""
        return self.cpu.int8_weight_bits if self.runtime == Runtime.ONNXRUNTIME else 8

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
        rules = [(pattern, rule.to_json()) for pattern, rule in self.rules]
        text = json.dumps({"rules": rules, "options": options}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_rules(self, rules: Sequence[tuple[str, "str | Rule"]]) -> "Plan":
        return replace(self, rules=tuple(rules))

    def on(self, runtime: str) -> "Plan":
        """The same plan with the numerics of another runtime."""
        return replace(self, runtime=runtime)

    def for_cpu(self, target_cpu: str | None) -> "Plan":
        """The same plan with its ONNX Runtime int8 written for another CPU (None: this machine)."""
        return replace(self, target_cpu=target_cpu)

    def precisions_only(self) -> "Plan":
        """The same precisions and group sizes, nothing else (what bytes depend on)."""
        rules = [(pattern, Rule(rule.precision, tuple((k, v) for k, v in rule.options if k == "group_size")))
                 for pattern, rule in self.rules]
        return Plan(tuple(rules), self.group_size)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales, smoothing, GPTQ's Hessians, AWQ's search and bias correction are computed
        from calibration data."""
        specs = [self._spec(rule) for _, rule in self.rules] or [self._spec(Rule("fp32"))]
        return self.smooth_alpha is not None or any(spec.needs_calibration for spec in specs)

    # ---- resolution ---------------------------------------------------------------------
    def _spec(self, rule: Rule, layer_name: str | None = None, pattern: str | None = None) -> LayerSpec:
        """`rule`'s options over the plan's; a plan-level option applies where the precision takes it, a rule's
        own must (checked by `check`)."""
        own = dict(rule.options)
        value = lambda name: own.get(name, getattr(self, name))
        precision = rule.precision
        method = value("method") if precision in METHOD_PRECISIONS[value("method")] else WeightMethod.RTN
        alpha = own.get("smooth_alpha", self.alpha_for(layer_name) if layer_name is not None else
                        self.smooth_alpha if isinstance(self.smooth_alpha, (int, float)) else None)
        int8, int4 = precision == "int8", precision == "int4"
        act = value("act") if int8 else ActScheme.DYNAMIC
        static = int8 and act == ActScheme.STATIC
        calibrates = static or alpha is not None or method.needs_calibration or value("bias_correction")
        return LayerSpec(
            precision, method, value("group_size") if int4 else DEFAULT_GROUP_SIZE, act,
            None if alpha is None else float(alpha),
            value("calibration") if static else Calibrator.MINMAX, value("calib") if calibrates else DEFAULT_CALIB,
            value("percentile") if static and value("calibration") == Calibrator.PERCENTILE else 99.999,
            bool(value("bias_correction")) and precision in QUANTIZED,
            value("damp") if method == WeightMethod.GPTQ else 0.01,
            bool(value("act_order")) and method == WeightMethod.GPTQ, pattern)

    def specs(self, layer_names: Sequence[str], strict: bool = True) -> dict[str, LayerSpec]:
        """Each layer's spec: the last entry matching it wins, unmatched layers stay fp32. With strict, a
        pattern that matches no layer is an error, and so is anything the plan's runtime or a precision cannot
        take (the message names the entry)."""
        matched_rule: dict[str, tuple[str, Rule]] = {}
        for pattern, rule in self.rules:
            matched = [name for name in layer_names if fnmatch.fnmatchcase(name, pattern)]
            if not matched and strict:
                raise PlanError(f"plan entry {pattern!r}: matches no layer of this model")
            for name in matched:
                matched_rule[name] = (pattern, rule)
        specs = {}
        for name in layer_names:
            pattern, rule = matched_rule.get(name, (None, Rule("fp32")))
            specs[name] = self._spec(rule, name, pattern)
        if strict:
            for pattern, rule in self.rules:
                self._check_rule(pattern, rule)
            self.check_runtime(specs)
        return specs

    def resolve(self, layer_names: Sequence[str], strict: bool = True) -> dict[str, str]:
        """Each layer's precision (see `specs`)."""
        return {name: spec.precision for name, spec in self.specs(layer_names, strict).items()}

    def _check_rule(self, pattern: str, rule: Rule) -> None:
        """A rule's own options must apply to its precision: a method, scheme or calibrator it cannot take
        would silently do nothing."""
        own = dict(rule.options)
        where = f"plan entry {pattern!r}"
        method = own.get("method")
        if method is not None and rule.precision not in METHOD_PRECISIONS[method]:
            raise PlanError(f"{where}: method {method} takes {' or '.join(METHOD_PRECISIONS[method])}, "
                            f"not {rule.precision}")
        if own.get("bias_correction") and rule.precision not in QUANTIZED:
            raise PlanError(f"{where}: bias correction needs int8 or int4, not {rule.precision}")
        if "act" in own and rule.precision != "int8":
            raise PlanError(f"{where}: an activation scheme needs int8, not {rule.precision}")
        if "group_size" in own and rule.precision != "int4":
            raise PlanError(f"{where}: a group size needs int4, not {rule.precision}")
        act = own.get("act", self.act)
        for name in ("calibration", "percentile"):
            if name in own and (rule.precision != "int8" or act != ActScheme.STATIC):
                raise PlanError(f"{where}: {name} chooses static int8 activation ranges (precision int8, act "
                                f"static), not {rule.precision}" + (f" with act {act}" if rule.precision == "int8"
                                                                     else ""))
        for name in ("damp", "act_order"):
            if name in own and own.get("method", self.method) != WeightMethod.GPTQ:
                raise PlanError(f"{where}: {name} is an option of method gptq")

    def check_runtime(self, specs: Mapping[str, LayerSpec]) -> None:
        """Raise PlanError when the plan's runtime cannot run what `specs` (each layer's) asks, or a layer
        combines what cannot be combined."""
        for layer, spec in specs.items():
            entry = REGISTRY[spec.precision]
            where = f"layer {layer}" + (f" (plan entry {spec.pattern!r})" if spec.pattern else "")
            if self.runtime not in entry.numerics:
                raise PlanError(f"{where}: {spec.precision} on {self.runtime}: {entry.unsupported[self.runtime]}")
            if spec.method == WeightMethod.AWQ and spec.smooth_alpha is not None:
                raise PlanError(f"{where}: AWQ and SmoothQuant both scale its input channels: choose one")
            if self.runtime != Runtime.ONNXRUNTIME:
                continue
            if spec.precision == "int8" and spec.act == ActScheme.TOKEN:
                raise PlanError(f"{where}: int8 with act 'token': ONNX Runtime has no per-token dynamic int8 MatMul "
                                "(use act 'dynamic' or 'static')")
            if spec.precision == "int4" and (spec.group_size < 16 or spec.group_size & (spec.group_size - 1)):
                raise PlanError(f"{where}: int4 group_size {spec.group_size}: ONNX Runtime's MatMulNBits needs a "
                                "power of two of at least 16")

    def alpha_for(self, layer_name: str) -> float | None:
        """SmoothQuant's plan-level alpha for one layer, or None when the plan does not smooth it."""
        if self.smooth_alpha is None or isinstance(self.smooth_alpha, (int, float)):
            return None if self.smooth_alpha is None else float(self.smooth_alpha)
        alpha = None
        for pattern, value in self.smooth_alpha:
            if fnmatch.fnmatchcase(layer_name, pattern):
                alpha = float(value)
        return alpha

    def compact(self, layer_names: Sequence[str]) -> "Plan":
        """The same meaning as explicit per-layer rules for the layers that are not fp32."""
        return self.with_rules(self.layer_rules(layer_names))

    def layer_rules(self, layer_names: Sequence[str]) -> list[tuple[str, Rule]]:
        """(layer, its rule) for every layer a rule quantizes, options kept."""
        matched: dict[str, Rule] = {}
        for pattern, rule in self.rules:
            for name in layer_names:
                if fnmatch.fnmatchcase(name, pattern):
                    matched[name] = rule
        return [(name, matched[name]) for name in layer_names if name in matched and matched[name].precision != "fp32"]

    def label(self) -> str:
        """A short human name: the bare precision for uniform plans, else a summary."""
        options = {name: value for name, value in self.options().items() if name != "target_cpu"}
        if len(self.rules) == 1 and self.rules[0][0] == "*" and not options and not self.rules[0][1].options:
            return self.rules[0][1].precision
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
