"""What a model will cost before it is loaded: parameters and memory, from `config.json` and the
safetensors headers alone (no weight is read), checked against `ENGINE_MAX_MODEL_BYTES`.

Memory needed = the FP32 weights twice (the shared model, and a plan's quantized copy while it is
evaluated) + the FP32 states an evaluation keeps (`ENGINE_BASELINE_BUDGET_MB`, 512 by default). The
parameter count is the larger of the headers' count and the config's estimate: transformers builds the
model from its config, so a config claiming 70 B parameters costs 70 B whatever the weight files hold.

The default limit is what fits beside what already runs: the memory available now (`MemAvailable` of
/proc/meminfo, and the cgroup's headroom where one is set) less the budget the sessions' states may still
take (`ENGINE_STATE_BUDGET_MB`, 256 by default) and a tenth of the machine's memory kept in reserve.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.core.settings import settings, where
from engine.model.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_MAX_BYTES = 4 * 1024**2
HEADER_MAX_BYTES = 100 * 1024**2
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class FootprintError(ModelError):
    """A model refused before loading: its config or weight headers cannot be read, or its weights are pickles."""


class TooLarge(FootprintError):
    """A model that would not fit this server's memory limit."""


@dataclass(frozen=True)
class Footprint:
    params: int
    safetensors: int  # weight files in safetensors format
    pickles: int  # pickle checkpoints (.bin and kin)

    @property
    def needed_bytes(self) -> int:
        states = settings().baseline_budget_mb * 1024**2
        return int(2 * 4 * self.params + states)


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.0f} MB"


def read_config(path: Path, name: str) -> dict:
    try:
        if path.stat().st_size > CONFIG_MAX_BYTES:
            raise FootprintError(f"{name}: config.json is over {gb(CONFIG_MAX_BYTES)}")
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise FootprintError(f"{name} has a broken config.json ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise FootprintError(f"{name} has a broken config.json (not a JSON object)")
    return config


def _int(config: dict, *keys: str, default: int = 0) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return int(value)
    return default


def config_params(config: dict) -> int:
    """Parameters a transformer of this config holds (embeddings, attention, feed-forward), a close estimate."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden = _int(text, "hidden_size", "d_model", "n_embd", "dim")
    layers = _int(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    inner = _int(text, "intermediate_size", "n_inner", "ffn_dim", "hidden_dim", default=4 * hidden)
    heads = max(1, _int(text, "num_attention_heads", "n_head", "n_heads", default=1))
    kv_heads = _int(text, "num_key_value_heads", default=heads) or heads
    vocab = _int(text, "vocab_size")
    positions = _int(text, "max_position_embeddings", "n_positions")
    attention = 2 * hidden * hidden + 2 * hidden * (hidden * kv_heads // heads)
    gated = str(text.get("hidden_act", text.get("activation_function", ""))).lower() in ("silu", "swiglu", "geglu")
    feed_forward = (3 if gated else 2) * hidden * inner
    return vocab * hidden + positions * hidden + layers * (attention + feed_forward)


def header_params(path: Path) -> int:
    """Elements of every tensor a safetensors file holds, from its header (8-byte length, then JSON)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(HEADER_MAX_BYTES, size - 8):
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(handle.read(length))
        return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    except (OSError, ValueError, struct.error, KeyError, TypeError) as error:
        raise FootprintError(f"{path.parent.name}/{path.name} has a broken safetensors header ({error})") from None


def folder_footprint(folder: Path, name: str) -> Footprint | None:
    """None for a folder without config.json: not a checkpoint, as transformers then says."""
    if not (folder / "config.json").is_file():
        return None
    config = read_config(folder / "config.json", name)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    weights = sum(header_params(path) for path in files)
    return Footprint(max(weights, config_params(config)), len(files), len(pickles))


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.split()[1:2] != []}


def _cgroup_headroom() -> int | None:
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:
            return int(cap) - used
    return None


def default_limit() -> tuple[int, str]:
    """(bytes, how they were found): memory available now less the sessions' state budget and a reserve."""
    info = _meminfo()
    available = info.get("MemAvailable") or info.get("MemFree") or 0
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = min(available, headroom) if available else headroom
    budget = int(settings().state_budget_mb * 1024**2)
    reserve = info.get("MemTotal", 0) // 10
    return max(0, available - budget - reserve), (f"default: {gb(available)} available less the sessions' "
                                                  f"{gb(budget)} state budget and a {gb(reserve)} reserve")


def limit() -> tuple[int, str]:
    configured = settings().max_model_bytes
    return (configured, where("max_model_bytes")) if configured is not None else default_limit()


def check_fits(footprint: Footprint, name: str) -> None:
    """Raise TooLarge in one line, with both figures, when the model would not fit."""
    allowed, source = limit()
    if footprint.needed_bytes > allowed:
        count = f"{footprint.params / 1e9:.2f} B" if footprint.params >= 1e9 else f"{footprint.params / 1e6:.1f} M"
        raise TooLarge(f"{name} is not loaded: {count} parameters need about "
                       f"{gb(footprint.needed_bytes)} to load and evaluate, over this server's limit of "
                       f"{gb(allowed)} ({source})")


def check_pickle(footprint: Footprint, name: str) -> bool:
    """Whether to fall back to a pickle checkpoint (only without safetensors, and only when allowed)."""
    if footprint.safetensors or not footprint.pickles:
        return False
    if not settings().allow_pickle:
        raise FootprintError(f"{name} has only pickle weights (.bin), which can run code when loaded; this server "
                             "loads safetensors only (ENGINE_ALLOW_PICKLE=1 allows them, loaded with weights_only)")
    return True
