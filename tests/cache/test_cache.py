"""The disk memoization layer: compute once, distinct keys, ENGINE_CACHE_DIR, corrupt stores rebuilt with a warning."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "engine-cache"
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(folder))
    return folder


def memo(namespace, compute, **parts):
    return cache.remember(cache.make_key(namespace, **parts), compute)


class Counter:
    def __init__(self, value):
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return self.value


def test_memo_computes_once_and_reuses(cache_dir):
    compute = Counter({"accuracy": 0.86, "logits": np.arange(6.0).reshape(3, 2)})
    first = memo("eval", compute, model="m1", plan="int8")
    second = memo("eval", compute, model="m1", plan="int8")
    assert compute.calls == 1
    assert second["accuracy"] == first["accuracy"] == 0.86
    assert np.array_equal(second["logits"], first["logits"])


def test_different_key_parts_are_different_entries(cache_dir):
    values = {}
    for parts in ({"model": "m1", "plan": "int8"}, {"model": "m1", "plan": "int4"}, {"model": "m2", "plan": "int8"},
                  {"model": "m1", "plan": "int8", "device": "cuda"}):
        compute = Counter(repr(parts))
        values[repr(parts)] = memo("eval", compute, **parts)
        assert compute.calls == 1, parts
    assert len(set(values.values())) == 4
    other_namespace = Counter("bench")
    assert memo("bench", other_namespace, model="m1", plan="int8") == "bench"
    assert other_namespace.calls == 1


def test_make_key_is_stable_and_order_free():
    first = cache.make_key("eval", model="m", plan="p", kernels="real")
    assert first == cache.make_key("eval", kernels="real", plan="p", model="m")
    assert first != cache.make_key("eval", model="m", plan="p", kernels="simulated")
    assert first.startswith("eval:")


def test_engine_cache_dir_is_honoured(cache_dir, monkeypatch, tmp_path):
    assert cache.cache_dir() == cache_dir
    memo("probe", Counter(1), x=1)
    assert cache_dir.is_dir() and any(cache_dir.iterdir())
    other = tmp_path / "other"
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(other))
    compute = Counter(2)
    assert memo("probe", compute, x=1) == 2  # a fresh folder is a cold cache
    assert compute.calls == 1 and other.is_dir()
    monkeypatch.delenv("ENGINE_CACHE_DIR")
    assert cache.cache_dir() != other


def test_corrupt_store_is_rebuilt_with_a_warning(cache_dir, caplog):
    cache_dir.mkdir()
    (cache_dir / "cache.db").write_bytes(b"this is not a sqlite database " * 100)
    compute = Counter("fresh")
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert memo("eval", compute, model="m") == "fresh"
    assert any("unusable" in record.getMessage() for record in caplog.records)
    assert memo("eval", compute, model="m") == "fresh"
    assert compute.calls == 1  # the rebuilt store works
    assert list(cache_dir.parent.glob("engine-cache.broken-*"))  # the broken one is kept aside


def test_failing_reads_and_writes_cost_only_recomputation(cache_dir, monkeypatch, caplog):
    """A store that breaks while open (disk full, locked, corrupted under us): warn, recompute, never raise."""
    import sqlite3

    import diskcache

    memo("eval", Counter("stored"), model="m")

    def broken(*_args, **_kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(diskcache.Cache, "get", broken)
    monkeypatch.setattr(diskcache.Cache, "set", broken)
    compute = Counter("recomputed")
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert memo("eval", compute, model="m") == "recomputed"
    assert compute.calls == 1
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "read failed" in messages and "write failed" in messages


def test_unusable_cache_dir_does_not_crash(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(blocker))
    compute = Counter(42)
    with caplog.at_level(logging.WARNING, logger="cache"):
        assert memo("eval", compute, model="m") == 42
        assert memo("eval", compute, model="m") == 42
    assert compute.calls == 2
    assert any("cache" in record.getMessage() for record in caplog.records)


def test_a_stored_none_is_an_answer(cache_dir):
    compute = Counter(None)
    assert memo("nothing", compute, x=1) is None
    assert memo("nothing", compute, x=1) is None
    assert compute.calls == 1
