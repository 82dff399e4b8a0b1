"""The one memoization layer: results of expensive engine calls, on disk, shared by every session,
the CLI and the grid. Every key is built in `cache.keys`, so a sweep run from the CLI and the same
sweep on a page share rows.

Keys hash the engine version with everything that determines a result (model fingerprint, dataset
fingerprint, plan key, kernels, device, the function and its arguments), so a changed weight file or
dataset is never served a stale result. The store is size-bounded, and a corrupt or locked store is
set aside and rebuilt with a warning rather than crashing a page.

Crash consistency: every value is stored as one blob, a checksum followed by its pickle, in one diskcache
transaction (a value over 32 KB is a file written before the row that names it is committed), so a process
killed while writing leaves the entry whole or absent. An entry that fails its checksum or cannot be unpickled
(a truncated or damaged file) is dropped with a warning and recomputed, never returned. A full disk costs one
warning and the writes for a minute (then they are tried again); what is stored stays, and `problem()` gives the
line to show.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import diskcache

from engine.core.settings import settings
from engine.evaluation.evaluator import ENGINE_VERSION

T = TypeVar("T")
SIZE_LIMIT = 2 * 1024**3
MISSING = object()
MAGIC = b"QLC1"  # then a 16-byte blake2b digest of the pickle, then the pickle
RETRY_WRITES_S = 60.0
log = logging.getLogger(__name__)
_lock = threading.Lock()
_stores: dict[str, diskcache.Cache] = {}
_write_problem: dict[str, object] = {"line": None, "since": 0.0}


def cache_dir() -> Path:
    """ENGINE_CACHE_DIR (or the config file's cache_dir) when set, else a folder under the user's cache directory."""
    configured = settings().cache_dir
    if configured is not None:
        return configured
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quant-dashboard"


def _disk_full(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error))


class _Disk(diskcache.Disk):
    """diskcache's files, less the half-written one a failed write (a full disk) would leave behind unnamed."""

    def _write(self, full_path, iterator, mode, encoding=None):
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except FileExistsError:
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise


def _cache(path: Path) -> diskcache.Cache:
    return diskcache.Cache(str(path), size_limit=SIZE_LIMIT, timeout=5, disk=_Disk)


def _open(path: Path) -> diskcache.Cache:
    try:
        return _cache(path)
    except Exception as error:  # a corrupt or unreadable store: keep it for inspection, start afresh
        if _disk_full(error) or isinstance(error, PermissionError):
            raise  # the store is fine; the disk is not: run without it, keep it for later
        aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
        log.warning("cache at %s is unusable (%s); moved it to %s and started a new one", path, error, aside)
        shutil.move(str(path), str(aside))
        return _cache(path)


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


def seal(value) -> bytes:
    """The stored form of a value: MAGIC, the pickle's digest, the pickle."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + hashlib.blake2b(payload, digest_size=16).digest() + payload


class Corrupt(Exception):
    """A stored entry that is not what was written."""


def unseal(blob):
    """The value a stored blob holds; raises Corrupt when its checksum or pickle does not hold."""
    if not isinstance(blob, bytes) or not blob.startswith(MAGIC):
        return blob  # written before checksums (diskcache unpickled it already)
    digest, payload = blob[len(MAGIC):len(MAGIC) + 16], blob[len(MAGIC) + 16:]
    if hashlib.blake2b(payload, digest_size=16).digest() != digest:
        raise Corrupt("checksum mismatch (truncated or damaged)")
    try:
        return pickle.loads(payload)
    except Exception as error:  # the pickle names a class that no longer loads
        raise Corrupt(f"cannot unpickle: {error}") from None


def _drop(key: str, why: object) -> None:
    log.warning("cache entry %s is corrupt (%s); dropped it, recomputing", key, why)
    try:
        store().delete(key)
    except Exception as error:
        log.warning("could not drop the corrupt cache entry %s (%s)", key, error)


def lookup(key: str, default=None):
    """The stored value, or `default` (also when the entry is corrupt, which is dropped, or when the store
    cannot be read: the caller recomputes)."""
    try:
        blob = store().get(key, default=MISSING)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as error:
        _drop(key, f"{type(error).__name__}: {error}")  # an unsealed entry whose pickle does not load
        return default
    except Exception as error:
        log.warning("cache read failed (%s); recomputing", error)
        return default
    if blob is MISSING:
        return default
    try:
        return unseal(blob)
    except Corrupt as error:
        _drop(key, error)
        return default


def problem() -> str | None:
    """The one line to show while the cache cannot be written (a full disk), else None."""
    return _write_problem["line"]  # type: ignore[return-value]


def put(key: str, value) -> None:
    """Store `value`; a failing store costs only recomputation later. After a full disk, writes pause for a
    minute and the problem is said once."""
    if _write_problem["line"] and time.monotonic() - float(_write_problem["since"]) < RETRY_WRITES_S:
        return
    try:
        store().set(key, seal(value))
    except Exception as error:
        if _disk_full(error):
            if not _write_problem["line"]:
                log.warning("cache write failed: the disk is full at %s; results are not stored for now", cache_dir())
                _write_problem["line"] = (f"The cache's disk is full ({cache_dir()}): results are computed but not "
                                          "stored; what was stored before stays.")
            _write_problem["since"] = time.monotonic()
        else:
            log.warning("cache write failed (%s); result not stored", error)
        return
    if _write_problem["line"]:
        log.warning("cache writes work again at %s", cache_dir())
        _write_problem["line"] = None


def remember(key: str, compute: Callable[[], T]) -> T:
    """compute() once per key (from `cache.keys`) across sessions and restarts; a stored None is an answer."""
    found = lookup(key, MISSING)
    if found is not MISSING:
        return found
    value = compute()
    put(key, value)
    return value
