"""The model registry and `load_model`: the embedded offline classifier, hub ids, local folders.

The hub is reached only when it answers within a few seconds; otherwise `HubUnavailable` says so
in one line and callers fall back to the embedded model.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "models" / "embedded"
REGISTRY = {
    "embedded": "MiniLM-L6 (BERT) fine-tuned on Rotten Tomatoes sentences, bundled, offline",
    "distilbert-sst2": "distilbert-base-uncased-finetuned-sst-2-english from the HuggingFace Hub",
}
HUB_IDS = {"distilbert-sst2": "distilbert/distilbert-base-uncased-finetuned-sst-2-english"}
HUB_HOST = "huggingface.co"
HUB_TIMEOUT_S = 3.0

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model name or folder that cannot be loaded; the message says why."""


class HubUnavailable(ModelError):
    """The HuggingFace Hub cannot be reached (offline mode, no DNS, no route, time-out)."""


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when HF_HUB_OFFLINE is unset and a TCP connection to the hub opens within `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    # DNS look-ups ignore socket time-outs, so the probe runs in a thread we can stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])


@contextlib.contextmanager
def hub_guard(what: str) -> Iterator[None]:
    """Run hub-dependent code only when the hub answers; otherwise raise HubUnavailable at once."""
    if not hub_reachable():
        raise HubUnavailable(f"the HuggingFace Hub is unreachable, so {what} cannot be downloaded")
    yield


# transformers' first load imports torchao, which logs the optional CUDA/triton kernels it lacks (and
# torch logs a deprecation for its enums): nothing about the model, and the CLI's stderr must stay clean.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bar and no import-time log noise while a model loads."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    bar = hf_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


def _load_pretrained(source: str, local_only: bool) -> tuple[nn.Module, object]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, local_files_only=local_only, dtype=torch.float32
        )
    return model, tokenizer


def load_model(name: str = "embedded") -> tuple[nn.Module, object]:
    """(model, tokenizer) in FP32 eval mode for a registry key, a local folder or a hub id.

    Raises HubUnavailable for a hub model that is neither cached locally nor downloadable,
    and ModelError for anything else that cannot be loaded.
    """
    name = (name or "embedded").strip()
    if name == "embedded":
        source, local_only = str(EMBEDDED_DIR), True
    elif Path(name).expanduser().is_dir():
        source, local_only = str(Path(name).expanduser()), True
    else:
        source = HUB_IDS.get(name, name)
        local_only = not hub_reachable()
    try:
        model, tokenizer = _load_pretrained(source, local_only)
    except (OSError, ValueError, KeyError) as error:
        if local_only and source not in (str(EMBEDDED_DIR),) and not Path(source).is_dir():
            raise HubUnavailable(
                f"the HuggingFace Hub is unreachable and {source} is not in the local cache"
            ) from None
        raise ModelError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    if model.config.num_labels != 2:
        raise ModelError(f"model {name!r} has {model.config.num_labels} labels; a binary sentiment model is needed")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer


def load_model_or_fallback(name: str) -> tuple[nn.Module, object, str | None]:
    """load_model, falling back to the embedded model when the hub is unreachable.

    Returns (model, tokenizer, warning) where warning is the one line to show, or None.
    """
    try:
        model, tokenizer = load_model(name)
        return model, tokenizer, None
    except HubUnavailable as error:
        model, tokenizer = load_model("embedded")
        return model, tokenizer, f"{error}; using the embedded model instead"


def positive_index(model: nn.Module) -> int:
    """The output index of the positive class, read from the model's id2label."""
    id2label = {int(k): str(v).lower() for k, v in model.config.id2label.items()}
    for index, label in id2label.items():
        if label.startswith("pos"):
            return index
    return 1


def _tensor_signature(model: nn.Module) -> tuple:
    """Identity, storage and version counter of every tensor: changes when a tensor is replaced or edited in place."""
    return tuple((id(t), t.data_ptr(), 0 if t.is_inference() else t._version)
                 for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor))


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, values): keys caches to these weights.

    The hash is kept on the model and reused while its tensors are the same and unedited, so a
    deep copy or an in-place edit is hashed afresh rather than served a stale key.
    """
    signature = _tensor_signature(model)
    cached = model.__dict__.get("_engine_fingerprint")
    if cached and model.__dict__.get("_engine_fingerprint_of") == signature:
        return cached
    digest = hashlib.blake2b(digest_size=12)
    digest.update(type(model).__name__.encode())
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    model.__dict__["_engine_fingerprint"], model.__dict__["_engine_fingerprint_of"] = value, signature
    return value
