"""Deterministic character-level perturbations for the typo playground and the flip search.

`perturb` edits a share of the words of a text with one kind of typo and returns the edits it
made, positioned in the original text, so a page can highlight them and `apply_edits` can rebuild
the perturbed text. `candidate_edits` proposes single edits inside one word for the greedy search.
All randomness comes from `random.Random` seeded with a string, which is the same in every process
(string seeds are hashed with SHA-512, never with the salted `hash()`).
"""
from __future__ import annotations

import html
import random
import re
import string
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from engine.core.errors import EngineError

KINDS: tuple[str, ...] = ("swap", "delete", "insert", "substitute", "keyboard", "homoglyph", "invisible")

# The greedy search scores every candidate with a model call, so a long word offers only a sample.
MAX_CANDIDATES = 12

INVISIBLE: dict[str, str] = {"\u200b": "ZWSP", "\u200d": "ZWJ"}

# Cyrillic (U+04xx) and Greek (U+03xx) letters that render like the Latin key in common fonts.
HOMOGLYPHS: dict[str, tuple[str, ...]] = {
    "a": ("\u0430",),
    "c": ("\u0441", "\u03f2"),
    "e": ("\u0435",),
    "h": ("\u04bb",),
    "i": ("\u0456",),
    "j": ("\u0458",),
    "o": ("\u043e", "\u03bf"),
    "p": ("\u0440", "\u03c1"),
    "s": ("\u0455",),
    "v": ("\u03bd",),
    "x": ("\u0445",),
    "y": ("\u0443",),
    "A": ("\u0410", "\u0391"),
    "B": ("\u0412", "\u0392"),
    "C": ("\u0421", "\u03f9"),
    "E": ("\u0415", "\u0395"),
    "H": ("\u041d", "\u0397"),
    "I": ("\u0406", "\u0399"),
    "J": ("\u0408",),
    "K": ("\u041a", "\u039a"),
    "M": ("\u041c", "\u039c"),
    "N": ("\u039d",),
    "O": ("\u041e", "\u039f"),
    "P": ("\u0420", "\u03a1"),
    "S": ("\u0405",),
    "T": ("\u0422", "\u03a4"),
    "X": ("\u0425", "\u03a7"),
    "Y": ("\u04ae", "\u03a5"),
    "Z": ("\u0396",),
}

_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_WORD = re.compile(r"\w+")


def _keyboard_neighbours() -> dict[str, str]:
    """Each lowercase letter's neighbours on a QWERTY keyboard."""
    grid = {(r, c): ch for r, row in enumerate(_QWERTY_ROWS) for c, ch in enumerate(row)}
    neighbours = {}
    for (r, c), ch in grid.items():
        # Each row sits about half a key right of the row above, so key c touches keys c and c+1
        # of the row above and keys c-1 and c of the row below.
        around = ((r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c))
        neighbours[ch] = "".join(grid[p] for p in around if p in grid)
    return neighbours


KEYBOARD: dict[str, str] = _keyboard_neighbours()


class PerturbError(EngineError):
    """A perturbation kind, rate or edit that cannot be used; the message says which."""


@dataclass(frozen=True, kw_only=True)
class Edit:
    """One change: `before` at `position` of the original text becomes `after`."""

    kind: str
    position: int
    before: str
    after: str

    def to_json(self) -> dict[str, Any]:
        """{"kind", "position", "before", "after"}, as `perturb --json` writes each edit."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Edit:
        return cls(kind=data["kind"], position=data["position"], before=data["before"], after=data["after"])


@dataclass(frozen=True, kw_only=True)
class Perturbation:
    """A text, its perturbed version and the edits that turn one into the other."""

    text: str
    perturbed: str
    edits: tuple[Edit, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", tuple(self.edits))  # a value, whatever sequence it was given

    def to_json(self) -> dict[str, Any]:
        """`perturb --json`'s document: text, perturbed and the list of edit dicts."""
        return {"text": self.text, "perturbed": self.perturbed, "edits": [e.to_json() for e in self.edits]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Perturbation:
        return cls(text=data["text"], perturbed=data["perturbed"],
                   edits=tuple(Edit.from_json(e) for e in data["edits"]))


def words(text: str) -> list[tuple[int, int, str]]:
    """The (start, end, word) spans of the runs of Unicode word characters in `text`."""
    return [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PerturbError(f"unknown perturbation kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _check_rate(rate: float) -> float:
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise PerturbError(f"rate must be a number between 0 and 1, got {rate!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise PerturbError(f"rate must be between 0 and 1, got {rate!r}")
    return value


def _sites(word: str, kind: str, keep_ends: bool) -> list[int]:
    """Where in `word` an edit of `kind` can go: character indices, or gap indices for insertions.

    With `keep_ends` the first and last characters stay put, and nothing is inserted before the
    first or after the last. Zero-width characters go only between two characters of the word:
    at its edge they would merely sit beside it.
    """
    lo = 1 if keep_ends else 0
    hi = len(word) - 1 if keep_ends else len(word)
    if kind == "swap":
        # Swapping equal letters would change nothing, so such pairs are not sites.
        return [i for i in range(lo, hi - 1) if word[i] != word[i + 1]]
    if kind == "delete":
        return list(range(lo, hi))
    if kind == "insert":
        return list(range(lo, hi + 1))
    if kind == "invisible":
        return list(range(1, len(word)))
    if kind in ("substitute", "keyboard"):
        return [i for i in range(lo, hi) if word[i] in string.ascii_letters]
    return [i for i in range(lo, hi) if word[i] in HOMOGLYPHS]


def _same_case(new: str, old: str) -> str:
    return new.upper() if old.isupper() else new


def _make(word: str, offset: int, kind: str, i: int, rng: random.Random) -> Edit:
    """The edit of `kind` at site `i` of `word`, which starts at `offset` in the text."""
    at = offset + i
    if kind == "swap":
        return Edit(kind=kind, position=at, before=word[i : i + 2], after=word[i + 1] + word[i])
    if kind == "delete":
        return Edit(kind=kind, position=at, before=word[i], after="")
    if kind == "insert":
        return Edit(kind=kind, position=at, before="", after=rng.choice(string.ascii_lowercase))
    if kind == "invisible":
        return Edit(kind=kind, position=at, before="", after=rng.choice(tuple(INVISIBLE)))
    old = word[i]
    if kind == "substitute":
        new = _same_case(rng.choice([c for c in string.ascii_lowercase if c != old.lower()]), old)
    elif kind == "keyboard":
        new = _same_case(rng.choice(KEYBOARD[old.lower()]), old)
    else:
        new = rng.choice(HOMOGLYPHS[old])
    return Edit(kind=kind, position=at, before=old, after=new)


def perturb(text: str, kind: str, rate: float, seed: int = 0, keep_ends: bool = False) -> Perturbation:
    """Give round(rate * eligible words) of the words of `text` (at least one when rate > 0) one
    edit of `kind` each; a word is eligible when the kind has somewhere to go in it.
    """
    _check_kind(kind)
    rate = _check_rate(rate)
    if not isinstance(text, str):
        raise PerturbError(f"text must be a str, got {type(text).__name__}")
    rng = random.Random(f"{seed}:{kind}")
    eligible = [(start, word, sites) for start, _, word in words(text) if (sites := _sites(word, kind, keep_ends))]
    count = round(rate * len(eligible))
    if rate > 0 and eligible:
        count = max(count, 1)
    chosen = sorted(rng.sample(range(len(eligible)), count))
    edits = tuple(
        _make(word, start, kind, rng.choice(sites), rng) for start, word, sites in (eligible[j] for j in chosen)
    )
    return Perturbation(text=text, perturbed=apply_edits(text, edits), edits=edits)


def _order(edit: Edit) -> tuple[int, bool]:
    # An insertion at a position goes before a replacement starting there.
    return (edit.position, bool(edit.before))


def apply_edits(text: str, edits: Sequence[Edit]) -> str:
    """`text` with `edits` applied; they may come in any order but must not overlap."""
    parts, cursor = [], 0
    for edit in sorted(edits, key=_order):
        end = edit.position + len(edit.before)
        if edit.position < cursor or end > len(text) or text[edit.position : end] != edit.before:
            raise PerturbError(f"{edit} does not match the text at {edit.position} or overlaps another edit")
        parts += [text[cursor : edit.position], edit.after]
        cursor = end
    parts.append(text[cursor:])
    return "".join(parts)


def candidate_edits(word: str, offset: int, kind: str, seed: int = 0, keep_ends: bool = False) -> list[Edit]:
    """Single edits of `kind` inside `word` (found at `offset` in the text), sorted by position.

    One edit per site: every site of a short word, a deterministic sample of MAX_CANDIDATES
    sites of a longer one. Kinds with a choice of new character pick one at random per site.
    """
    _check_kind(kind)
    rng = random.Random(f"{seed}:{kind}:{offset}:{word}")
    sites = _sites(word, kind, keep_ends)
    if len(sites) > MAX_CANDIDATES:
        sites = sorted(rng.sample(sites, MAX_CANDIDATES))
    return [_make(word, offset, kind, i, rng) for i in sites]


def _visible(s: str) -> str:
    return "".join(f"\u27e8{INVISIBLE[c]}\u27e9" if c in INVISIBLE else c for c in s)


def highlight_html(p: Perturbation) -> str:
    """The perturbed text as escaped HTML with every edit in a <mark> whose title describes it.

    Deletions show the removed characters struck through, and zero-width characters show as
    labels such as ⟨ZWSP⟩, so every edit is visible on the page.
    """
    parts, cursor = [], 0
    for edit in sorted(p.edits, key=_order):
        title = f"{edit.kind}: '{_visible(edit.before)}'\u2192'{_visible(edit.after)}'"
        # Homoglyphs look like the original, so the title names their code points.
        codes = " ".join(f"U+{ord(c):04X}" for c in edit.after if ord(c) > 127 and c not in edit.before)
        if codes:
            title += f" ({codes})"
        body = html.escape(_visible(edit.after)) if edit.after else f"<del>{html.escape(edit.before)}</del>"
        parts += [html.escape(p.text[cursor : edit.position]), f'<mark title="{html.escape(title)}">{body}</mark>']
        cursor = edit.position + len(edit.before)
    parts.append(html.escape(p.text[cursor:]))
    return "".join(parts)
