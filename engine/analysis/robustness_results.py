"""What the batch robustness measures return (`attack.sweep`, `attack.attack_success`) as frozen values.

Each `to_json()` is the dict those functions returned before they were typed (same keys, order and values),
which is what the robustness page's cache stores; `from_json` reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping


def _json(value: Any) -> Any:
    """A tuple field as the list JSON has always carried."""
    return list(value) if isinstance(value, tuple) else value


def _known(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data`'s values of `cls`'s fields: keys it does not know are ignored, a missing field is a TypeError later."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


class _Flat:
    """A frozen result whose JSON is its fields in order, tuples as lists; `TUPLES` names the fields JSON gives
    as lists, kept as tuples so that the result is a value."""

    TUPLES: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self.TUPLES:
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_json(self) -> dict[str, Any]:
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        return cls(**_known(cls, data))


@dataclass(frozen=True, kw_only=True)
class SweepRow(_Flat):
    """One plan on the set perturbed by one kind at one rate."""

    precision: str  # the plan's name in `plans`
    plan: str  # the plan's label
    kind: str
    rate: float
    accuracy: float
    ci95: tuple[float, float]
    flip_rate: float  # share of texts whose top class changed against the same plan on the clean text
    flip_ci95: tuple[float, float]
    changed: float  # share of texts the perturbation actually edited
    n: int

    TUPLES = ("ci95", "flip_ci95")


@dataclass(frozen=True, kw_only=True)
class CleanAccuracy(_Flat):
    """One plan's accuracy on the unperturbed set, with its 95% Wilson CI."""

    accuracy: float
    ci95: tuple[float, float]

    TUPLES = ("ci95",)


@dataclass(frozen=True, kw_only=True)
class SweepResult(_Flat):
    """Accuracy and flip rate of every plan at every kind and rate, and each plan's clean accuracy."""

    dataset: str
    n: int
    kinds: tuple[str, ...]
    rates: tuple[float, ...]  # sorted, 0 included
    seed: int
    keep_ends: bool
    batch_size: int
    clean: dict[str, CleanAccuracy]  # plan name to its accuracy on the clean text
    rows: tuple[SweepRow, ...]
    seconds: float

    TUPLES = ("kinds", "rates", "rows")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["clean"] = {name: c.to_json() for name, c in self.clean.items()}
        out["rows"] = [row.to_json() for row in self.rows]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SweepResult:
        known = _known(cls, data)
        known["clean"] = {name: CleanAccuracy.from_json(c) for name, c in data["clean"].items()}
        known["rows"] = tuple(SweepRow.from_json(row) for row in data["rows"])
        return cls(**known)


@dataclass(frozen=True, kw_only=True)
class AttackRow(_Flat):
    """The flip search's success on one target over a sample."""

    precision: str  # the target's name in `plans`
    plan: str  # the target plan's label
    success_rate: float
    ci95: tuple[float, float]
    successes: int
    n: int
    mean_edits: float | None  # over the successes; None when there is none
    mean_queries: float

    TUPLES = ("ci95",)


@dataclass(frozen=True, kw_only=True)
class AttackResult(_Flat):
    """The flip search's success rate per target over a sample, with the budget and kinds it had."""

    dataset: str
    n: int
    budget: int
    kinds: tuple[str, ...]
    seed: int
    rows: tuple[AttackRow, ...]
    seconds: float

    TUPLES = ("kinds", "rows")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["rows"] = [row.to_json() for row in self.rows]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackResult:
        known = _known(cls, data)
        known["rows"] = tuple(AttackRow.from_json(row) for row in data["rows"])
        return cls(**known)
