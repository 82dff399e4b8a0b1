"""Evaluation sets: the vendored sentiment collections, the hub's SST-2, and a user's CSV.

Every set is an `EvalSet`: texts, their labels as the source writes them (class names or integer
ids, mapped onto a model's classes by `engine.core.labels`), a calibration pool that never overlaps
the evaluated rows, and a fingerprint for cache keys. The embedded Rotten Tomatoes split is computed
from a hash of each row's id, so it is the same on every machine and with every library version;
its calibration pool is the train split. Sets without a train split (the other vendored sets, a
CSV) hold out a seeded sample of their rows for calibration and evaluate the rest.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from engine.core.errors import EngineError
from engine.data.hub import hub_reachable
from engine.core.memo import memo
from engine.core.settings import settings, where

DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data"
SPLIT_SEED = "rt-split-v1"
HOLDOUT_SEED = "calibration-holdout-v1"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test
HOLDOUT_FRACTION, HOLDOUT_MAX = 0.1, 256
CSV_MAX_BYTES, CSV_MAX_ROWS = 20 * 1024**2, 100_000  # ENGINE_MAX_CSV_BYTES, ENGINE_MAX_CSV_ROWS


class DataError(EngineError):
    """A dataset name, file or column that cannot be used; the message says which."""


@dataclass(frozen=True)
class EvalSet:
    """Labelled texts to evaluate, and the texts calibration may use (never any of the evaluated rows)."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[object, ...]
    description: str = ""
    calibration: tuple[str, ...] = ()
    calibration_source: str = ""
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        if not self.fingerprint:
            digest = hashlib.sha256()
            for text, label in zip(self.texts, self.labels):
                digest.update(f"{label}\t{text}\n".encode("utf-8", "surrogatepass"))
            digest.update(b"\x00calibration\x00")
            for text in self.calibration:
                digest.update(f"{text}\n".encode("utf-8", "surrogatepass"))
            object.__setattr__(self, "fingerprint", digest.hexdigest()[:16])

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, limit: int | None) -> "EvalSet":
        """The first `limit` evaluated rows (all of them when limit is None); the calibration pool stays."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        return EvalSet(f"{self.name}[:{limit}]", self.texts[:limit], self.labels[:limit], self.description,
                       self.calibration, self.calibration_source)


def _rank(seed: str, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8", "surrogatepass")).hexdigest()


def with_holdout(name: str, texts: tuple[str, ...], labels: tuple[object, ...], description: str) -> EvalSet:
    """The set with a seeded tenth of its distinct texts (at most 256) held out for calibration and every row
    carrying them left out of the evaluation, so no calibration sentence is ever evaluated."""
    distinct = list(dict.fromkeys(texts))
    count = min(HOLDOUT_MAX, int(len(distinct) * HOLDOUT_FRACTION)) if len(distinct) >= 2 else 0
    held = sorted(distinct, key=lambda text: _rank(HOLDOUT_SEED, text))[:count]
    chosen = set(held)
    kept = [i for i in range(len(texts)) if texts[i] not in chosen]
    return EvalSet(name, tuple(texts[i] for i in kept), tuple(labels[i] for i in kept), description,
                   tuple(text for text in distinct if text in chosen),
                   f"{count} sentences of {name} held out of the evaluation" if count else "")


# name -> (vendored file, description)
VENDORED = {
    "embedded": ("movieReviewSnippets_GroundTruth.txt.gz", "Rotten Tomatoes sentences, test split"),
    "amazon": ("amazonReviewSnippets_GroundTruth.txt.gz", "Amazon product review sentences (out of domain)"),
    "tweets": ("tweets_GroundTruth.txt.gz", "Tweets (out of domain)"),
    "nyt": ("nytEditorialSnippets_GroundTruth.txt.gz", "New York Times editorial sentences (out of domain)"),
}
HUB_SETS = {"sst2": "SST-2 validation from the HuggingFace Hub (glue/sst2)"}


@lru_cache(maxsize=None)
def _read_rated(filename: str) -> tuple[tuple[str, str, str], ...]:
    """Rows (id, label name, text) of one vendored file, rows rated exactly 0 dropped."""
    rows = []
    with gzip.open(DATA_DIR / filename, "rt", encoding="utf-8", newline="") as handle:
        for line in handle:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3:
                continue
            row_id, rating, text = parts[0], float(parts[1]), "\t".join(parts[2:]).strip()
            if rating == 0 or not text:
                continue
            rows.append((row_id, "positive" if rating > 0 else "negative", text))
    return tuple(rows)


memo("core.vendored_rows", _read_rated)


def _split_of(rank: int, count: int) -> str:
    train_end = round(SPLIT_FRACTIONS[0] * count)
    val_end = train_end + round(SPLIT_FRACTIONS[1] * count)
    return "train" if rank < train_end else "validation" if rank < val_end else "test"


@lru_cache(maxsize=None)
def rotten_tomatoes_split() -> dict[str, tuple[tuple[str, str], ...]]:
    """The fixed stratified 80/10/10 split: within each label, rows ordered by sha256(seed:id)."""
    rows = _read_rated(VENDORED["embedded"][0])
    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "validation": [], "test": []}
    for label in ("negative", "positive"):
        members = sorted((row for row in rows if row[1] == label), key=lambda row: _rank(SPLIT_SEED, row[0]))
        for rank, (row_id, name, text) in enumerate(members):
            splits[_split_of(rank, len(members))].append((row_id, text, name))
    # Back to file order so batches mix both labels.
    return {name: tuple((text, lab) for _, text, lab in sorted(part, key=lambda r: int(r[0])))
            for name, part in splits.items()}


memo("core.rt_split", rotten_tomatoes_split)


def rt_split(split: str) -> EvalSet:
    """One split ('train', 'validation' or 'test') of the vendored Rotten Tomatoes sentences; calibration
    draws from the train split."""
    parts = rotten_tomatoes_split()
    if split not in parts:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(parts)}")
    texts, labels = zip(*parts[split])
    name = "embedded" if split == "test" else f"embedded-{split}"
    train = tuple(text for text, _ in parts["train"]) if split != "train" else ()
    return EvalSet(name, tuple(texts), tuple(labels), f"Rotten Tomatoes sentences, {split} split", train,
                   "the Rotten Tomatoes train split" if train else "")


def _vendored(name: str) -> EvalSet:
    filename, description = VENDORED[name]
    rows = _read_rated(filename)
    return with_holdout(name, tuple(r[2] for r in rows), tuple(r[1] for r in rows), description)


def load_csv(path: str | Path, raw: bytes | None = None) -> EvalSet:
    """A user's CSV with columns `text,label` (label: a class name of the model, or an integer id), within the
    project's size and row limits (ENGINE_MAX_CSV_BYTES, ENGINE_MAX_CSV_ROWS): over them, one line and nothing
    is kept."""
    configured = settings()
    max_bytes = configured.max_csv_bytes or CSV_MAX_BYTES
    max_rows = configured.max_csv_rows or CSV_MAX_ROWS
    try:
        size = len(raw) if raw is not None else Path(path).stat().st_size
        if size > max_bytes:
            raise DataError(f"CSV {Path(path).name} is {size / 1024**2:.1f} MiB, over this server's limit of "
                            f"{max_bytes / 1024**2:.1f} MiB ({_limit_source('max_csv_bytes')})")
        content = raw if raw is not None else Path(path).read_bytes()
        reader = csv.DictReader(io.StringIO(content.decode("utf-8-sig")))
        fields = [f.strip().lower() for f in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read CSV {path}: {error}") from None
    if "text" not in fields or "label" not in fields:
        raise DataError(f"CSV {path} needs the columns text,label; it has {','.join(fields) or 'none'}")
    texts, labels = [], []
    try:
        for line, row in enumerate(reader, start=2):
            if len(texts) >= max_rows:
                raise DataError(f"CSV {Path(path).name} has more than {max_rows:,} rows, this server's limit "
                                f"({_limit_source('max_csv_rows')})")
            row = {k.strip().lower(): (v or "") for k, v in row.items() if k}
            if not row["label"].strip():
                raise DataError(f"CSV {path}, line {line}: the label is empty")
            texts.append(row["text"])
            labels.append(row["label"].strip())
    except csv.Error as error:
        raise DataError(f"cannot read CSV {path}: {error}") from None
    if not texts:
        raise DataError(f"CSV {path} has no rows")
    return with_holdout(Path(path).name, tuple(texts), tuple(labels), f"user CSV {path}")


def _limit_source(name: str) -> str:
    return where(name) if getattr(settings(), name) else f"the default; ENGINE_{name.upper()} sets it"


def _sst2() -> EvalSet:
    import datasets  # only for the hub's set: a heavy import nothing else needs

    validation = datasets.load_dataset("glue", "sst2", split="validation")
    train = datasets.load_dataset("glue", "sst2", split="train")
    names = ("negative", "positive")
    return EvalSet("sst2", tuple(validation["sentence"]), tuple(names[int(x)] for x in validation["label"]),
                   HUB_SETS["sst2"], tuple(train["sentence"][:4096]), "the SST-2 train split")


def available_sets() -> dict[str, str]:
    """Registered set names and what they are."""
    return {name: desc for name, (_, desc) in VENDORED.items()} | HUB_SETS


def load_dataset(name: str = "embedded") -> EvalSet:
    """A registered set by name, or a path to a CSV file (re-read on every call: the file may change)."""
    if name.lower().endswith(".csv"):
        if not Path(name).is_file():
            raise DataError(f"no CSV file at {name}")
        return load_csv(name)
    if name in HUB_SETS:
        if not hub_reachable():
            raise DataError(f"the HuggingFace Hub is unreachable, so {name} cannot be downloaded")
        return _hub_set(name)
    return _registered(name)


@lru_cache(maxsize=2)
def _hub_set(name: str) -> EvalSet:
    return _sst2()


memo("core.hub_sets", _hub_set)


@lru_cache(maxsize=16)
def _registered(name: str) -> EvalSet:
    if name == "embedded":
        return rt_split("test")
    if name in ("embedded-train", "embedded-validation"):
        return rt_split(name.split("-", 1)[1])
    if name in VENDORED:
        return _vendored(name)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(available_sets())} or a .csv path")


memo("core.registered_sets", _registered)
