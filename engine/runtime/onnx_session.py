"""Load an exported folder with plain onnxruntime, run it and time it.

Timing protocols (every figure says which it used; ratios only between figures of the same run):
- "back_to_back": each variant warms up and runs all its repeats before the next one starts, with ORT's
  default spinning worker threads: what a server running one model sees.
- "interleaved": one call of each variant in turn (rotating the order every round), spinning off
  (`session.intra_op.allow_spinning` = "0"), so a variant's spinning threads cannot steal the cores
  from the next one, and a drift of the machine's load hits every variant alike.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer

from engine.core.errors import EngineError
from engine.core.tokens import encode, length_sorted, max_length, pad
from engine.runtime.latency import interleaved, load_average, summary, time_call

PROTOCOLS = ("back_to_back", "interleaved")


class SessionError(EngineError):
    """A folder ONNX Runtime cannot load; the message says why."""


class OrtClassifier:
    """An exported folder (model.onnx, config and tokenizer files) on ONNX Runtime's CPU provider."""

    def __init__(self, folder: str | Path, threads: int | None = None, spinning: bool = True):
        self.folder = Path(folder)
        path = self.folder / "model.onnx"
        if not path.is_file():
            raise SessionError(f"no model.onnx in {self.folder}")
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
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer

    @property
    def max_length(self) -> int:
        """The export saves its tokenizer with the model's input limit as model_max_length."""
        return max_length(self.tokenizer, None)

    def logits(self, input_ids, attention_mask) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(None, {name: feeds[name] for name in self.inputs})[0]

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
        """One {"text", "label", "confidence", "probs", "truncated"} per text, in order, from length-sorted batches
        (an int8 activation scale covers its whole batch, as in the engine's evaluation)."""
        texts = list(texts)
        if not texts:
            return []
        encoded = encode(self.tokenizer, texts, self.max_length)
        logits = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for rows in length_sorted(encoded.lengths, batch_size):
            ids, mask = pad([encoded.ids[i] for i in rows], self.tokenizer.pad_token_id or 0)
            logits[rows] = self.logits(ids.numpy(), mask.numpy())
        probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
        return [{"text": text, "label": self.labels[int(p.argmax())], "confidence": float(p.max()),
                 "probs": {label: float(v) for label, v in zip(self.labels, p)}, "truncated": cut}
                for text, p, cut in zip(texts, probs, encoded.truncated)]


def ort_call(folder: str | Path, inputs: Mapping[str, torch.Tensor], threads: int | None = None,
             spinning: bool = True) -> Callable[[], np.ndarray]:
    """A zero-argument call of the exported model on fixed inputs (converted to numpy once, outside any timing)."""
    classifier = OrtClassifier(folder, threads, spinning)
    ids, mask = (inputs[name].cpu().numpy().astype(np.int64) for name in ("input_ids", "attention_mask"))
    return lambda: classifier.logits(ids, mask)


def benchmark(calls: Mapping[str, Callable[[], object]], batch: int, protocol: str = "interleaved", repeats: int = 20,
              min_seconds: float = 0.5) -> dict[str, dict]:
    """Latency of each zero-argument call under `protocol` (build ORT calls with spinning off for "interleaved"),
    with the load average before and after."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    before = load_average()
    if protocol == "interleaved":
        times = interleaved(calls, repeats, min_seconds)
    else:
        times = {label: time_call(call, repeats=repeats, min_seconds=min_seconds) for label, call in calls.items()}
    after = load_average()
    return {label: {**summary(values, batch), "protocol": protocol, "load_average": [before, after]}
            for label, values in times.items()}
