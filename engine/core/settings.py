"""A shared server's settings: an environment variable first, then the config file, then the default.

The config file is the TOML file named by `ENGINE_CONFIG`, else `quant-dashboard/engine.toml` under
`$XDG_CONFIG_HOME` (`~/.config`). Its keys are the variables' names without `ENGINE_`, lower-cased:

    allowed_models = ["/srv/models", "distilbert/*"]   # ENGINE_ALLOWED_MODELS (a list, or one comma-separated string)
    max_model_bytes = "8G"                              # ENGINE_MAX_MODEL_BYTES
    allow_pickle = false                                # ENGINE_ALLOW_PICKLE
    max_csv_bytes = "20M"                               # ENGINE_MAX_CSV_BYTES
    max_csv_rows = 100000                               # ENGINE_MAX_CSV_ROWS
    cache_dir = "/srv/cache"                            # ENGINE_CACHE_DIR (the disk memo store)
    weight_cache_mb = 256                               # ENGINE_WEIGHT_CACHE_MB (simulated weights kept)
    baseline_budget_mb = 512                            # ENGINE_BASELINE_BUDGET_MB (FP32 states per evaluator)
    state_budget_mb = 256                               # ENGINE_STATE_BUDGET_MB (all sessions' own states)
    workers = 1                                         # ENGINE_WORKERS (the scheduler's worker threads)
    threads = 0                                         # ENGINE_THREADS (torch threads each; 0: cores / workers)

Sizes are a number of bytes, or a number with K, M, G or T (powers of 1024, "B" or "iB" optional).
`settings()` reads them all into one typed `Settings`, once per environment and config file: a changed
ENGINE_ variable or a rewritten config file is read afresh, and `engine.core.memo.clear_all()` drops it.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from engine.core.errors import EngineError
from engine.core.memo import memoized

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class SettingError(EngineError):
    """A setting that cannot be read (a malformed value or config file); the message names it."""


@dataclass(frozen=True)
class Settings:
    """Every ENGINE_ setting, typed, with its default."""

    allowed_models: tuple[str, ...] | None = None  # None: the default for the address the server listens on
    max_model_bytes: int | None = None  # None: what this machine's memory allows
    allow_pickle: bool = False
    max_csv_bytes: int | None = None  # None: engine.data.sets's default
    max_csv_rows: int | None = None
    cache_dir: Path | None = None  # None: a folder under the user's cache directory
    weight_cache_mb: float = 256.0
    baseline_budget_mb: float = 512.0
    state_budget_mb: float = 256.0
    workers: int = 1
    threads: int = 0  # 0: the cores shared among the workers


def config_path() -> Path:
    named = os.environ.get("ENGINE_CONFIG")
    if named:
        return Path(named).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "quant-dashboard" / "engine.toml"


def _file_values(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SettingError(f"config file {path} cannot be read: {error}") from None
    return {key.lower(): value for key, value in values.items()}


def _environment() -> tuple:
    """What the settings are read from: the ENGINE_ variables and the config file's path and modification time."""
    path = config_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = None
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("ENGINE_"))), str(path), mtime


def settings() -> Settings:
    """This process's settings: each ENGINE_<NAME> when set and not empty, else the config file's `name`, else
    the default. A malformed value is a SettingError naming it."""
    return _settings(_environment())


@memoized("core.settings", LRUCache(maxsize=4), key=lambda environment: environment)
def _settings(environment: tuple) -> Settings:
    variables, file = dict(environment[0]), _file_values(Path(environment[1]))

    def raw(name: str):
        value = variables.get(f"ENGINE_{name.upper()}")
        return value.strip() if value is not None and value.strip() else file.get(name)

    def number(name: str, kind: type):
        value = raw(name)
        if value is None:
            return Settings.__dataclass_fields__[name].default
        try:
            return kind(value) if kind is float else int(float(value))
        except (TypeError, ValueError):
            raise SettingError(f"{where(name)} = {value!r} is not a number") from None

    def path(name: str) -> Path | None:
        value = raw(name)
        return Path(str(value)).expanduser() if value is not None else None

    return Settings(allowed_models=_list(raw("allowed_models")), max_model_bytes=_size("max_model_bytes", raw),
                    allow_pickle=_flag(raw("allow_pickle")), max_csv_bytes=_size("max_csv_bytes", raw),
                    max_csv_rows=_size("max_csv_rows", raw), cache_dir=path("cache_dir"),
                    weight_cache_mb=number("weight_cache_mb", float),
                    baseline_budget_mb=number("baseline_budget_mb", float),
                    state_budget_mb=number("state_budget_mb", float), workers=number("workers", int),
                    threads=number("threads", int))


def where(name: str) -> str:
    """Where a setting's value comes from, for messages."""
    value = os.environ.get(f"ENGINE_{name.upper()}")
    return f"ENGINE_{name.upper()}" if value and value.strip() else f"{name.lower()} in {config_path()}"


def _size(name: str, raw) -> int | None:
    """A byte count (None when unset)."""
    value = raw(name)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise SettingError(f"{where(name)} = {value!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on") if value is not None else False


def _list(value) -> tuple[str, ...] | None:
    """A comma-separated string or a TOML list, as stripped non-empty items (None when unset)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())
