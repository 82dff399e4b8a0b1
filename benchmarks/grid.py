"""The grid's figures for docs/grid.md: the same grids on the local backend and on Ray (2 workers).

    HF_HUB_OFFLINE=1 python benchmarks/grid.py            # the full measurement (about 15 minutes on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/grid.py --quick    # the same runs on 48 sentences per set

Two grids of the embedded model, computed cold (no cache, no output file):
- evals: sets embedded and amazon x plans fp32, int8, int8-linear, int4 (8 tasks of seconds each, 2 groups);
- sensitivity: one int8 row per layer on the first 256 embedded sentences (39 short tasks in one group,
  run on Ray with one actor for the group, and with 2, --replicas 2).
Each runs on the local backend with 1 and 2 torch threads and on a local Ray cluster of 2 one-thread
workers (the cluster is started once, beforehand: its start-up is reported on its own, like `ray start`),
interleaved, for `--rounds` rounds.
Prints a Markdown table and the Ray call round trip; writes everything to benchmarks/out/grid.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def grids(limit_evals: int | None, limit_sensitivity: int):
    from engine.grid.tasks import build_tasks

    return {
        "evals": build_tasks(["embedded"], ["embedded", "amazon"], ["fp32", "int8", "int8-linear", "int4"],
                             limit=limit_evals),
        "sensitivity": build_tasks(["embedded"], ["embedded"], [], ["int8"], limit=limit_sensitivity),
    }


def measure(name: str, tasks, backend) -> dict:
    from engine.grid.run import run_grid

    before = loadavg()
    started = time.perf_counter()
    rows = run_grid(tasks, backend)
    wall = time.perf_counter() - started
    stats = dict(rows.stats)
    stats.update({"grid": name, "threads": getattr(backend, "threads", None), "end_to_end_s": round(wall, 3),
                  "loadavg_before": before, "loadavg_after": loadavg(),
                  "replicas": getattr(backend, "replicas", None)})
    assert stats["errors"] == 0, [row.error for row in rows if row.error]
    print(f"{name:12s} {backend.name:5s} threads={stats['threads']} workers={stats['workers']}: "
          f"{stats['computed']} tasks in {stats['wall_s']:.1f} s, {stats['task_s_mean']:.3f} s a task, "
          f"overhead {stats['overhead_per_task_s']:.3f} s a task, load {before} -> {stats['loadavg_after']}",
          file=sys.stderr, flush=True)
    return {"stats": stats, "rows": [{k: v for k, v in row.to_json().items() if k != "worker"} for row in rows]}


class Echo:
    """A no-op actor: the Ray call round trip without any evaluation."""

    def ping(self, payload=None):
        return payload


def round_trip(calls: int = 200) -> dict:
    import ray

    actor = ray.remote(Echo).options(num_cpus=1).remote()
    ray.get(actor.ping.remote())
    one = []
    for _ in range(calls):
        t0 = time.perf_counter()
        ray.get(actor.ping.remote())
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ray.get([actor.ping.remote() for _ in range(calls)])
    pipelined = (time.perf_counter() - t0) / calls
    row = {"accuracy": 0.85, "ci95": [0.82, 0.87], "plan": {"*": "int8"}, "seconds": 1.0}  # a row-sized payload
    t0 = time.perf_counter()
    ray.get([actor.ping.remote(row) for _ in range(calls)])
    with_row = (time.perf_counter() - t0) / calls
    ray.kill(actor)
    return {"sequential_ms_median": 1e3 * statistics.median(one), "pipelined_ms": 1e3 * pipelined,
            "pipelined_row_ms": 1e3 * with_row, "calls": calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 sentences per set: a smoke run of the script")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "grid.json"))
    parser.add_argument("--local-threads", default="1,2", type=lambda text: [int(x) for x in text.split(",")],
                        help="torch threads of the local runs (default 1,2)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat local and Ray runs, interleaved")
    args = parser.parse_args()

    import ray
    import torch

    from engine.grid.local import LocalBackend
    from engine.grid.ray_backend import RayBackend, start_local_cluster, stop_local_cluster

    plans = grids(48 if args.quick else None, 48 if args.quick else 256)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
               "quick": args.quick, "runs": []}
    t0 = time.perf_counter()
    temp_dir = start_local_cluster(num_cpus=2)
    try:
        results["ray_cluster_start_s"] = round(time.perf_counter() - t0, 2)
        results["round_trip"] = round_trip()
        # Local and Ray runs interleaved, round after round, so a load that drifts hits both alike.
        for _ in range(args.rounds):
            for name, tasks in plans.items():
                for threads in args.local_threads:
                    results["runs"].append(measure(name, tasks, LocalBackend(threads=threads)))
                # One actor per group; the sensitivity grid (one group) also with 2 actors, so that one run
                # has a single Ray worker (its per-task time against the local one's: Ray's own cost) and
                # one has both cores busy (the speed-up, and the contention, of a second worker).
                for replicas in ((1, 2) if name == "sensitivity" else (1,)):
                    results["runs"].append(measure(name, tasks, RayBackend(threads=1, replicas=replicas)))
    finally:
        stop_local_cluster(temp_dir)

    # The same figures from every backend: the grid is exact, whoever runs it. Compared with the local
    # one-thread run; a field that differs is named (the SQNR proxy's float sums depend on the thread count).
    volatile = {"seconds", "task_s", "backend", "cached"}
    reference = {run["stats"]["grid"]: run["rows"] for run in reversed(results["runs"])
                 if run["stats"]["backend"] == "local" and run["stats"]["threads"] == 1}
    for run in results["runs"]:
        differing = sorted({k for a, b in zip(reference[run["stats"]["grid"]], run["rows"])
                            for k in set(a) | set(b) if k not in volatile and a.get(k) != b.get(k)})
        run["stats"]["fields_differing_from_local_1_thread"] = differing
    results["ray_rows_equal_local"] = all(not run["stats"]["fields_differing_from_local_1_thread"]
                                          for run in results["runs"] if run["stats"]["backend"] == "ray")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("| grid | backend | threads x workers | tasks | wall s | tasks/s | mean task s | overhead s/task | "
          "start-up s (first task) | dispatch gap ms | load before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        s = run["stats"]
        gap = "-" if s["gap_s_median"] is None else f"{1e3 * s['gap_s_median']:.1f}"
        print(f"| {s['grid']} | {s['backend']}{' x%d/group' % s['replicas'] if s['replicas'] else ''} | "
              f"{s['threads']} x {s['workers']} | {s['computed']} | {s['wall_s']:.1f} | {s['tasks_per_s']:.3f} | "
              f"{s['task_s_mean']:.3f} | {s['overhead_per_task_s']:.3f} | "
              f"{', '.join(f'{x:.1f}' for x in s['startup_s'])} | {gap} | "
              f"{s['loadavg_before'][0]:.1f} -> {s['loadavg_after'][0]:.1f} |")
    rt = results["round_trip"]
    print(f"\nRay cluster start: {results['ray_cluster_start_s']} s; actor call round trip: "
          f"{rt['sequential_ms_median']:.2f} ms one at a time, {rt['pipelined_ms']:.3f} ms pipelined, "
          f"{rt['pipelined_row_ms']:.3f} ms with a row-sized payload; Ray rows equal the local ones: "
          f"{results['ray_rows_equal_local']}")
    for run in results["runs"]:
        if run["stats"]["fields_differing_from_local_1_thread"]:
            print(f"{run['stats']['grid']} on {run['stats']['backend']} with {run['stats']['threads']} threads differs "
                  f"from local 1 thread in: {', '.join(run['stats']['fields_differing_from_local_1_thread'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
