"""Calibration: per input channel of every Linear, the range of its FP32 input over sentences the
caller chose (a seeded sample of the evaluated source's calibration pool, never its evaluated rows).

Hooks go on a private copy, so the shared model is never touched; padding positions are left out
(they are not text). A deterministic subset of input rows per layer is kept for per-layer errors
(SmoothQuant's automatic alpha, the outlier view).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from cachetools import LRUCache
from torch import nn

from engine.core.errors import EngineError
from engine.core.memo import memoized
from engine.core.tokens import encode, length_sorted, pad
from engine.model.inventory import inventory
from engine.model.loading import fingerprint, input_limit
from engine.quant.apply import shallow_copy

CALIB_SEED = 0
SAMPLE_ROWS = 256  # token rows kept per layer for per-layer errors


class CalibrationError(EngineError):
    """Calibration asked for where no calibration text exists; the message says why."""


def calibration_texts(pool: Sequence[str], n: int, seed: int = CALIB_SEED) -> tuple[str, ...]:
    """`n` texts of `pool` chosen by `seed`, in pool order (all of them when the pool is smaller)."""
    if not pool:
        raise CalibrationError("this data set has no calibration rows (too small to hold any out); "
                               "static scales and SmoothQuant need some")
    n = min(n, len(pool))
    rows = np.sort(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))
    return tuple(pool[i] for i in rows)


@dataclass(frozen=True)
class Calibration:
    """Per input channel of every Linear, the min and max of its FP32 input over the calibration texts."""

    model: str  # the weights' fingerprint
    n: int
    tokens: int
    low: dict[str, torch.Tensor]
    high: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]
    source: str = ""
    mean: dict[str, torch.Tensor] = field(default_factory=dict)  # per input channel (bias correction)
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)  # X^T X / rows, float64 (GPTQ), where asked
    key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(f"{self.model}:{self.n}".encode(), digest_size=8)
        for name in sorted(self.low):
            digest.update(self.low[name].numpy().tobytes())
            digest.update(self.high[name].numpy().tobytes())
        object.__setattr__(self, "key", digest.hexdigest())

    def absmax(self, name: str) -> torch.Tensor:
        return torch.maximum(-self.low[name], self.high[name])

    def input_range(self, name: str, smoothing=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input range after smoothing divided it by s (s > 0, so per channel exactly)."""
        factor = smoothing.factor(name) if smoothing is not None else None
        if factor is None:
            return self.low[name], self.high[name]
        return self.low[name] / factor, self.high[name] / factor

    def summary(self) -> dict:
        """JSON-ready statistics: sentences, tokens, source, and per layer the per-channel max|X|, min, max."""
        return {"n": self.n, "tokens": self.tokens, "source": self.source,
                "layers": {name: {"absmax": self.absmax(name).tolist(), "min": self.low[name].tolist(),
                                  "max": self.high[name].tolist()} for name in self.low}}


def _key(model: nn.Module, _tokenizer, texts: Sequence[str], source: str = "", batch_size: int = 32,
         hessians: frozenset[str] = frozenset()) -> tuple:
    digest = hashlib.blake2b("\n".join(texts).encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return fingerprint(model), digest, batch_size, hessians


@memoized("quant.calibration", LRUCache(maxsize=8), key=_key)
def calibrate(model: nn.Module, tokenizer, texts: Sequence[str], source: str = "", batch_size: int = 32,
              hessians: frozenset[str] = frozenset()) -> Calibration:
    """Input statistics of every Linear over `texts` (and X^T X of the layers in `hessians`, which GPTQ needs);
    memoized per (weights, texts, hessians)."""
    encoded = encode(tokenizer, texts, input_limit(model, tokenizer))
    lengths = encoded.lengths
    stride = max(1, math.ceil(int(lengths.sum()) / SAMPLE_ROWS))
    device = next(model.parameters()).device
    probe = shallow_copy(model)
    names = [layer.name for layer in inventory(model) if layer.kind == "linear"]
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}

    def observer(name: str):
        def record(_module, args):
            x, mask = args[0], current["mask"]
            token_level = x.dim() == 3 and x.shape[:2] == mask.shape
            rows = (x[mask] if token_level else x.reshape(-1, x.shape[-1])).float()
            lo, hi = rows.amin(0).cpu(), rows.amax(0).cpu()
            low[name] = torch.minimum(low[name], lo) if name in low else lo
            high[name] = torch.maximum(high[name], hi) if name in high else hi
            samples[name].append((rows[::stride] if token_level else rows).cpu())
            total = rows.double().sum(0).cpu()
            sums[name] = sums[name] + total if name in sums else total
            seen[name] = seen.get(name, 0) + rows.shape[0]
            if name in hessians:
                gram = (rows.double().T @ rows.double()).cpu()
                grams[name] = grams[name] + gram if name in grams else gram
        return record

    handles = [probe.get_submodule(name).register_forward_pre_hook(observer(name)) for name in names]
    try:
        with torch.inference_mode():
            for rows in length_sorted(lengths, batch_size):
                ids, mask = pad([encoded.ids[i] for i in rows], tokenizer.pad_token_id or 0)
                current["mask"] = mask.bool().to(device)
                probe(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return Calibration(fingerprint(model), len(texts), int(lengths.sum()), low, high,
                       {name: torch.cat(parts)[:4 * SAMPLE_ROWS] for name, parts in samples.items() if parts},
                       source, {name: (sums[name] / seen[name]).float() for name in sums},
                       {name: grams[name] / seen[name] for name in grams})
