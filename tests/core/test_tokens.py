"""The one tokenization: any string encodes (lone surrogates too), one max-length rule, truncation marked
exactly, an empty text still reaches the model, padding the model reads as absent, and length-sorted
batches that keep every row once within their row and token bounds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
from engine.core.tokens import TOKEN_CAP, clean_surrogates, encode, length_sorted, max_length, pad


def test_clean_surrogates_makes_any_string_utf8():
    assert clean_surrogates("a fine film") == "a fine film"
    assert clean_surrogates("caf\udcc3\udca9") == "café"  # UTF-8 bytes the command line smuggled in as surrogates
    lone = clean_surrogates("bad \ud800 film")
    assert lone == "bad \ufffd film"
    for text in (lone, clean_surrogates("\udcff")):
        text.encode("utf-8")
        json.dumps(text, ensure_ascii=False).encode("utf-8")


class _Declared:
    def __init__(self, model_max_length):
        self.model_max_length = model_max_length


@pytest.mark.parametrize("declared, positions, expected", [
    (512, 128, 128),  # the model's position table
    (64, 128, 64),  # the tokenizer's own limit
    (10**30, None, TOKEN_CAP),  # transformers' "no limit" sentinel is not a limit
    (None, 4096, TOKEN_CAP),
    (2048, 1024, TOKEN_CAP),
])
def test_max_length_is_the_tightest_real_limit(declared, positions, expected):
    assert max_length(_Declared(declared), positions) == expected


def test_encode_keeps_special_tokens_and_marks_exactly_the_cut_texts(tokenizer):
    encoded = encode(tokenizer, ["a fine film", "word " * 20, ""], limit=8)
    first = encoded.ids[0]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(first[1:-1]) == "a fine film"
    assert len(encoded.ids[1]) == 8 and encoded.ids[1][-1] == tokenizer.sep_token_id
    assert encoded.truncated == [False, True, False]
    assert encoded.lengths.tolist() == [len(row) for row in encoded.ids] == [5, 8, 2]


def test_a_text_exactly_at_the_limit_is_not_marked_cut():
    gpt2 = zoo.tokenizer("gpt2")  # byte-level: one token a character, no special tokens
    encoded = encode(gpt2, ["the film", "the films"], limit=8)
    assert [len(row) for row in encoded.ids] == [8, 8]
    assert encoded.truncated == [False, True]


def test_an_empty_text_without_special_tokens_is_its_one_special_token():
    gpt2 = zoo.tokenizer("gpt2")
    encoded = encode(gpt2, ["", "ok"], limit=16)
    assert encoded.ids[0] == [gpt2.eos_token_id] and encoded.truncated[0] is False
    assert len(encoded.ids[1]) == 2


def test_any_input_encodes(tokenizer):
    encoded = encode(tokenizer, ["bad \ud800 film", 3, "caf\udcc3\udca9"], limit=32)
    assert encoded.ids[1] == encode(tokenizer, ["3"], limit=32).ids[0]
    assert encoded.ids[2] == encode(tokenizer, ["café"], limit=32).ids[0]
    assert tokenizer.decode(encoded.ids[0][1:-1]) == "bad film"  # the replacement character is not a word


def test_pad_right_pads_to_the_longest_row():
    ids, mask = pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_a_padded_row_reads_as_it_does_alone(tiny_bert, tokenizer):
    encoded = encode(tokenizer, ["a fine film", "a long and rather boring film about nothing at all"], limit=64)
    ids, mask = pad(encoded.ids, tokenizer.pad_token_id)
    with torch.no_grad():
        batch = tiny_bert(input_ids=ids, attention_mask=mask).logits
        alone = tiny_bert(input_ids=torch.tensor([encoded.ids[0]])).logits
    assert torch.allclose(batch[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("batch_size, max_tokens", [(3, None), (4, 40), (100, 25), (1, None)])
def test_length_sorted_batches(batch_size, max_tokens):
    lengths = [7, 3, 12, 3, 9, 1, 30, 5, 12, 3]
    batches = length_sorted(lengths, batch_size, max_tokens)
    order = np.concatenate(batches).tolist()
    assert sorted(order) == list(range(len(lengths)))  # every row once
    assert [lengths[i] for i in order] == sorted(lengths)  # shortest first
    assert [i for i in order if lengths[i] == 3] == [1, 3, 9]  # ties keep their order
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        if max_tokens and len(batch) > 1:  # padded tokens within the bound; a row longer than it goes alone
            assert len(batch) * max(lengths[i] for i in batch) <= max_tokens
    if max_tokens == 25:
        assert [6] in [batch.tolist() for batch in batches]


def test_length_sorted_fills_batches():
    assert [b.tolist() for b in length_sorted([4, 2, 3, 1, 5], 2)] == [[3, 1], [2, 0], [4]]
    assert length_sorted([], 4) == []
