"""`grid`: evaluations and sensitivity rows over many models, sets and plans, locally or on a Ray
cluster, memoized in the pages' cache entries and resumable from the cache or its --out file."""
from __future__ import annotations

import contextlib
import sys

from engine.cli.common import UsageError, positive_int
from engine.core.vocabulary import TIMING_TOKENS, Kernels, names


def setup(name: str, parser) -> None:
    parser.add_argument("--models", default="embedded", help="comma-separated: embedded, hub ids, local folders")
    parser.add_argument("--data", default="embedded",
                        help="comma-separated: embedded, amazon, tweets, nyt, sst2 or .csv paths")
    parser.add_argument("--plans", default="fp32,int8,int4",
                        help="comma-separated plans: presets, inline JSON or .json files; '' for none")
    parser.add_argument("--sensitivity", default="",
                        help="comma-separated precisions (int8,int4): a row per layer of each model at each")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples of each set")
    parser.add_argument("--latency", action="store_true",
                        help=f"also time each plan on real kernels (batch 1, {TIMING_TOKENS} tokens) on the worker "
                             "that ran it")
    parser.add_argument("--kernels", default=Kernels.SIMULATED, choices=names(Kernels))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="local", choices=("local", "ray"))
    parser.add_argument("--address", default=None,
                        help="the Ray cluster (host:port) for --backend ray; default RAY_ADDRESS, else a cluster "
                             "on 127.0.0.1 is started and stopped afterwards")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per worker (Ray: CPUs per actor); default: local all, Ray 1")
    parser.add_argument("--replicas", type=positive_int, default=1,
                        help="Ray actors per (model, set): spreads one large group over several workers")
    parser.add_argument("--num-cpus", type=positive_int, default=None,
                        help="CPUs of a local Ray cluster started by the grid (default: all)")
    parser.add_argument("--retries", type=int, default=3,
                        help="Ray: restarts of a dead worker and reruns of its tasks before a row says it failed")
    parser.add_argument("--out", default=None, help="JSONL file: rows appended as they finish; a rerun resumes from it")


def make_backend(args):
    from engine.grid.local import LocalBackend

    if args.backend == "local":
        if args.address:
            raise UsageError("--address is for --backend ray")
        return LocalBackend(threads=args.threads)
    try:
        from engine.grid.ray_backend import RayBackend
    except ImportError as error:
        raise UsageError(f"--backend ray needs Ray (pip install 'ray[default]==2.60.0'): {error}") from None
    return RayBackend(address=args.address, threads=args.threads or 1, replicas=args.replicas, num_cpus=args.num_cpus,
                      max_restarts=max(args.retries, 0), max_task_retries=max(args.retries, 0))


def summary_line(stats: dict, out: str | None) -> str:
    line = f"grid: {stats['tasks']} rows: {stats['from_cache']} from the cache, "
    if out:
        line += f"{stats['from_out']} from {out}, "
    line += f"{stats['computed']} computed ({stats['errors']} failed)"
    if stats["computed"]:
        line += f" in {stats['wall_s']:.1f} s on {stats['workers']} worker(s)"
    if stats.get("task_s_mean") is not None:
        line += (f"; {stats['task_s_mean']:.3f} s a task, overhead {stats.get('overhead_per_task_s', 0):.3f} s "
                 "a task")
    return line


def run(name: str, args):
    from cache import grid as cached
    from engine.grid.run import run_grid
    from engine.grid.tasks import build_tasks, split_items

    backend = make_backend(args)
    tasks = build_tasks(split_items(args.models), split_items(args.data), split_items(args.plans),
                        split_items(args.sensitivity), args.limit, args.latency, args.kernels, args.device)
    print(f"grid: {len(tasks)} tasks on the {args.backend} backend", file=sys.stderr, flush=True)
    step = max(1, len(tasks) // 20)

    def progress(done: int, total: int, row) -> None:
        if row.error:
            print(f"grid: {row.model} / {row.data}: error: {row.error}", file=sys.stderr, flush=True)
        if done % step == 0 or done == total:
            print(f"[{done / total:4.0%}] grid: {done}/{total} rows", file=sys.stderr, flush=True)

    # Ray's driver prints the cluster's notices (a worker died, a task is retried) on stdout from a thread of
    # its own; --json promises one document there, so everything printed during the run goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            rows = run_grid(tasks, backend, cached.find, cached.keep, args.out, progress)
        except KeyboardInterrupt:
            print("grid: finished rows are in the cache (and in --out): run it again to resume", file=sys.stderr)
            raise
    print(summary_line(rows.stats, args.out), file=sys.stderr, flush=True)
    return [row.to_json() for row in rows]
