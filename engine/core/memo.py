"""One registry of this process's in-process memos, so that they can be seen and dropped together.

Every module that keeps results in memory registers its cache here under a dotted name: `memoized` wraps a
function with `cachetools.cached` over a registered cache, `memo` registers a cache the module fills itself
(a cachetools cache or a dict, with the lock its users take) or a function cached by `functools`.
`clear_all()` empties every one (a test that wants a cold process, a server dropping what it holds), and
`registered()` says what each holds, for a diagnostics view.
"""
from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Callable, TypeVar

from cachetools import cached
from cachetools.keys import hashkey

Cache = TypeVar("Cache")
_registry: dict[str, tuple[object, object]] = {}  # name -> (the cache, the lock its users hold, or None)
_lock = threading.Lock()


def memo(name: str, cache: Cache, lock=None) -> Cache:
    """Register `cache` (a cachetools cache, a dict, or a `functools.cache`/`lru_cache` function) under `name`
    and return it. `lock` is the lock its users take around it, taken too while it is cleared. A name
    registered again (its module imported afresh) names the newer cache."""
    with _lock:
        _registry[name] = (cache, lock)
    return cache


def memoized(name: str, cache, key: Callable = hashkey) -> Callable[[Callable], Callable]:
    """A decorator: the function's results kept in `cache` (registered under `name`), behind one lock."""
    lock = threading.Lock()
    memo(name, cache, lock)
    return cached(cache, key=key, lock=lock)


def _sizes(cache) -> tuple[int, int | None]:
    if hasattr(cache, "cache_info"):
        info = cache.cache_info()
        return info.currsize, info.maxsize
    if hasattr(cache, "currsize"):
        return int(cache.currsize), int(cache.maxsize)
    return len(cache), None


def registered() -> dict[str, tuple[int, int | None]]:
    """Each memo's (current size, maximum size): entries, or bytes for a cache sized in bytes; None: unbounded."""
    with _lock:
        entries = dict(_registry)
    return {name: _sizes(cache) for name, (cache, _) in sorted(entries.items())}


def clear_all() -> None:
    """Empty every registered memo: the next call of each computes afresh."""
    with _lock:
        entries = list(_registry.values())
    for cache, lock in entries:
        with lock if lock is not None else nullcontext():
            if hasattr(cache, "cache_clear"):
                cache.cache_clear()
            else:
                cache.clear()
