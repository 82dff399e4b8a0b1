"""Size: the bytes of a plan's real format, as torch serializes it (the deployable file's size)."""
from __future__ import annotations

import io

import torch
from cachetools import LRUCache
from torch import nn

from engine.core.memo import memoized
from engine.core.plan import Plan
from engine.core.vocabulary import Kernels
from engine.model.loading import fingerprint
from engine.quant.apply import apply_plan


class _ByteCounter(io.RawIOBase):
    """A sink that counts what is written to it: the size of a file without the file (or a copy of the
    whole model in memory, which a shared server's sessions would each hold at once)."""

    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = memoryview(data).nbytes
        self.count += written
        return written


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict saved with torch.save: the real packed format's size."""
    sink = _ByteCounter()
    torch.save(model.state_dict(), sink)
    return sink.count


@memoized("runtime.size", LRUCache(maxsize=256), key=lambda model, plan: (fingerprint(model), plan.key()))
def model_size_bytes(model: nn.Module, plan: Plan) -> int:
    """Serialized bytes of `model` with `plan`'s precisions on real kernels. Smoothing and activation
    scales change no stored byte count, so only the precisions count."""
    return serialized_bytes(apply_plan(model, plan.precisions_only(), Kernels.REAL))
