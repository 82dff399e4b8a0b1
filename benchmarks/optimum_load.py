"""An exported folder loaded with optimum's ORTModelForSequenceClassification predicts what plain ONNX Runtime does.

    python benchmarks/optimum_load.py FOLDER [FOLDER ...] [--sentences 500]

optimum-onnx 0.1 requires transformers < 4.58, which the project's pinned transformers is not, so this runs
from an environment of its own, beside the project's packages:

    python -m venv --system-site-packages /tmp/optimum
    /tmp/optimum/bin/pip install "optimum-onnx[onnxruntime]==0.1.0"
    /tmp/optimum/bin/python benchmarks/optimum_load.py EXPORTED_FOLDER

It imports nothing from the engine (the engine needs the pinned transformers): plain ONNX Runtime stands for
the engine here, whose `eval --runtime onnxruntime` runs the same graph through the same session (tested).
The sentences are the first ones of the vendored Amazon set. Exit 1 when a prediction differs.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer, PreTrainedTokenizerFast

MAX_TOKENS = 32  # within every family's position table, tiny test models' included
AMAZON = Path(__file__).resolve().parent.parent / "data" / "amazonReviewSnippets_GroundTruth.txt.gz"


def sentences(count: int) -> list[str]:
    with gzip.open(AMAZON, "rt", encoding="utf-8") as lines:
        return [line.rstrip("\n").split("\t", 2)[2] for _, line in zip(range(count), lines)]


def check(folder: Path, texts: list[str]) -> dict:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ValueError:  # a tokenizer class newer than optimum's transformers: its tokenizer.json still loads
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    through_optimum = ORTModelForSequenceClassification.from_pretrained(folder, file_name="model.onnx")
    plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in plain.get_inputs()}
    optimum_logits, plain_logits = [], []
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start:start + 32], padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="np")
        optimum_logits.append(through_optimum(**{k: v for k, v in batch.items() if k in wanted}).logits)
        plain_logits.append(plain.run(None, {k: v for k, v in batch.items() if k in wanted})[0])
    a, b = np.concatenate(optimum_logits), np.concatenate(plain_logits)
    return {"folder": str(folder), "plan": json.loads((folder / "plan.json").read_text()), "n": len(texts),
            "same_predictions": int(np.sum(a.argmax(1) == b.argmax(1))),
            "max_abs_logit_difference": float(np.abs(a - b).max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--sentences", type=int, default=500)
    args = parser.parse_args()
    texts = sentences(args.sentences)
    rows = [check(folder, texts) for folder in args.folders]
    for row in rows:
        print(json.dumps(row))
    return 0 if all(row["same_predictions"] == row["n"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
