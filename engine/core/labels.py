"""A model's classes, read from its id2label in index order, and how a data set's labels map onto them.

Never assume index 1 is positive: a model whose index 0 is POSITIVE is read right. A label in a data
set is matched case-insensitively to a class name, or read as an integer class id. For a binary
sentiment model (one class named pos..., the other neg...) and for a binary model with unnamed
classes (LABEL_0/LABEL_1, index 1 positive by the hub's convention), 1/0, true/false, yes/no and
positive/negative mean positive/negative, as in the vendored sentiment sets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from engine.core.errors import EngineError

POSITIVE_WORDS = frozenset({"1", "pos", "positive", "true", "yes"})
NEGATIVE_WORDS = frozenset({"0", "neg", "negative", "false", "no"})
_UNNAMED = re.compile(r"label_?\d+")


class LabelError(EngineError):
    """Labels in a data set that the model's classes cannot take; the message names them."""


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one model, in output order."""

    names: tuple[str, ...]

    @classmethod
    def from_id2label(cls, id2label: Mapping | None, num_labels: int) -> "LabelSpace":
        table = {int(k): str(v) for k, v in (id2label or {}).items()}
        return cls(tuple(table.get(i, f"LABEL_{i}") for i in range(max(num_labels, len(table)))))

    def __len__(self) -> int:
        return len(self.names)

    def display(self, index: int) -> str:
        """The class's name as the CLI and pages print it (lower-cased)."""
        return self.names[index].lower()

    def sentiment(self) -> tuple[int, int] | None:
        """(negative index, positive index) for a binary sentiment or unnamed binary model, else None."""
        if len(self.names) != 2:
            return None
        lowered = [name.lower() for name in self.names]
        positive = [i for i, name in enumerate(lowered) if name.startswith("pos")]
        negative = [i for i, name in enumerate(lowered) if name.startswith("neg")]
        if len(positive) == 1 and len(negative) == 1:
            return negative[0], positive[0]
        if all(_UNNAMED.fullmatch(name) for name in lowered):
            return 0, 1
        return None

    def index(self, raw: object) -> int | None:
        """The class index a data-set label means, or None when the model has no such class."""
        text = str(raw).strip().lower()
        lowered = [name.lower() for name in self.names]
        if text in lowered:
            return lowered.index(text)
        sentiment = self.sentiment()
        if sentiment is not None:
            if text in POSITIVE_WORDS:
                return sentiment[1]
            if text in NEGATIVE_WORDS:
                return sentiment[0]
        if re.fullmatch(r"-?\d+", text) and 0 <= int(text) < len(self.names):
            return int(text)
        return None

    def readings(self, raw_labels: Sequence[object]) -> dict[str, str]:
        """How each distinct label that is not a class name was read (an integer id, or yes/no-like words for a
        sentiment model): label -> the class it means, so that a person can see the mapping and check it."""
        lowered = {name.lower() for name in self.names}
        distinct = dict.fromkeys(str(label).strip() for label in raw_labels)
        return {label: self.display(index) for label in distinct
                if label.lower() not in lowered and (index := self.index(label)) is not None}

    def indices(self, raw_labels: Sequence[object], source: str) -> np.ndarray:
        """Class indices of every label, or one LabelError naming the labels the model lacks."""
        distinct = list(dict.fromkeys(str(label).strip() for label in raw_labels))
        mapping = {label: self.index(label) for label in distinct}
        missing = [label for label, index in mapping.items() if index is None]
        if missing:
            shown = ", ".join(repr(label) for label in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise LabelError(f"labels in {source} that the model lacks: {shown} (its classes: "
                             f"{', '.join(self.names)}; use class names or integer ids 0-{len(self.names) - 1})")
        return np.array([mapping[str(label).strip()] for label in raw_labels], dtype=np.int64)
