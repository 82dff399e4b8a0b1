"""A large user CSV through the layer map's path: evaluated once, then toggled, within the memory budgets.

    HF_HUB_OFFLINE=1 python benchmarks/large_set.py [--rows 50000] [--model embedded] [--json out.json]

Builds a CSV of `--rows` distinct labelled sentences from the vendored sets (each made unique by a numbered
suffix), loads it as an upload is loaded, builds the pages' evaluator (the FP32 pass, its states kept within
ENGINE_BASELINE_BUDGET_MB), then makes three changes as a browser session does (one layer of the middle
block to INT8, one more, then the head). Reports the time of each step, how many sentences the FP32 pass ran (it must
run once), the cuts kept, the states held, and the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import load_dataset, load_model  # noqa: E402
from engine.data.sets import load_csv  # noqa: E402
from engine.core.plan import Plan  # noqa: E402
from engine.evaluation.evaluate import get_evaluator  # noqa: E402
from engine.evaluation.session import Session  # noqa: E402
from engine.runtime.latency import load_average, machine  # noqa: E402


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def big_csv(rows: int) -> bytes:
    pool = [(t, label) for name in ("embedded", "amazon", "tweets", "nyt")
            for t, label in zip(load_dataset(name).texts, load_dataset(name).labels)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    for i in range(rows):
        text, label = pool[i % len(pool)]
        writer.writerow([f"{text} ({i})", label])
    return out.getvalue().encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    figures = {"machine": machine(), "load_before": load_average(), "rss_after_load_mb": peak_rss_mb()}
    started = time.perf_counter()
    data = load_csv(f"big-{args.rows}.csv", big_csv(args.rows))
    figures["csv_s"] = time.perf_counter() - started
    passed = [0]  # sentences through the word embedding table: each forward of the model, counted
    table = model.get_input_embeddings()
    hook = table.register_forward_hook(lambda _m, inputs, _out: passed.__setitem__(0, passed[0] + inputs[0].shape[0]))
    started = time.perf_counter()
    evaluator = get_evaluator(model, tokenizer, data, keep_states=True)
    figures["fp32_pass_s"] = time.perf_counter() - started
    hook.remove()
    figures.update({"rows": len(data), "sentences_run_while_building_the_evaluator": passed[0],
                    "cuts_kept": sorted(evaluator.kept_cuts) if evaluator.kept_cuts is not None else "all",
                    "baseline_states_mb": evaluator.baseline_trace.nbytes() / 2**20,
                    "fp32_accuracy": evaluator.baseline.comparison.accuracy})
    session = Session(evaluator)
    middle = [layer.name for layer in evaluator.layers if layer.block == evaluator.stages.n_blocks // 2]
    head = evaluator.layers[-1].name
    plans = [Plan(rules=((middle[-1], "int8"),)), Plan(rules=((middle[-1], "int8"), (middle[0], "int8"))),
             Plan(rules=((middle[-1], "int8"), (middle[0], "int8"), (head, "int8")))]
    for step, plan in enumerate(plans, 1):
        started = time.perf_counter()
        result = session.update(plan)
        figures[f"toggle_{step}_s"] = time.perf_counter() - started
        figures[f"toggle_{step}_start_cut"] = result.start_cut
        figures[f"toggle_{step}_accuracy"] = result.comparison.accuracy
    figures.update({"session_states_mb": session.owned_bytes() / 2**20, "peak_rss_mb": peak_rss_mb(),
                    "threads": torch.get_num_threads(), "load_after": load_average()})
    print(json.dumps(figures, indent=1, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
