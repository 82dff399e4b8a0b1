"""Tests for engine.perturb: determinism, rates, edit bookkeeping, each kind's rules, odd inputs, HTML."""
from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from engine.analysis.perturb import (
    HOMOGLYPHS,
    INVISIBLE,
    KEYBOARD,
    KINDS,
    MAX_CANDIDATES,
    Edit,
    Perturbation,
    PerturbError,
    apply_edits,
    candidate_edits,
    highlight_html,
    perturb,
    words,
)

REPO = Path(__file__).resolve().parents[2]
# Plain space-separated words, long enough that two seeds practically never pick the same edits.
LONG = " ".join(
    "the film is a wonderful mess of clever ideas and poor pacing yet the cast keeps it alive "
    "until an ending that feels rushed but earned overall a good watch for patient people".split() * 3
)
ODD_INPUTS = {
    "empty": "",
    "whitespace": " \t\n  \r\n ",
    "emoji": "😀🎬👍🏽❤️‍🔥",
    "arabic": "هذا الفيلم رائع جدا",
    "hebrew": "הסרט הזה נהדר מאוד",
    "mixed": "Great фильм 很好 ταινία مرحبا שלום 😀 naïve café",
    "control": "bad\x00movie\x07really\x1b[31m awful\x7f",
    "html": '<script>alert("x")</script> <b>good</b> &amp; film',
    "one_long_word": "a" * 2500 + "b" * 2500,
    "twenty_thousand": ("Worth it, mostly? " * 1200)[:20_000],
    "single_letters": "a b c I",
    "digits_underscores": "2024 was_ok 10/10",
}


def _word_spans(text: str) -> list[tuple[int, int]]:
    return [(start, end) for start, end, _ in words(text)]


def _eligible_count(text: str, kind: str, keep_ends: bool) -> int:
    return sum(bool(candidate_edits(w, start, kind, keep_ends=keep_ends)) for start, _, w in words(text))


def test_kinds_are_the_documented_seven() -> None:
    assert KINDS == ("swap", "delete", "insert", "substitute", "keyboard", "homoglyph", "invisible")


def test_words_spans_cover_unicode_words_and_skip_emoji() -> None:
    text = "Naïve café, שלום 😀 مرحبا x_1!"
    spans = words(text)
    assert [w for _, _, w in spans] == ["Naïve", "café", "שלום", "مرحبا", "x_1"]
    for start, end, w in spans:
        assert text[start:end] == w
    assert words("😀 👍🏽 ... !!") == []


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_output(kind: str) -> None:
    for keep_ends in (False, True):
        a = perturb(LONG, kind, 0.4, seed=7, keep_ends=keep_ends)
        b = perturb(LONG, kind, 0.4, seed=7, keep_ends=keep_ends)
        assert a == b
        assert a.edits


@pytest.mark.parametrize("kind", KINDS)
def test_different_seeds_differ_on_long_text(kind: str) -> None:
    outputs = {perturb(LONG, kind, 0.5, seed=s).perturbed for s in range(5)}
    assert len(outputs) == 5


def test_output_is_identical_in_another_process_with_another_hash_seed() -> None:
    # String hashing is salted per process; a fresh interpreter with a fixed, different salt
    # catches any dependence on hash().
    script = (
        "import json, sys; from engine.analysis.perturb import KINDS, perturb; "
        "text = sys.stdin.read(); "
        "print(json.dumps([perturb(text, k, 0.5, seed=3).to_json() for k in KINDS]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], input=LONG, capture_output=True, text=True, cwd=REPO, env=env, check=True
    )
    assert json.loads(out.stdout) == [perturb(LONG, k, 0.5, seed=3).to_json() for k in KINDS]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep_ends", [False, True])
def test_rate_zero_is_identity(kind: str, keep_ends: bool) -> None:
    for text in (LONG, ODD_INPUTS["mixed"], ""):
        p = perturb(text, kind, 0, seed=11, keep_ends=keep_ends)
        assert p == Perturbation(text=text, perturbed=text, edits=())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep_ends", [False, True])
def test_rate_one_edits_every_eligible_word_once(kind: str, keep_ends: bool) -> None:
    text = LONG + " " + ODD_INPUTS["mixed"] + " a I ox OK"
    p = perturb(text, kind, 1.0, seed=2, keep_ends=keep_ends)
    assert len(p.edits) == _eligible_count(text, kind, keep_ends) > 0
    spans = _word_spans(text)
    touched = [next(i for i, (s, e) in enumerate(spans) if s <= edit.position <= e) for edit in p.edits]
    assert len(set(touched)) == len(touched)


@pytest.mark.parametrize(
    ("kind", "keep_ends", "text", "expected_words"),
    [
        # "bb" has no unequal pair to swap; "a" is too short.
        ("swap", False, "a bb ab xyz", {"ab", "xyz"}),
        ("swap", True, "ab abc abcd", {"abcd"}),
        ("delete", False, "a bb", {"a", "bb"}),
        ("delete", True, "ab abc", {"abc"}),
        ("insert", True, "a ab", {"ab"}),
        ("invisible", False, "a ab", {"ab"}),
        ("substitute", False, "ok שלום 42", {"ok"}),
        ("keyboard", True, "ok fun x44", {"fun"}),
        ("homoglyph", False, "fun ox rhythm mud", {"ox", "rhythm"}),
        ("homoglyph", True, "xo fun toe", {"toe"}),
    ],
)
def test_eligibility_rules(kind: str, keep_ends: bool, text: str, expected_words: set[str]) -> None:
    p = perturb(text, kind, 1.0, keep_ends=keep_ends)
    edited = {w for start, end, w in words(text) if any(start <= e.position <= end for e in p.edits)}
    assert edited == expected_words


def test_rate_picks_rounded_share_of_eligible_words_and_at_least_one() -> None:
    text = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"  # ten words
    assert len(perturb(text, "delete", 0.3).edits) == 3
    assert len(perturb(text, "delete", 0.75).edits) == 8
    assert len(perturb(text, "delete", 0.01).edits) == 1
    assert perturb("😀 !!", "delete", 1.0).edits == ()


@pytest.mark.parametrize("kind", KINDS)
def test_apply_edits_reproduces_perturbed_and_edits_index_the_original(kind: str) -> None:
    for seed in range(25):
        for rate in (0.1, 0.5, 1.0):
            for keep_ends in (False, True):
                p = perturb(LONG, kind, rate, seed=seed, keep_ends=keep_ends)
                assert apply_edits(p.text, p.edits) == p.perturbed
                assert apply_edits(p.text, list(reversed(p.edits))) == p.perturbed
                for e in p.edits:
                    assert e.kind == kind
                    assert p.text[e.position : e.position + len(e.before)] == e.before
                    assert e.before != e.after


@pytest.mark.parametrize("kind", KINDS)
def test_keep_ends_never_touches_first_or_last_character(kind: str) -> None:
    text = LONG + " Bob xyz Hannah"
    for seed in range(15):
        p = perturb(text, kind, 1.0, seed=seed, keep_ends=True)
        assert p.edits
        for orig, new in zip(text.split(" "), p.perturbed.split(" "), strict=True):
            assert (orig[0], orig[-1]) == (new[0], new[-1])
        spans = _word_spans(text)
        for e in p.edits:
            start, end = next((s, t) for s, t in spans if s <= e.position <= t)
            assert start < e.position and e.position + len(e.before) < end


def test_swap_exchanges_two_unequal_neighbours() -> None:
    for seed in range(10):
        p = perturb(LONG, "swap", 1.0, seed=seed)
        assert sorted(p.perturbed) == sorted(p.text)
        for e in p.edits:
            assert len(e.before) == 2 and e.after == e.before[::-1] and e.before[0] != e.before[1]


def test_delete_removes_one_character_per_edit() -> None:
    p = perturb(LONG, "delete", 1.0, seed=4)
    assert len(p.perturbed) == len(p.text) - len(p.edits)
    assert all(len(e.before) == 1 and e.after == "" for e in p.edits)


def test_insert_adds_one_lowercase_letter_per_edit() -> None:
    p = perturb(LONG, "insert", 1.0, seed=4)
    assert len(p.perturbed) == len(p.text) + len(p.edits)
    assert all(e.before == "" and len(e.after) == 1 and e.after in string.ascii_lowercase for e in p.edits)


def test_substitute_keeps_case_and_changes_the_letter() -> None:
    text = "GREAT Movie really Awful THE End"
    for seed in range(20):
        for e in perturb(text, "substitute", 1.0, seed=seed).edits:
            assert e.after in string.ascii_letters and e.after.lower() != e.before.lower()
            assert e.after.isupper() == e.before.isupper()


def test_keyboard_uses_qwerty_neighbours_and_keeps_case() -> None:
    text = "GREAT Movie really Awful THE End"
    for seed in range(20):
        for e in perturb(text, "keyboard", 1.0, seed=seed).edits:
            assert e.after.lower() in KEYBOARD[e.before.lower()]
            assert e.after.isupper() == e.before.isupper()


def test_keyboard_map_is_complete_and_symmetric() -> None:
    assert set(KEYBOARD) == set(string.ascii_lowercase)
    for key, near in KEYBOARD.items():
        assert near and key not in near
        assert all(key in KEYBOARD[n] for n in near)
    assert set(KEYBOARD["s"]) == set("awedzx")
    assert set(KEYBOARD["g"]) == set("ftyhvb")


def test_homoglyph_map_points_to_cyrillic_or_greek_letters() -> None:
    assert {"a", "e", "o", "p", "c", "x", "y", "i", "A", "B", "E", "H", "K", "M", "O", "P", "T", "X"} <= set(HOMOGLYPHS)
    assert HOMOGLYPHS["a"][0] == "\u0430" and "\u03bf" in HOMOGLYPHS["o"]
    for latin, looks in HOMOGLYPHS.items():
        assert latin in string.ascii_letters
        for g in looks:
            assert len(g) == 1 and not g.isascii()
            assert unicodedata.name(g).split()[0] in ("CYRILLIC", "GREEK")


def test_homoglyph_output_contains_non_ascii_look_alikes() -> None:
    p = perturb("a nice open space", "homoglyph", 1.0, seed=1)
    assert p.text.isascii() and not p.perturbed.isascii()
    assert len(p.edits) == 4
    for e in p.edits:
        assert e.after in HOMOGLYPHS[e.before]
    assert perturb("fun mud", "homoglyph", 1.0).edits == ()


def test_invisible_inserts_zero_width_characters_inside_words() -> None:
    for seed in range(10):
        p = perturb(LONG, "invisible", 1.0, seed=seed)
        inserted = [e.after for e in p.edits]
        assert inserted and set(inserted) <= {"\u200b", "\u200d"}
        assert p.perturbed.replace("\u200b", "").replace("\u200d", "") == p.text
        assert len(p.perturbed) == len(p.text) + len(p.edits)
        spans = _word_spans(p.text)
        assert all(any(s < e.position < t for s, t in spans) for e in p.edits)
    both = {e.after for s in range(10) for e in perturb(LONG, "invisible", 1.0, seed=s).edits}
    assert both == set(INVISIBLE)


@pytest.mark.parametrize("bad", ["typo", "", "Swap", "homoglyphs"])
def test_unknown_kind_raises_with_valid_kinds_listed(bad: str) -> None:
    for call in (lambda: perturb("some text", bad, 0.5), lambda: candidate_edits("text", 0, bad)):
        with pytest.raises(PerturbError) as info:
            call()
        message = str(info.value)
        assert repr(bad) in message
        assert all(k in message for k in KINDS)


@pytest.mark.parametrize("rate", [-0.01, 1.01, 5, float("nan"), float("inf"), "half", None])
def test_rate_outside_unit_interval_raises(rate: object) -> None:
    with pytest.raises(PerturbError, match="rate must be"):
        perturb("some text", "swap", rate)  # type: ignore[arg-type]


def test_perturb_error_is_a_value_error() -> None:
    assert issubclass(PerturbError, ValueError)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(ODD_INPUTS))
def test_odd_inputs_do_not_break_anything(kind: str, name: str) -> None:
    text = ODD_INPUTS[name]
    for rate, keep_ends in ((1.0, False), (0.5, True)):
        p = perturb(text, kind, rate, seed=5, keep_ends=keep_ends)
        assert apply_edits(text, p.edits) == p.perturbed
        assert highlight_html(p).count("<mark ") == len(p.edits)
        json.dumps(p.to_json())
    for start, _, w in words(text)[:50]:
        for e in candidate_edits(w, start, kind):
            apply_edits(text, [e])


@pytest.mark.parametrize("kind", ["substitute", "keyboard", "homoglyph"])
def test_latin_only_kinds_find_nothing_in_other_scripts(kind: str) -> None:
    for name in ("arabic", "hebrew", "emoji"):
        assert perturb(ODD_INPUTS[name], kind, 1.0).edits == ()


@pytest.mark.parametrize("kind", ["swap", "delete", "insert", "invisible"])
def test_script_agnostic_kinds_edit_right_to_left_words(kind: str) -> None:
    for name in ("arabic", "hebrew"):
        p = perturb(ODD_INPUTS[name], kind, 1.0)
        assert len(p.edits) == len(words(ODD_INPUTS[name]))


@pytest.mark.parametrize("kind", KINDS)
def test_candidate_edits_are_single_applicable_edits_at_the_offset(kind: str) -> None:
    text = "I found it wonderful, honestly."
    start, end, word = words(text)[3]
    cands = candidate_edits(word, start, kind, seed=1)
    assert 0 < len(cands) <= MAX_CANDIDATES
    assert cands == candidate_edits(word, start, kind, seed=1)
    assert [e.position for e in cands] == sorted(e.position for e in cands)
    for e in cands:
        assert e.kind == kind and start <= e.position <= end
        changed = apply_edits(text, [e])
        assert changed != text
        assert changed[:start] == text[:start] and changed[len(changed) - (len(text) - end) :] == text[end:]


def test_candidate_edits_lists_every_site_of_a_short_word() -> None:
    assert candidate_edits("abc", 10, "swap") == [Edit(kind="swap", position=10, before="ab", after="ba"),
                                                  Edit(kind="swap", position=11, before="bc", after="cb")]
    assert [e.position for e in candidate_edits("abcd", 0, "delete", keep_ends=True)] == [1, 2]
    assert candidate_edits("ab", 0, "delete", keep_ends=True) == []


def test_candidate_edits_samples_a_long_word_deterministically() -> None:
    word = "x" * 5000
    cands = candidate_edits(word, 3, "homoglyph", seed=9)
    assert len(cands) == MAX_CANDIDATES == len({e.position for e in cands})
    assert cands == candidate_edits(word, 3, "homoglyph", seed=9)
    assert cands != candidate_edits(word, 3, "homoglyph", seed=10)


def test_apply_edits_rejects_edits_that_do_not_fit() -> None:
    text = "good film"
    with pytest.raises(PerturbError):
        apply_edits(text, [Edit(kind="substitute", position=0, before="x", after="y")])
    with pytest.raises(PerturbError):
        apply_edits(text, [Edit(kind="swap", position=0, before="go", after="og"),
                           Edit(kind="swap", position=1, before="oo", after="oo")])
    with pytest.raises(PerturbError):
        apply_edits(text, [Edit(kind="insert", position=len(text) + 1, before="", after="s")])
    with pytest.raises(PerturbError):
        apply_edits(text, [Edit(kind="insert", position=-1, before="", after="s")])


def test_apply_edits_puts_an_insertion_before_a_replacement_at_the_same_position() -> None:
    edits = [Edit(kind="substitute", position=0, before="g", after="h"),
             Edit(kind="insert", position=0, before="", after="x"),
             Edit(kind="insert", position=4, before="", after="s")]
    assert apply_edits("good film", edits) == "xhoods film"


def test_to_json_has_the_cli_field_names() -> None:
    p = perturb("good film", "delete", 1.0, seed=0)
    d = p.to_json()
    assert list(d) == ["text", "perturbed", "edits"]
    assert d["text"] == "good film" and d["perturbed"] == p.perturbed
    fields = [{"kind": e.kind, "position": e.position, "before": e.before, "after": e.after} for e in p.edits]
    assert d["edits"] == fields and all(list(e) == ["kind", "position", "before", "after"] for e in d["edits"])
    assert json.loads(json.dumps(d, ensure_ascii=False)) == d


@pytest.mark.parametrize("kind", KINDS)
def test_from_json_reads_to_json_back(kind: str) -> None:
    p = perturb('A "great" film, naïve and warm', kind, 0.6, seed=4)
    assert p.edits
    assert Perturbation.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert [Edit.from_json(e.to_json()) for e in p.edits] == list(p.edits)
    assert Perturbation(text=p.text, perturbed=p.perturbed, edits=list(p.edits)) == p  # edits kept as a tuple


@pytest.mark.parametrize("kind", KINDS)
def test_highlight_html_escapes_input_and_marks_every_edit(kind: str) -> None:
    p = perturb('<b>great</b> & "awful" film <script>x</script>', kind, 1.0, seed=3)
    out = highlight_html(p)
    assert "<b>" not in out and "<script>" not in out
    assert "&lt;" in out and "&gt;" in out and "&amp;" in out
    assert out.count("<mark ") == out.count("</mark>") == len(p.edits) > 0
    assert f'title="{kind}: ' in out


def test_highlight_html_without_edits_is_the_escaped_text() -> None:
    text = "<i>fine</i> & dandy"
    assert highlight_html(perturb(text, "swap", 0)) == "&lt;i&gt;fine&lt;/i&gt; &amp; dandy"


def test_highlight_html_shows_deletions_struck_through() -> None:
    p = Perturbation(text="good film", perturbed="god film",
                     edits=(Edit(kind="delete", position=1, before="o", after=""),))
    assert highlight_html(p) == "g<mark title=\"delete: &#x27;o&#x27;→&#x27;&#x27;\"><del>o</del></mark>od film"


def test_highlight_html_labels_invisible_characters() -> None:
    p = perturb("wonderful movie", "invisible", 1.0, seed=0)
    out = highlight_html(p)
    assert "\u200b" not in out and "\u200d" not in out
    labels = out.count("\u27e8ZWSP\u27e9") + out.count("\u27e8ZWJ\u27e9")
    assert labels == 2 * len(p.edits)  # once in the title, once in the mark


def test_highlight_html_escapes_edit_text_in_the_title_and_body() -> None:
    p = Perturbation(text='say "hi"', perturbed='say <&hi"',
                     edits=(Edit(kind="insert", position=4, before="", after="<"),
                            Edit(kind="substitute", position=4, before='"', after="&")))
    out = highlight_html(p)
    assert out.count('"') == 4  # only the two title attributes' delimiters
    assert out.count("<mark ") == 2 and "&lt;</mark>" in out and "&amp;</mark>" in out
    assert "&#x27;&quot;&#x27;" in out and out.endswith("hi&quot;")


def test_highlight_html_names_homoglyph_code_points() -> None:
    p = Perturbation(text="a", perturbed="\u0430",
                     edits=(Edit(kind="homoglyph", position=0, before="a", after="\u0430"),))
    assert "(U+0430)" in highlight_html(p)
