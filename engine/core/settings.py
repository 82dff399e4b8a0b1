"""A shared server's settings: an environment variable first, then the config file, then the default.

The config file is the TOML file named by `ENGINE_CONFIG`, else `quant-dashboard/engine.toml` under
`$XDG_CONFIG_HOME` (`~/.config`). Its keys are the variables' names without `ENGINE_`, lower-cased:

    allowed_models = ["/srv/models", "distilbert/*"]   # ENGINE_ALLOWED_MODELS (a list, or one comma-separated string)
    max_model_bytes = "8G"                              # ENGINE_MAX_MODEL_BYTES
    allow_pickle = false                                # ENGINE_ALLOW_PICKLE
    max_csv_bytes = "20M"                               # ENGINE_MAX_CSV_BYTES
    max_csv_rows = 100000                               # ENGINE_MAX_CSV_ROWS

Sizes are a number of bytes, or a number with K, M, G or T (powers of 1024, "B" or "iB" optional).
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from engine.core.errors import EngineError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_read: dict[tuple[str, float], dict] = {}


class SettingError(EngineError):
    """A setting that cannot be read (a malformed value or config file); the message names it."""


def config_path() -> Path:
    named = os.environ.get("ENGINE_CONFIG")
    if named:
        return Path(named).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "quant-dashboard" / "engine.toml"


def _file_values() -> dict:
    path = config_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    if (str(path), mtime) not in _read:
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise SettingError(f"config file {path} cannot be read: {error}") from None
        _read.clear()
        _read[(str(path), mtime)] = {key.lower(): value for key, value in values.items()}
    return _read[(str(path), mtime)]


def setting(name: str):
    """ENGINE_<NAME> when set and not empty, else the config file's `name`, else None."""
    value = os.environ.get(f"ENGINE_{name.upper()}")
    if value is not None and value.strip():
        return value.strip()
    return _file_values().get(name.lower())


def where(name: str) -> str:
    """Where a setting's value comes from, for messages."""
    value = os.environ.get(f"ENGINE_{name.upper()}")
    return f"ENGINE_{name.upper()}" if value and value.strip() else f"{name.lower()} in {config_path()}"


def size_setting(name: str) -> int | None:
    """A byte count (None when unset)."""
    value = setting(name)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise SettingError(f"{where(name)} = {value!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def flag_setting(name: str) -> bool:
    value = setting(name)
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on") if value is not None else False


def list_setting(name: str) -> list[str] | None:
    """A comma-separated string or a TOML list, as stripped non-empty items (None when unset)."""
    value = setting(name)
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]
