"""`python -m engine grid ...`: evaluations and sensitivity rows over many models, sets and plans.

`setup(parser)` adds the arguments and `run(args)` returns the JSON value (one row per task), like the
commands of engine/cli.py, so the command registers with `command("grid", HELP, setup)(run)`. This module
sits in the CLI layer: it builds the grid's `lookup` and `store` on the `cache` package (the engine's
grid never imports it). `python -m engine.cli_grid ...` runs the command on its own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings

HELP = "many (model, set, plan) evaluations and sensitivity rows, locally or on a Ray cluster; memoized, resumable"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="embedded", help="comma-separated: embedded, hub ids, local folders")
    parser.add_argument("--data", default="embedded", help="comma-separated: embedded, amazon, tweets, nyt, sst2, .csv")
    parser.add_argument("--plans", default="fp32,int8,int4",
                        help="comma-separated plans: precisions, int8-linear, inline JSON or .json files; "
                             "'' for none (sensitivity rows only)")
    parser.add_argument("--sensitivity", default="", help="comma-separated precisions (int8,int4): add a "
                        "sensitivity row per layer of each model at each (direction one)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples of each set")
    parser.add_argument("--latency", action="store_true",
                        help="also time each plan on real kernels (batch 1, 32 tokens) on the worker that ran it")
    parser.add_argument("--kernels", default="simulated", choices=("simulated", "real"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="local", choices=("local", "ray"))
    parser.add_argument("--address", default=None,
                        help="the Ray cluster (host:port) for --backend ray; default RAY_ADDRESS, else a local "
                             "cluster on 127.0.0.1 is started and stopped afterwards")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch threads per worker (Ray: CPUs per actor); default: local all, Ray 1")
    parser.add_argument("--replicas", type=_positive_int, default=1,
                        help="Ray actors per (model, set): spreads one large group over several workers")
    parser.add_argument("--num-cpus", type=_positive_int, default=None,
                        help="CPUs of a local Ray cluster started by the grid (default: all)")
    parser.add_argument("--retries", type=int, default=3,
                        help="Ray: restarts of a dead worker and reruns of its tasks before a row says it failed")
    parser.add_argument("--out", default=None, help="JSONL file: rows appended as they finish; a rerun resumes from it")


# ---- the cache side -------------------------------------------------------------------------
def cache_functions():
    """`lookup(task)` and `store(task, row)` on the disk cache, under the keys of engine.grid.tasks."""
    import cache
    from engine.grid import tasks as grid

    def lookup(task):
        namespace, parts = grid.cache_parts(task, task.model_fp, task.data_fp)
        found = cache.lookup(cache.make_key(namespace, **parts))
        if found is not None:
            return found
        pages = grid.page_parts(task, task.model_fp, task.data_fp)
        if not pages:
            return None
        return grid.figures_from_pages(task, {ns: cache.lookup(cache.make_key(ns, **p)) for ns, p in pages.items()})

    def store(task, row):
        entries = [(*grid.cache_parts(task, task.model_fp, task.data_fp), grid.cache_value(task, row))]
        pages = grid.page_parts(task, task.model_fp, task.data_fp)
        entries += [(ns, pages[ns], value) for ns, value in grid.page_values(task, row).items() if ns in pages]
        disk = cache.store()
        for namespace, parts, value in entries:
            disk.set(cache.make_key(namespace, **parts), value)

    return lookup, store


# ---- the command ----------------------------------------------------------------------------
def make_backend(args: argparse.Namespace):
    from engine.grid.local import LocalBackend
    from engine.grid.tasks import GridError

    if args.backend == "local":
        if args.address:
            raise GridError("--address is for --backend ray")
        return LocalBackend(threads=args.threads)
    try:
        from engine.grid.ray_backend import RayBackend
    except ImportError as error:
        raise GridError(f"--backend ray needs Ray (pip install 'ray[default]==2.60.0'): {error}") from None
    return RayBackend(address=args.address, threads=args.threads or 1, replicas=args.replicas, num_cpus=args.num_cpus,
                      max_restarts=max(args.retries, 0), max_task_retries=max(args.retries, 0))


def run(args: argparse.Namespace) -> list[dict]:
    from engine.cli import UsageError
    from engine.evaluation import resolve_device
    from engine.grid.run import run_grid
    from engine.grid.tasks import GridError, build_tasks, split_items

    resolve_device(args.device)  # a missing GPU is one line before anything loads
    try:
        backend = make_backend(args)
        tasks = build_tasks(split_items(args.models), split_items(args.data), split_items(args.plans),
                            split_items(args.sensitivity), args.limit, args.latency, args.kernels, args.device)
    except GridError as error:  # engine.cli reports a UsageError in one line, exit 2
        raise UsageError(str(error)) from None
    print(f"grid: {len(tasks)} tasks on the {args.backend} backend", file=sys.stderr, flush=True)
    step = max(1, len(tasks) // 20)

    def progress(done: int, total: int, row: dict) -> None:
        if row.get("error"):
            print(f"grid: {row['model']} / {row['data']}: error: {row['error']}", file=sys.stderr, flush=True)
        if done % step == 0 or done == total:
            print(f"[{done / total:4.0%}] grid: {done}/{total} rows", file=sys.stderr, flush=True)

    lookup, store = cache_functions()
    # Ray's driver prints the cluster's messages (a worker died, a task is retried) on stdout from a thread of
    # its own; --json promises one document there, so everything printed during the run goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            rows = run_grid(tasks, backend, lookup, store, args.out, progress)
        except GridError as error:  # no cluster to run on
            raise UsageError(str(error)) from None
    s = rows.stats
    line = (f"grid: {s['tasks']} rows: {s['from_cache']} from the cache, {s['from_out']} from {args.out or 'no file'}, "
            f"{s['computed']} computed ({s['errors']} failed)")
    if s["computed"]:
        line += f" in {s['wall_s']:.1f} s on {s['workers']} worker(s)"
    if s.get("task_s_mean") is not None:
        line += f"; {s['task_s_mean']:.3f} s a task, overhead {s.get('overhead_per_task_s', 0):.3f} s a task"
    print(line, file=sys.stderr, flush=True)
    return list(rows)


def main(argv: list[str] | None = None) -> int:
    """The command on its own, with the error handling of engine/cli.py (exit 2 and one line for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m engine.cli_grid", description=HELP)
    setup(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.cli import UsageError, _jsonable
    from engine.data import DataError
    from engine.evaluation import EvalError
    from engine.grid.tasks import GridError
    from engine.layers import UnsupportedModel
    from engine.models import ModelError
    from engine.plan import PlanError

    try:
        result = run(args)
    except (PlanError, DataError, EvalError, ModelError, UnsupportedModel, GridError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished rows are in the cache (and in --out); rerun to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(_jsonable(result), ensure_ascii=False))
    else:
        for row in result:
            print(json.dumps(_jsonable(row), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
