"""The model registry and `load_model`: the embedded offline classifier, hub ids, local folders.

Any `...ForSequenceClassification` of transformers loads, encoder or decoder, with any number of
labels. What cannot be analysed gets one line saying what is missing: a folder that does not
exist, a bare encoder or a checkpoint without its classification head (transformers would
otherwise invent a random head), an encoder-decoder model. The hub is reached only when it
answers within a few seconds; otherwise `HubUnavailable` says so and callers fall back.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from engine.data.hub import hub_reachable
from engine.core.labels import LabelSpace
from engine.core.tokens import max_length
from engine.model import admission, footprint
from engine.model.errors import ModelError
from engine.model.facts import facts

EMBEDDED_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "embedded"
REGISTRY = {
    "embedded": "MiniLM-L6 (BERT) fine-tuned on Rotten Tomatoes sentences, bundled, offline",
    "distilbert-sst2": "distilbert-base-uncased-finetuned-sst-2-english from the HuggingFace Hub",
}
HUB_IDS = {"distilbert-sst2": "distilbert/distilbert-base-uncased-finetuned-sst-2-english"}
HEAD_SUFFIX = "ForSequenceClassification"

log = logging.getLogger(__name__)


class HubUnavailable(ModelError):
    """The HuggingFace Hub cannot be reached (offline mode, no DNS, no route, time-out)."""


class NotAllowed(ModelError):
    """A model this server's admission setting (ENGINE_ALLOWED_MODELS) does not allow."""


# transformers' first load imports torchao, which logs the optional CUDA/triton kernels it lacks (and
# torch logs a deprecation for its enums): nothing about the model, and the CLI's stderr must stay clean.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree", "transformers")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bar and no import-time log noise while a model loads."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1


def _check_classifier(source: str, local_only: bool) -> None:
    """One line for checkpoints that are not a sequence classifier this engine can analyse."""
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{source} is an encoder-decoder ({config.model_type}) model; this tool analyses "
                         f"encoder or decoder ...{HEAD_SUFFIX} models")
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(HEAD_SUFFIX) for name in architectures):
        raise ModelError(f"{source} is a {', '.join(architectures)} checkpoint with no sequence-classification head; "
                         f"this tool needs a ...{HEAD_SUFFIX} checkpoint (fine-tuned for classification)")


def _load_pretrained(source: str, local_only: bool, use_safetensors: bool = True) -> tuple[nn.Module, object]:
    with _quiet_loading():
        _check_classifier(source, local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, local_files_only=local_only, dtype=torch.float32, output_loading_info=True,
            use_safetensors=use_safetensors, weights_only=True)
    missing = [key for key in info.get("missing_keys", ()) if not key.endswith(("position_ids", "num_batches_tracked"))]
    if missing:
        raise ModelError(f"{source} lacks weights the classifier needs ({', '.join(sorted(missing)[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}): it is not a fine-tuned {type(model).__name__}")
    return model, tokenizer


def ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Decoder classifiers pool the last non-pad token and need a pad id to batch: the usual choice is eos."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise ModelError("the tokenizer has no pad, eos, unk or bos token to pad batches with")
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _refused(name: str, rules: admission.Policy, why: str = "") -> NotAllowed:
    return NotAllowed(f"{name} is not allowed here{why}: this server loads {rules.describe()} ({rules.source})")


def _admitted(name: str) -> tuple[str, bool, bool]:
    """(source to load, local files only, is a local folder) for a name this server admits; raises otherwise
    before anything outside the allowed roots is touched (`engine.model.admission`)."""
    if name == "embedded":
        return str(EMBEDDED_DIR), True, True
    if name in HUB_IDS:  # the project's own models are always allowed
        return HUB_IDS[name], not hub_reachable(), False
    rules = admission.policy()
    if rules.any:
        if Path(name).expanduser().is_dir():
            return str(Path(name).expanduser()), True, True
        if _looks_like_path(name):
            raise ModelError(f"no model folder at {name}")
        return name, not hub_reachable(), False
    absolute = os.path.abspath(os.path.expanduser(name))
    if _looks_like_path(name) or any(admission._under(absolute, root) for root in rules.roots):
        try:
            real = admission.resolve_confined(name, rules.roots)
        except admission.Outside:
            raise _refused(name, rules) from None
        if real is None or not os.path.isdir(real):
            raise ModelError(f"no model folder at {name}")
        link = admission.links_outside(real, rules.roots)
        if link:
            raise _refused(name, rules, f" (its file {link} links outside the allowed folders)")
        return real, True, True
    if not admission.hub_allowed(name, rules.hub) or os.path.isdir(name):  # a same-named folder here: not the Hub
        raise _refused(name, rules)
    return name, not hub_reachable(), False


def _footprint(name: str, source: str, local_only: bool, local: bool) -> footprint.Footprint | None:
    if local:
        return footprint.folder_footprint(Path(source), name)
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config_file = Path(hf_hub_download(source, "config.json", local_files_only=local_only))
    except Exception:  # not on the Hub or not cached: transformers says which, below
        return None
    params = footprint.config_params(footprint.read_config(config_file, name))
    if local_only:
        cached = footprint.folder_footprint(config_file.parent, name) or footprint.Footprint(0, 0, 0)
        return footprint.Footprint(max(params, cached.params), cached.safetensors, cached.pickles)
    try:
        meta = get_safetensors_metadata(source)
        return footprint.Footprint(max(params, sum(meta.parameter_count.values())), len(meta.files_metadata), 0)
    except Exception as error:  # no safetensors on the Hub: pickle weights only (or an unreadable answer)
        pickle_only = type(error).__name__ == "NotASafetensorsRepoError"
        return footprint.Footprint(params, 0, int(pickle_only))


def load_model(name: str = "embedded") -> tuple[nn.Module, object]:
    """(model, tokenizer) in FP32 eval mode for a registry key, a local folder or a hub id.

    Raises NotAllowed for a model this server does not admit (ENGINE_ALLOWED_MODELS), footprint.TooLarge for
    one over ENGINE_MAX_MODEL_BYTES (both before any weight is read), HubUnavailable for a hub model that is
    neither cached locally nor downloadable, and ModelError for anything else that cannot be loaded or analysed.
    """
    name = (name or "embedded").strip()
    source, local_only, local = _admitted(name)
    use_safetensors = True
    if name != "embedded":  # the fallback always loads
        found = _footprint(name, source, local_only, local)
        if found is not None:
            footprint.check_fits(found, name)
            use_safetensors = not footprint.check_pickle(found, name)
    try:
        model, tokenizer = _load_pretrained(source, local_only, use_safetensors)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        if local_only and not Path(source).is_dir():
            raise HubUnavailable(f"the HuggingFace Hub is unreachable and {source} is neither a local folder "
                                 "nor in the local cache") from None
        reason = str(error).splitlines()[0] if str(error) else repr(error)
        raise ModelError(f"cannot load model {name!r}: {reason}") from None
    ensure_pad_token(model, tokenizer)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.name_or_path = name
    return model, tokenizer


def load_model_or_fallback(name: str, any_error: bool = False) -> tuple[nn.Module, object, str | None]:
    """load_model, falling back to the embedded model when the hub is unreachable (with `any_error`, when
    the model cannot be used at all: the dashboard keeps running and says why).

    Returns (model, tokenizer, warning) where warning is the one line to show, or None; after a fallback
    the model's `name_or_path` is "embedded", the model actually shown.
    """
    try:
        model, tokenizer = load_model(name)
        return model, tokenizer, None
    except ModelError as error:
        if not (any_error or isinstance(error, HubUnavailable)) or (name or "embedded").strip() == "embedded":
            raise
        model, tokenizer = load_model("embedded")
        return model, tokenizer, f"{error}; showing the embedded model instead"


def label_space(model: nn.Module) -> LabelSpace:
    """The model's classes in output order, from its id2label."""
    return LabelSpace.from_id2label(getattr(model.config, "id2label", None), model.config.num_labels)


def max_positions(model: nn.Module) -> int | None:
    """How many positions the model's position table takes. RoBERTa-style tables (with a padding index)
    start counting after the padding index, so they hold that many fewer."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    embeddings = getattr(model.base_model, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    offset = getattr(table, "padding_idx", None)
    return positions - (offset + 1) if isinstance(offset, int) else positions


def input_limit(model: nn.Module, tokenizer) -> int:
    """The one max-length rule, for this model and tokenizer."""
    return max_length(tokenizer, max_positions(model))


def _tensor_signature(model: nn.Module) -> tuple:
    """Identity, storage and version counter of every tensor: changes when a tensor is replaced or edited in place."""
    return tuple((id(t), t.data_ptr(), 0 if t.is_inference() else t._version)
                 for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor))


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, values): keys caches to these weights.

    The hash is kept in the model's facts and reused while its tensors are the same and unedited, so an
    in-place edit is hashed afresh rather than served a stale key (and a copy starts with no facts).
    """
    signature = _tensor_signature(model)
    known = facts(model)
    if known.fingerprint and known.fingerprint_of == signature:
        return known.fingerprint
    digest = hashlib.blake2b(digest_size=12)
    digest.update(type(model).__name__.encode())
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    known.fingerprint, known.fingerprint_of = value, signature
    return value
