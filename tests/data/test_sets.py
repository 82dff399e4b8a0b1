"""Evaluation sets: the fixed stratified split, the out-of-domain sets, user CSVs and their errors."""
from __future__ import annotations

import gzip
from collections import Counter

import pytest

from engine.data import sets as data
from engine.data.sets import DataError, load_csv, load_dataset, rt_split

SPLITS = ("train", "validation", "test")


def _raw_rows(filename: str) -> list[tuple[str, float, str]]:
    """The vendored file read independently of engine.data: (id, rating, text) of every row."""
    rows = []
    with gzip.open(data.DATA_DIR / filename, "rt", encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) >= 3:
                rows.append((parts[0], float(parts[1]), "\t".join(parts[2:]).strip()))
    return rows


def test_split_sizes_are_stratified_and_cover_every_rated_row():
    rated = [row for row in _raw_rows(data.VENDORED["embedded"][0]) if row[1] != 0 and row[2]]
    per_label = Counter("positive" if rating > 0 else "negative" for _, rating, _ in rated)
    parts = {split: rt_split(split) for split in SPLITS}
    assert sum(len(part) for part in parts.values()) == len(rated)
    for label, total in per_label.items():
        train = round(0.8 * total)
        validation = round(0.1 * total)
        expected = {"train": train, "validation": validation, "test": total - train - validation}
        for split in SPLITS:
            assert Counter(parts[split].labels)[label] == expected[split], (split, label)
    # stratified: each split's share of positives is the whole set's, to rounding
    share = per_label["positive"] / len(rated)
    for part in parts.values():
        assert abs(part.labels.count("positive") / len(part) - share) < 2 / len(part)


def test_split_is_deterministic_and_disjoint():
    first = {split: rt_split(split) for split in SPLITS}
    data.rotten_tomatoes_split.cache_clear()
    data._read_rated.cache_clear()
    second = {split: rt_split(split) for split in SPLITS}
    for split in SPLITS:
        assert first[split].texts == second[split].texts
        assert first[split].labels == second[split].labels
        assert first[split].fingerprint == second[split].fingerprint
    texts = {split: set(first[split].texts) for split in SPLITS}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]


def test_embedded_is_the_test_split_with_at_least_1000_rows():
    embedded = load_dataset("embedded")
    assert len(embedded) >= 1000
    assert embedded.texts == rt_split("test").texts
    assert set(embedded.labels) == {"negative", "positive"}
    # calibration draws on the train split, never on the evaluated rows
    assert embedded.calibration == rt_split("train").texts and not set(embedded.calibration) & set(embedded.texts)
    assert load_dataset("embedded-validation").texts == rt_split("validation").texts
    assert load_dataset("embedded-train").texts == rt_split("train").texts


@pytest.mark.parametrize("name", ["amazon", "tweets", "nyt"])
def test_out_of_domain_sets_drop_zero_rated_rows(name):
    raw = _raw_rows(data.VENDORED[name][0])
    kept = [(text, "positive" if rating > 0 else "negative") for _, rating, text in raw if rating != 0 and text]
    assert len(kept) < len(raw) or all(rating != 0 for _, rating, _ in raw)
    loaded = load_dataset(name)
    # a seeded tenth (at most 256 rows) is held out for calibration; the rest is evaluated, in file order
    held = min(data.HOLDOUT_MAX, int(len({text for text, _ in kept}) * data.HOLDOUT_FRACTION))
    assert len(loaded.calibration) == held and len(loaded) >= len(kept) - 2 * held and len(loaded) > 1000
    evaluated = list(zip(loaded.texts, loaded.labels))
    assert evaluated == [row for row in kept if row in evaluated]
    assert not set(loaded.calibration) & set(loaded.texts)
    assert set(loaded.calibration) | set(loaded.texts) == {text for text, _ in kept}
    assert loaded.fingerprint != load_dataset("embedded").fingerprint
    assert load_dataset(name).calibration == loaded.calibration  # the same rows every time


def test_head_limits_and_rejects_nonpositive():
    embedded = load_dataset("embedded")
    head = embedded.head(10)
    assert len(head) == 10 and head.texts == embedded.texts[:10]
    assert head.calibration == embedded.calibration
    assert embedded.head(None) is embedded
    assert embedded.head(len(embedded) + 5) is embedded
    with pytest.raises(DataError, match="at least 1"):
        embedded.head(0)


def test_good_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"great, really",positive\nawful,0\nfine film,1\nmeh,NEG\n', encoding="utf-8")
    loaded = load_dataset(str(path))
    # labels stay as written (the model's classes decide what they mean); 4 rows hold none out
    assert loaded.texts == ("great, really", "awful", "fine film", "meh")
    assert loaded.labels == ("positive", "0", "1", "NEG")
    assert loaded.name == "reviews.csv" and loaded.calibration == ()
    # same content from bytes (an upload) gives the same fingerprint
    assert load_csv("upload.csv", raw=path.read_bytes()).fingerprint == loaded.fingerprint


def test_csv_header_case_and_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffText,Label\nhello,1\n".encode("utf-8"))
    assert load_csv(path).labels == ("1",)


def test_csv_reloads_after_the_file_changes(tmp_path):
    path = tmp_path / "edited.csv"
    path.write_text("text,label\nfirst,1\n")
    assert load_dataset(str(path)).texts == ("first",)
    path.write_text("text,label\nsecond,0\nthird,1\n")
    assert load_dataset(str(path)).texts == ("second", "third")


def test_csv_missing_columns(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("sentence,label\nhello,1\n")
    with pytest.raises(DataError, match="needs the columns text,label; it has sentence,label"):
        load_dataset(str(path))


def test_csv_empty_label_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nok,1\nhmm,\n")
    with pytest.raises(DataError, match=r"line 3: the label is empty"):
        load_dataset(str(path))


def test_a_large_csv_holds_out_calibration_rows(tmp_path):
    path = tmp_path / "many.csv"
    path.write_text("text,label\n" + "".join(f"review {i},{i % 3}\n" for i in range(500)))
    loaded = load_dataset(str(path))
    assert len(loaded.calibration) == 50 and len(loaded) == 450
    assert not set(loaded.calibration) & set(loaded.texts)
    assert "held out" in loaded.calibration_source


def test_csv_empty(tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="has no rows"):
        load_dataset(str(header_only))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="it has none"):
        load_dataset(str(empty))


def test_csv_not_utf8_and_missing_file(tmp_path):
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"text,label\n\xff\xfe\xfa,1\n")
    with pytest.raises(DataError, match="cannot read CSV"):
        load_dataset(str(binary))
    with pytest.raises(DataError, match="no CSV file at"):
        load_dataset(str(tmp_path / "absent.csv"))


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DataError) as error:
        load_dataset("imdb")
    message = str(error.value)
    assert "'imdb'" in message
    for name in ("embedded", "amazon", "tweets", "nyt", "sst2"):
        assert name in message
    with pytest.raises(DataError, match="unknown split"):
        rt_split("dev")


def test_sst2_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="unreachable"):
        load_dataset("sst2")
