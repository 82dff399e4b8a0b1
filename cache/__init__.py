"""The one memoization layer: results of expensive engine calls, on disk, shared by every session,
the CLI and the grid. Every key is built in `cache.keys`, so a sweep run from the CLI and the same
sweep on a page share rows.

Keys hash the engine version with everything that determines a result (model fingerprint, dataset
fingerprint, plan key, kernels, device, the function and its arguments), so a changed weight file or
dataset is never served a stale result. The store is size-bounded, and a corrupt or locked store is
set aside and rebuilt with a warning rather than crashing a page.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import diskcache

from engine.evaluation.evaluator import ENGINE_VERSION

T = TypeVar("T")
SIZE_LIMIT = 2 * 1024**3
MISSING = object()
log = logging.getLogger(__name__)
_lock = threading.Lock()
_stores: dict[str, diskcache.Cache] = {}


def cache_dir() -> Path:
    """ENGINE_CACHE_DIR when set, else a folder under the user's cache directory."""
    configured = os.environ.get("ENGINE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quant-dashboard"


def _open(path: Path) -> diskcache.Cache:
    try:
        return diskcache.Cache(str(path), size_limit=SIZE_LIMIT, timeout=5)
    except Exception as error:  # a corrupt or unreadable store: keep it for inspection, start afresh
        aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
        log.warning("cache at %s is unusable (%s); moved it to %s and started a new one", path, error, aside)
        shutil.move(str(path), str(aside))
        return diskcache.Cache(str(path), size_limit=SIZE_LIMIT, timeout=5)


def store() -> diskcache.Cache:
    path = cache_dir()
    with _lock:
        if str(path) not in _stores:
            path.mkdir(parents=True, exist_ok=True)
            _stores[str(path)] = _open(path)
        return _stores[str(path)]


def make_key(namespace: str, **parts) -> str:
    """A stable key for `namespace` and the JSON-serialisable parts that determine the result."""
    text = json.dumps({"engine": ENGINE_VERSION, "ns": namespace, **parts}, sort_keys=True, default=str)
    return f"{namespace}:{hashlib.sha256(text.encode()).hexdigest()}"


def lookup(key: str, default=None):
    """The stored value, or `default` (also when the store cannot be read: the caller recomputes)."""
    try:
        return store().get(key, default=default)
    except Exception as error:
        log.warning("cache read failed (%s); recomputing", error)
        return default


def put(key: str, value) -> None:
    """Store `value`; a failing store costs only recomputation later."""
    try:
        store().set(key, value)
    except Exception as error:
        log.warning("cache write failed (%s); result not stored", error)


def remember(key: str, compute: Callable[[], T]) -> T:
    """compute() once per key (from `cache.keys`) across sessions and restarts; a stored None is an answer."""
    found = lookup(key, MISSING)
    if found is not MISSING:
        return found
    value = compute()
    put(key, value)
    return value
