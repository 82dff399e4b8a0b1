"""Load an exported folder with plain onnxruntime, run it, evaluate it and time it.

Timing protocols (say which one a figure used; ratios only between figures of the same run):
- "back_to_back": each variant warms up and runs all its repeats before the next one starts, with ORT's
  default spinning worker threads: what a server running one model sees.
- "interleaved": one call of each variant in turn (rotating the order every round), spinning off
  (`session.intra_op.allow_spinning` = "0"), so a variant's spinning threads cannot steal the cores
  from the next one and slow drift of the machine's load hits every variant alike.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

EVAL_BATCH = 32  # the engine's evaluation batches: 32 length-sorted sentences, right-padded
PROTOCOLS = ("back_to_back", "interleaved")


def max_length(tokenizer, config: dict) -> int:
    """The longest input the model takes: the tokenizer's and the position table's limits, at most 512."""
    limits = [512]
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < 1_000_000:
        limits.append(declared)
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def length_sorted_batches(tokenizer, texts: Sequence[str], limit: int, batch_size: int = EVAL_BATCH):
    """[(rows, input_ids, attention_mask)] as int64 arrays, batches of similar length, right-padded."""
    encoded = tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
    lengths = np.array([len(ids) for ids in encoded])
    order = np.argsort(lengths, kind="stable")
    pad = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids = np.full((len(rows), int(lengths[rows].max())), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :lengths[row]], mask[i, :lengths[row]] = encoded[row], 1
        batches.append((rows, ids, mask))
    return batches


def run_batches(forward: Callable[[np.ndarray, np.ndarray], np.ndarray], batches, n: int) -> np.ndarray:
    """Logits of every row in dataset order, from `forward(input_ids, attention_mask)` per batch."""
    out = None
    for rows, ids, mask in batches:
        logits = np.asarray(forward(ids, mask), dtype=np.float32)
        if out is None:
            out = np.zeros((n, logits.shape[-1]), dtype=np.float32)
        out[rows] = logits
    return out


def torch_forward(model: torch.nn.Module) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A torch classifier as `forward(input_ids, attention_mask) -> logits` on numpy arrays."""

    def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        return (out.logits if hasattr(out, "logits") else out[0]).float().numpy()

    return forward


class OrtClassifier:
    """An exported folder (model.onnx, config and tokenizer files) on ONNX Runtime's CPU provider."""

    def __init__(self, folder: str | Path, threads: int | None = None, spinning: bool = True):
        self.folder = Path(folder)
        path = self.folder / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"no model.onnx in {self.folder}")
        self.threads = threads or torch.get_num_threads()
        self.spinning = spinning
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        config_path = self.folder / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        id2label = self.config.get("id2label") or {}
        count = self.session.get_outputs()[0].shape[-1]
        count = count if isinstance(count, int) else len(id2label) or 2
        self.labels = [str(id2label.get(str(i), f"LABEL_{i}")).lower() for i in range(count)]
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer

    @property
    def max_length(self) -> int:
        return max_length(self.tokenizer, self.config)

    def logits(self, input_ids, attention_mask) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(None, {name: feeds[name] for name in self.inputs})[0]

    def dataset_logits(self, texts: Sequence[str], batch_size: int = EVAL_BATCH) -> np.ndarray:
        """Logits in `texts` order, computed on the engine's length-sorted batches (the int8 activation
        scale covers a whole batch, so the batches decide the numbers)."""
        batches = length_sorted_batches(self.tokenizer, texts, self.max_length, batch_size)
        return run_batches(self.logits, batches, len(texts))

    def predict(self, texts: Sequence[str], batch_size: int = EVAL_BATCH) -> list[dict]:
        """One {"text", "label", "confidence", "probs", "truncated"} per text, in order."""
        texts = list(texts)
        if not texts:
            return []
        logits = self.dataset_logits(texts, batch_size)
        probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
        encodings = self.tokenizer(texts, truncation=True, max_length=self.max_length).encodings
        truncated = [bool(e.overflowing) for e in encodings] if encodings else [False] * len(texts)
        return [{"text": text, "label": self.labels[int(p.argmax())], "confidence": float(p.max()),
                 "probs": {label: float(v) for label, v in zip(self.labels, p)}, "truncated": truncated[i]}
                for i, (text, p) in enumerate(zip(texts, probs))]


# ---- timing ---------------------------------------------------------------------------------
def bench_inputs(tokenizer, texts: Sequence[str], batch: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch` real sentences, truncated or padded to exactly `tokens` tokens (as engine.measure does)."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    encoded = tokenizer(chosen, padding="max_length", truncation=True, max_length=tokens, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def benchmark(variants: Mapping[str, str | Path | Callable], tokenizer, texts: Sequence[str], *, batch: int = 1,
              tokens: int = 32, protocol: str = "back_to_back", threads: int | None = None, warmup: int = 5,
              repeats: int = 30, min_seconds: float = 1.0) -> dict[str, dict]:
    """Latency p50/p95 of each variant: an exported folder (run by ORT) or `forward(ids, mask)` (torch).

    ORT sessions get intra_op_num_threads = `threads` (default torch.get_num_threads()); spinning is on
    for "back_to_back" and off for "interleaved". The load average (1, 5, 15 min) is recorded before and after.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    threads = threads or torch.get_num_threads()
    spinning = protocol == "back_to_back"
    runners, runtimes = {}, {}
    for name, variant in variants.items():
        if callable(variant):
            runners[name], runtimes[name] = variant, "torch"
        else:
            runners[name], runtimes[name] = OrtClassifier(variant, threads, spinning).logits, "onnxruntime"
    ids, mask = bench_inputs(tokenizer, texts, batch, tokens)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in runners}

    def timed(name: str) -> None:
        started = time.perf_counter()
        runners[name](ids, mask)
        times[name].append(time.perf_counter() - started)

    names = list(runners)
    if protocol == "back_to_back":
        for name in names:
            for _ in range(warmup):
                runners[name](ids, mask)
            started = time.perf_counter()
            while len(times[name]) < repeats or time.perf_counter() - started < min_seconds:
                timed(name)
    else:
        for name in names:
            for _ in range(warmup):
                runners[name](ids, mask)
        started, rounds = time.perf_counter(), 0
        while rounds < repeats or time.perf_counter() - started < min_seconds * len(names):
            for name in names[rounds % len(names):] + names[:rounds % len(names)]:
                timed(name)
            rounds += 1
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    results = {}
    for name, values in times.items():
        values = np.array(values)
        p50 = float(np.median(values))
        results[name] = {"latency_ms_p50": p50 * 1e3, "latency_ms_p95": float(np.percentile(values, 95)) * 1e3,
                         "throughput_per_s": batch / p50, "threads": threads, "batch": batch, "tokens": tokens,
                         "runtime": runtimes[name], "protocol": protocol,
                         "spinning": spinning if runtimes[name] == "onnxruntime" else None,
                         "repeats": len(values), "load_average": load}
    return results
