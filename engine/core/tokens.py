"""The one tokenization: text to ids with one max-length rule, length-sorted batches, one padding.

Any string is valid input: lone surrogates (invalid UTF-8 smuggled in by the command line) become
U+FFFD, and a text longer than the model reads is truncated and marked so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

TOKEN_CAP = 512  # sentences are short; longer inputs cost time without changing what this tool studies


def clean_surrogates(text: str) -> str:
    """`text` made encodable as UTF-8 (lone surrogates become U+FFFD, which tokenizers and JSON accept)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def max_length(tokenizer, max_positions: int | None) -> int:
    """The longest input: the tokenizer's declared limit, the model's position table, at most TOKEN_CAP."""
    limits = [TOKEN_CAP]
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < 1_000_000:
        limits.append(declared)
    if max_positions:
        limits.append(max_positions)
    return min(limits)


@dataclass(frozen=True)
class Encoded:
    """Token ids per text (special tokens included) and whether truncation cut the text."""

    ids: list[list[int]]
    truncated: list[bool]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(row) for row in self.ids])


def encode(tokenizer, texts: Sequence[str], limit: int) -> Encoded:
    """Token ids of every text. A text that gives no token at all (an empty review, for a tokenizer that adds
    no special tokens) is read as its one special token, so every model answers it."""
    cleaned = [clean_surrogates(t if isinstance(t, str) else str(t)) for t in texts]
    encoded = tokenizer(cleaned, truncation=True, max_length=limit)
    stand_in = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id,
                                 tokenizer.pad_token_id, tokenizer.unk_token_id) if i is not None), 0)
    ids = [list(row) or [stand_in] for row in encoded["input_ids"]]
    if encoded.encodings is not None:  # fast tokenizers keep what truncation cut off
        truncated = [bool(e.overflowing) for e in encoded.encodings]
    else:
        truncated = [len(row) >= limit and len(tokenizer(t, verbose=False)["input_ids"]) > limit
                     for t, row in zip(cleaned, ids)]
    return Encoded(ids, truncated)


def pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the rows, right-padded to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def length_sorted(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Row indices in length-sorted batches of at most `batch_size` rows (and `max_tokens` padded tokens)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current = [], []
    for row in order:
        full = len(current) >= batch_size or (max_tokens and (len(current) + 1) * lengths[row] > max_tokens)
        if current and full:
            batches.append(np.array(current))
            current = []
        current.append(int(row))
    if current:
        batches.append(np.array(current))
    return batches
