"""`python -m engine COMMAND ... [--json]`: the contract's commands, thin over the engine's functions.

With --json each command prints exactly one JSON document on stdout; logs go to stderr. Bad input
(a plan, a model, a data set, a device) exits with code 2 and one line on stderr, no traceback.
Only the chosen command's module is imported, and those modules import the engine when they run,
so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one line of help); the modules hold each command's arguments and run function
COMMANDS = {
    "layers": ("engine.cli.inspect", "the quantizable layers: name, block, role, shape, params"),
    "eval": ("engine.cli.evaluate", "accuracy with 95%% CI, agreement, flips, KL and McNemar p against FP32"),
    "predict": ("engine.cli.evaluate", "label, confidence and every class's probability for any text(s) under a plan"),
    "perturb": ("engine.cli.evaluate", "typos of one kind at a rate, deterministic for a seed, with the edits made"),
    "bench": ("engine.cli.bench", "latency and throughput on real kernels (or `bench toggle`: the layer map's update)"),
    "compare": ("engine.cli.compare", "plans side by side on several sets: accuracy, McNemar, KL, size, latency"),
    "smoothquant": ("engine.cli.smoothquant", "W8A8 accuracy with SmoothQuant at each alpha, against W8A8 without it"),
    "sensitivity": ("engine.cli.sweep", "each layer alone (or all but it) at int8/int4: accuracy, CI, flips, KL, SQNR"),
    "search": ("engine.cli.sweep", "the smallest verified plan for an accuracy budget (or the best for a size)"),
    "diagnose": ("engine.cli.diagnose", "where a plan's error enters: each op's local and accumulated SQNR vs FP32"),
    "export": ("engine.cli.export", "a plan as a folder ONNX Runtime serves, with a model card measured here"),
    "grid": ("engine.cli.grid", "many (model, set, plan) evaluations and sensitivity rows, locally or on Ray"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"))
        if name == chosen:
            module = importlib.import_module(module_name)
            module.setup(name, child)
        child.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    from engine.cli.common import execute

    return execute(lambda: module.run(args.command, args), args.json)
