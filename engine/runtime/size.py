"""Size: the bytes of a plan's real format, as torch serializes it (the deployable file's size)."""
from __future__ import annotations

import io
import threading

import torch
from cachetools import LRUCache, cached
from torch import nn

from engine.core.plan import Plan
from engine.model.loading import fingerprint
from engine.quant.apply import apply_plan


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict saved with torch.save: the real packed format's size."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@cached(LRUCache(maxsize=256), key=lambda model, plan: (fingerprint(model), plan.key()), lock=threading.Lock())
def model_size_bytes(model: nn.Module, plan: Plan) -> int:
    """Serialized bytes of `model` with `plan`'s precisions on real kernels. Smoothing and activation
    scales change no stored byte count, so only the precisions count."""
    return serialized_bytes(apply_plan(model, plan.precisions_only(), "real"))
