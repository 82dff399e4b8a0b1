"""Tiny random models of every family the engine supports, each with a tokenizer of its own kind.

Built offline: WordPiece families reuse the embedded model's vocabulary; byte-level BPE families
(RoBERTa, GPT-2, Llama, Qwen2) get the 256 byte symbols and no merges; SentencePiece-style Unigram
families (XLM-R, ALBERT, DeBERTa-v2) get a small vocabulary of letters and common words. Weights
are random (seeded), so accuracies mean nothing; what the tests check is that every path runs
and stays exact.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "embedded"
ENCODERS = ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "albert", "deberta-v2", "mobilebert",
            "mpnet", "modernbert")
DECODERS = ("gpt2", "llama", "qwen2")
FAMILIES = ENCODERS + DECODERS
WORDS = ("the", "a", "and", "of", "to", "is", "it", "film", "movie", "good", "bad", "not", "great", "boring",
         "fun", "story", "acting", "was", "this", "that", "with", "but", "very", "funny", "dull")


def labels(num_labels: int = 2, names: tuple[str, ...] | None = None) -> dict:
    names = names or (("negative", "positive") if num_labels == 2 else tuple(f"class_{i}" for i in range(num_labels)))
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)},
            "num_labels": len(names)}


def _byte_vocab() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}


def _unigram_vocab(specials: tuple[str, ...]) -> list[tuple[str, float]]:
    pieces = [(s, 0.0) for s in specials]
    pieces += [(f"▁{w}", -2.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [(f"▁{c}", -6.0) for c in string.ascii_lowercase]
    return pieces


def tokenizer(family: str):
    from transformers import (AlbertTokenizer, AutoTokenizer, DebertaV2Tokenizer, GPT2Tokenizer, LlamaTokenizer,
                              MPNetTokenizer, Qwen2Tokenizer, RobertaTokenizer, XLMRobertaTokenizer)

    if family in ("bert", "distilbert", "electra", "mobilebert"):
        return AutoTokenizer.from_pretrained(EMBEDDED)
    if family == "modernbert":
        bert = AutoTokenizer.from_pretrained(EMBEDDED)
        bert.model_max_length = 128
        return bert
    if family == "mpnet":
        words = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"] + list(WORDS) + list(string.ascii_lowercase) \
            + [f"##{c}" for c in string.ascii_lowercase] + list(string.punctuation + string.digits)
        return MPNetTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})
    byte_vocab = _byte_vocab()
    if family == "roberta":
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
        vocab.update({s: i + 5 for i, s in enumerate(byte_vocab)})
        return RobertaTokenizer(vocab=vocab, merges=[])
    if family == "gpt2":
        vocab = dict(byte_vocab)
        vocab["<|endoftext|>"] = len(vocab)
        return GPT2Tokenizer(vocab=vocab, merges=[])
    if family == "qwen2":
        vocab = dict(byte_vocab)
        vocab["<|endoftext|>"] = len(vocab)
        return Qwen2Tokenizer(vocab=vocab, merges=[])
    if family == "llama":
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        vocab.update({s: i + 3 for i, s in enumerate(byte_vocab)})
        return LlamaTokenizer(vocab=vocab, merges=[])
    if family == "xlm-roberta":
        return XLMRobertaTokenizer(vocab=_unigram_vocab(("<s>", "<pad>", "</s>", "<unk>", "<mask>")))
    if family == "albert":
        return AlbertTokenizer(vocab=_unigram_vocab(("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")))
    if family == "deberta-v2":
        return DebertaV2Tokenizer(vocab=_unigram_vocab(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")))
    raise ValueError(f"unknown family {family}")


def config(family: str, vocab_size: int, **label_fields):
    from transformers import (AlbertConfig, BertConfig, DebertaV2Config, DistilBertConfig, ElectraConfig, GPT2Config,
                              LlamaConfig, MobileBertConfig, ModernBertConfig, MPNetConfig, Qwen2Config,
                              RobertaConfig, XLMRobertaConfig)

    common = dict(vocab_size=vocab_size, **label_fields)
    bert_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128, **common)
    if family == "bert":
        return BertConfig(**bert_like)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128, **common)
    if family == "roberta":
        return RobertaConfig(**bert_like, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "xlm-roberta":
        return XLMRobertaConfig(**bert_like, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "electra":
        return ElectraConfig(embedding_size=16, **bert_like)
    if family == "albert":
        return AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, pad_token_id=0, **common)
    if family == "deberta-v2":
        return DebertaV2Config(**bert_like, relative_attention=True, position_buckets=16, max_relative_positions=32,
                               pos_att_type=["p2c", "c2p"], position_biased_input=False, pad_token_id=0)
    if family == "mobilebert":
        return MobileBertConfig(hidden_size=64, embedding_size=16, true_hidden_size=32, intra_bottleneck_size=32,
                                num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                num_feedforward_networks=2, max_position_embeddings=128, **common)
    if family == "mpnet":
        return MPNetConfig(**bert_like, pad_token_id=1)
    if family == "modernbert":
        return ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                                max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=16,
                                pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
                                eos_token_id=102, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=vocab_size - 1,
                          eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, pad_token_id=2, bos_token_id=1,
                           eos_token_id=2, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, pad_token_id=vocab_size - 1,
                           eos_token_id=vocab_size - 1, **common)
    raise ValueError(f"unknown family {family}")


def build(family: str, num_labels: int = 2, names: tuple[str, ...] | None = None, seed: int = 0, padded: bool = True):
    """(model, tokenizer): a tiny random `...ForSequenceClassification` of `family` in eval mode; with
    `padded`, a pad token set as `load_model` sets it (decoder tokenizers come without one)."""
    from transformers import AutoModelForSequenceClassification

    from engine.model.loading import ensure_pad_token

    tok = tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config(family, len(tok), **labels(num_labels, names)))
    # Random LayerNorm weights (transformers initialises them to 1 and 0) and wider-spread weights give the
    # activations channel structure, so that quantization and smoothing have something to change.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn_like(parameter) * (0.1 if "norm" in name.lower() else 0.02))
    if padded:
        ensure_pad_token(model, tok)
    return model.eval().requires_grad_(False), tok


def save(family: str, folder: Path, **options) -> Path:
    """`build(family)` saved with save_pretrained, tokenizer beside it, as a user would bring it."""
    model, tok = build(family, padded=False, **options)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
