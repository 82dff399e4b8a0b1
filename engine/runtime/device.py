"""Devices: resolving 'cpu'/'cuda' with a clear error, and the model's copy on a device."""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from engine.core.errors import EngineError
from engine.core.memo import memo


class DeviceError(EngineError):
    """A device this machine does not have; the message says which to use."""


def resolve_device(device: str | None) -> torch.device:
    """A torch device from 'cpu'/'cuda'; asking for CUDA where there is none is a clear error."""
    name = (device or "cpu").lower()
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"device must be cpu or cuda, not {device!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was selected but this machine has no CUDA device; use --device cpu")
    return torch.device(name)


_LOCK = threading.Lock()
_ON_DEVICE: dict[tuple[int, str], nn.Module] = memo("runtime.models_on_device", {}, _LOCK)


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` (a moved copy, kept per process; the CPU model itself is never moved)."""
    if device.type == "cpu":
        return model
    key = (id(model), str(device))
    with _LOCK:
        if key not in _ON_DEVICE:
            # A full copy: .to() moves Parameter objects in place (set_data), so a copy that shared them
            # would move the shared CPU model too. The fingerprint is device-independent.
            _ON_DEVICE[key] = copy.deepcopy(model).to(device)
        return _ON_DEVICE[key]
