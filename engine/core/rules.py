"""A plan's rules and options: what one entry may set (a precision and per-layer options), how each option's
value is checked, and `LayerSpec`, the settings one layer ends up with. `engine.core.plan` combines them."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.cpu import TARGET_NAMES
from engine.core.errors import EngineError
from engine.core.precisions import PRECISION_NAMES as PRECISIONS
from engine.core.vocabulary import ActScheme, Calibrator, Runtime, WeightMethod, names

PRECISION_KEY = "precision"
DEFAULT_GROUP_SIZE = 64
DEFAULT_CALIB = 128
# Options a rule may set for the layers it matches; at the plan level they are every rule's defaults.
LAYER_OPTIONS: dict[str, object] = {
    "method": WeightMethod.RTN, "group_size": DEFAULT_GROUP_SIZE, "act": ActScheme.DYNAMIC, "smooth_alpha": None,
    "calibration": Calibrator.MINMAX, "calib": DEFAULT_CALIB, "percentile": 99.999, "bias_correction": False,
    "damp": 0.01, "act_order": False,
}
PLAN_OPTIONS: dict[str, object] = {"runtime": Runtime.TORCH, "target_cpu": None}  # the whole plan's only
OPTION_NAMES = tuple(LAYER_OPTIONS) + tuple(PLAN_OPTIONS)
QUANTIZED = ("int8", "int4")  # the precisions that have integers a method can choose
METHOD_PRECISIONS = {WeightMethod.RTN: PRECISIONS, WeightMethod.GPTQ: ("int4",), WeightMethod.HQQ: ("int4",),
                     WeightMethod.AWQ: QUANTIZED}


class PlanError(EngineError):
    """A plan that cannot be used; the message names the bad entry."""


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _number_in(low: float, high: float):
    return lambda value: not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high


def _one_of(enum):
    return lambda value: isinstance(value, str) and value in names(enum)


_VALID = {  # option -> (test, what a valid value is)
    "method": (_one_of(WeightMethod), f"one of {', '.join(names(WeightMethod))}"),
    "group_size": (_positive_int, "a positive integer"),
    "act": (_one_of(ActScheme), f"one of {', '.join(names(ActScheme))}"),
    "smooth_alpha": (_number_in(0.0, 1.0), "a number in [0, 1]"),
    "calibration": (_one_of(Calibrator), f"one of {', '.join(names(Calibrator))}"),
    "calib": (_positive_int, "a positive integer"),
    "percentile": (lambda v: _number_in(50.0, 100.0)(v) and v > 50.0, "a number in (50, 100]"),
    "bias_correction": (lambda v: isinstance(v, bool), "true or false"),
    "damp": (lambda v: _number_in(0.0, 1.0)(v) and v > 0.0, "a number in (0, 1]"),
    "act_order": (lambda v: isinstance(v, bool), "true or false"),
    "runtime": (_one_of(Runtime), f"one of {', '.join(names(Runtime))}"),
    "target_cpu": (lambda v: v is None or v in TARGET_NAMES, f"one of {', '.join(TARGET_NAMES)}"),
}
_TYPED = {"method": WeightMethod, "act": ActScheme, "calibration": Calibrator, "runtime": Runtime}


def checked_option(name: str, value, where: str):
    """`value` as option `name` takes it (a vocabulary member where it names one), or PlanError naming `where`."""
    test, valid = _VALID[name]
    if not test(value):
        raise PlanError(f"{where}: {value!r} is not {valid}")
    return _TYPED[name](value) if name in _TYPED else value


@dataclass(frozen=True)
class Rule:
    """What a plan entry sets for the layers its pattern matches: a precision and, optionally, options of its
    own (which replace the plan's for those layers). JSON: the bare precision, or {"precision": ..., option: ...}."""

    precision: str
    options: tuple[tuple[str, object], ...] = ()  # sorted by name

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PlanError(f"unknown precision {self.precision!r} (use {', '.join(PRECISIONS)})")
        checked = []
        for name, value in self.options:
            if name not in LAYER_OPTIONS:
                raise PlanError(f"unknown option {name!r} (a rule takes {', '.join(LAYER_OPTIONS)})")
            checked.append((name, checked_option(name, value, f"option {name}")))
        object.__setattr__(self, "options", tuple(sorted(checked)))

    @classmethod
    def of(cls, value: "str | Rule") -> "Rule":
        return value if isinstance(value, Rule) else cls(value)

    @classmethod
    def from_json(cls, value: object) -> "Rule":
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict) or not isinstance(value.get(PRECISION_KEY), str):
            raise PlanError(f"a rule is a precision or an object with a \"precision\", not {value!r}")
        return cls(value[PRECISION_KEY], tuple((k, v) for k, v in value.items() if k != PRECISION_KEY))

    def to_json(self) -> str | dict:
        return self.precision if not self.options else {PRECISION_KEY: self.precision, **dict(self.options)}

    def get(self, name: str, default=None):
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized under a plan: its rule's precision and options over the plan's defaults.
    Options a precision cannot take are at their defaults, so that equal specs compute the same layer."""

    precision: str
    method: WeightMethod = WeightMethod.RTN
    group_size: int = DEFAULT_GROUP_SIZE
    act: ActScheme = ActScheme.DYNAMIC
    smooth_alpha: float | None = None
    calibration: Calibrator = Calibrator.MINMAX
    calib: int = DEFAULT_CALIB
    percentile: float = 99.999
    bias_correction: bool = False
    damp: float = 0.01
    act_order: bool = False
    pattern: str | None = field(default=None, compare=False)  # the entry that set it (None: no entry matched)

    @property
    def static(self) -> bool:
        """int8 with calibrated (static) activation scales."""
        return self.precision == "int8" and self.act == ActScheme.STATIC

    @property
    def needs_calibration(self) -> bool:
        return self.static or self.smooth_alpha is not None or self.method.needs_calibration or self.bias_correction

    def describe(self) -> str:
        """A few words for tables and cells: 'int4 gptq g32', 'int8 static entropy', 'int8'."""
        words = [self.precision]
        if self.method != WeightMethod.RTN:
            words.append(self.method.value)
        if self.precision == "int4" and self.group_size != DEFAULT_GROUP_SIZE:
            words.append(f"g{self.group_size}")
        if self.precision == "int8" and self.act != ActScheme.DYNAMIC:
            words.append(self.act.value)
        if self.static and self.calibration != Calibrator.MINMAX:
            words.append(self.calibration.value)
        if self.bias_correction:
            words.append("+bc")
        return " ".join(words)
