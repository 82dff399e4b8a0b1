"""The grid (issue 16): its rows are `eval`'s and `sensitivity`'s, it resumes from the cache and from its
output file, a failing task's row says why, and on a Ray cluster (started here on 127.0.0.1 with 2 CPUs,
stopped after) its rows equal the local backend's, even when a worker process is killed mid-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _tiny

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 24
BAD_PLAN = '{"bert.encoder.*": "int8"}'  # fits the BERT model, matches no layer of the DistilBERT one
VOLATILE = {"seconds", "task_s", "worker", "backend", "cached"}  # who ran a row and how long it took
EVAL_FIELDS = ("accuracy", "ci95", "n", "agreement", "flips", "kl", "mcnemar_p", "size_bytes", "plan", "kernels",
               "device")


def figures(row) -> dict:
    """A row's contract object, less who ran it and how long it took."""
    return {k: v for k, v in row.to_json().items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict[str, str]:
    """Tiny random BERT and DistilBERT classifiers saved as local model folders, with the embedded tokenizer."""
    out = {}
    for family in ("bert", "distilbert"):
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        _tiny(family).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[family] = str(folder)
    return out


@pytest.fixture(scope="module")
def tasks(folders):
    """2 models x 2 sets x 4 plans (one failing on DistilBERT), and an int8 sensitivity row per layer."""
    from engine.grid.tasks import build_tasks

    return build_tasks([folders["bert"], folders["distilbert"]], ["embedded", "amazon"],
                       ["fp32", "int8", "int4", BAD_PLAN], ["int8"], limit=LIMIT)


@pytest.fixture(scope="module")
def local_rows(tasks):
    from engine.grid.local import LocalBackend
    from engine.grid.run import run_grid

    return run_grid(tasks, LocalBackend(threads=1))


def _by_key(rows):
    return {row.key: row for row in rows}


# ---- what a row holds -----------------------------------------------------------------------
def test_eval_rows_are_what_evaluate_returns(folders, tasks, local_rows):
    from engine import evaluate, load_model

    model, tokenizer = load_model(folders["bert"])
    for task, row in zip(tasks, local_rows):
        if task.kind == "eval" and task.model == folders["bert"] and task.data == "amazon":
            expected = evaluate(model, tokenizer, "amazon", json.loads(task.plan), limit=LIMIT)
            assert {k: row.to_json()[k] for k in EVAL_FIELDS} == {k: expected[k] for k in EVAL_FIELDS}, task.plan_name
            assert (row.model, row.data, row.backend, row.limit) == \
                (folders["bert"], "amazon", "local", LIMIT)


def test_sensitivity_rows_are_what_the_sweep_gives(folders, tasks, local_rows):
    from engine import load_dataset, load_model
    from engine.analysis.sensitivity import proxy_texts, sqnr_proxy, sweep
    from engine.evaluation.evaluate import get_evaluator

    model, tokenizer = load_model(folders["distilbert"])
    evaluator = get_evaluator(model, tokenizer, load_dataset("embedded").head(LIMIT), keep_states=True)
    sqnr = sqnr_proxy(model, tokenizer, proxy_texts(evaluator), ["int8"])
    expected = {(r.layer, r.precision): r.to_json() for r in sweep(evaluator, ["int8"], "one", sqnr).rows}
    got = {(row.layer, row.precision): row.to_json() for task, row in zip(tasks, local_rows)
           if task.kind == "sensitivity" and task.model == folders["distilbert"] and task.data == "embedded"}
    assert got.keys() == expected.keys() and len(got) == 15
    for key, row in expected.items():
        assert {k: got[key][k] for k in row if k != "seconds"} == {k: v for k, v in row.items() if k != "seconds"}


def test_a_failing_task_has_a_one_line_error_and_the_rest_run(folders, tasks, local_rows):
    assert len(local_rows) == len(tasks)
    failed = [row for row in local_rows if row.error]
    assert {(row.model, row.plan_name) for row in failed} == {(folders["distilbert"], BAD_PLAN)}
    assert len(failed) == 2  # one per set
    for row in failed:
        assert "matches no layer" in row.error and "\n" not in row.error and row.accuracy is None
        assert list(row.to_json()) == ["kind", "model", "data", "limit", "plan_name", "worker", "task_s", "backend",
                                       "key", "error"]
    assert all(row.accuracy is not None for row in local_rows if not row.error)


def test_a_row_reads_back_from_its_json_as_it_was(local_rows):
    """What --out keeps is what a resumed run reads: every kind of row (evaluation, sensitivity, failed) comes back
    equal, as its own type, with the same contract object."""
    from engine.grid.rows import EvalRow, GridRow, SensitivityRow

    assert {type(row) for row in local_rows} == {EvalRow, SensitivityRow} and any(row.error for row in local_rows)
    for row in local_rows:
        again = GridRow.from_json(json.loads(json.dumps(row.to_json())))
        assert type(again) is type(row) and again == row and again.to_json() == row.to_json()


def test_a_task_whose_worker_was_lost_names_no_worker(tasks):
    """Ray's answer when a worker died more often than it retries: the row keeps "worker": null, and no time."""
    from engine.grid.rows import make_row

    task = tasks[0]
    row = make_row(task, {"error": "worker lost after 3 retries: ActorDiedError", "worker": None}, "ray")
    assert row.to_json() == {"kind": "eval", "model": task.model, "data": task.data, "limit": LIMIT,
                             "plan_name": task.plan_name, "worker": None, "backend": "ray", "key": task.key(),
                             "error": "worker lost after 3 retries: ActorDiedError"}


def test_latency_is_measured_on_the_worker_with_its_machine(folders):
    from engine.grid.local import LocalBackend
    from engine.grid.run import run_grid
    from engine.grid.tasks import build_tasks

    task = build_tasks([folders["bert"]], ["embedded"], ["int8"], limit=LIMIT, latency=True)[0]
    row = run_grid([task], LocalBackend(threads=1))[0]
    assert row.latency_ms_p50 > 0 and row.latency_ms_p95 >= row.latency_ms_p50 and row.throughput_per_s > 0
    assert row.machine["threads"] == 1 and row.machine["host"] and row.machine["tokens"] == 32
    plain = build_tasks([folders["bert"]], ["embedded"], ["int8"], limit=LIMIT)[0]
    assert plain.key() != task.key()  # a row without latency never answers a task that asks for it


# ---- resume and the cache -------------------------------------------------------------------
class Counting:
    """A local backend that remembers how many tasks it was given."""

    def __init__(self):
        from engine.grid.local import LocalBackend

        self.inner, self.given = LocalBackend(threads=1), []
        self.name, self.workers, self.open_s = "local", 1, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def run(self, tasks):
        self.given += list(tasks)
        yield from self.inner.run(tasks)


def test_an_interrupted_run_resumes_from_the_cache_and_the_output_file(folders, tasks, local_rows, tmp_path):
    from engine.grid.run import run_grid

    chosen = [t for t in tasks if t.model == folders["bert"]]
    expected = [figures(row) for task, row in zip(tasks, local_rows) if task.model == folders["bert"]]
    memo: dict[str, dict] = {}
    lookup, store = (lambda task: memo.get(task.key())), (lambda task, row: memo.__setitem__(task.key(), row))
    out = tmp_path / "rows.jsonl"

    def stop_after_five(done, total, row):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_grid(chosen, Counting(), lookup, store, out, stop_after_five)
    assert len(memo) == 5 and len(out.read_text().splitlines()) == 5  # each row kept as it finished

    again = Counting()
    rows = run_grid(chosen, again, lookup, store, out)
    assert len(again.given) == len(chosen) - 5
    assert [figures(row) for row in rows] == expected
    assert sum(row.cached for row in rows) == 5
    assert [json.loads(line)["key"] for line in out.read_text().splitlines()] == [t.key() for t in chosen]

    # With the cache gone, the output file alone resumes the run: nothing is recomputed.
    memo.clear()
    third = Counting()
    rows = run_grid(chosen, third, lookup, store, out)
    assert third.given == [] and [figures(row) for row in rows] == expected


def test_rows_land_under_the_pages_cache_keys(folders, monkeypatch, tmp_path):
    """A sensitivity row is stored as the sensitivity page stores it, an evaluation as the layer map does,
    and the pages' own entries answer the grid."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    import cache
    from cache import grid as cached
    from cache import results
    from engine import load_dataset, load_model
    from engine.evaluation.evaluate import get_evaluator
    from engine.grid.local import LocalBackend
    from engine.grid.run import run_grid
    from engine.grid.tasks import build_tasks

    chosen = build_tasks([folders["bert"]], ["embedded"], ["int8"], ["int4"], limit=LIMIT)
    eval_task, layer_task = chosen[0], chosen[1]
    rows = run_grid([eval_task, layer_task], LocalBackend(threads=1), cached.find, cached.keep)

    model, tokenizer = load_model(folders["bert"])
    evaluator = get_evaluator(model, tokenizer, load_dataset("embedded").head(LIMIT), keep_states=True)
    page_rows = results.known_rows(evaluator, ["int4"], "one")
    page_row = page_rows[(layer_task.layer, "int4")].to_json()
    assert page_row == {k: rows[1].to_json()[k] for k in page_row}
    summary = results.cached_evaluation(evaluator, eval_task.plan_object)
    assert {k: summary.to_json()[k] for k in ("accuracy", "ci95", "n", "flips", "kl")} == \
        {k: rows[0].to_json()[k] for k in ("accuracy", "ci95", "n", "flips", "kl")}
    assert len(summary.predicted) == LIMIT and results.size(model, eval_task.plan_object) == rows[0].size_bytes

    # The layer map's own entries answer a grid task the grid never stored itself.
    cache.store().clear()
    results.evaluation(evaluator, eval_task.plan_object)
    results.size(model, eval_task.plan_object)
    again = Counting()
    rerun = run_grid([eval_task], again, cached.find, cached.keep)
    assert again.given == [] and rerun[0].accuracy == rows[0].accuracy and rerun[0].cached
    assert "worker" not in rerun[0].to_json() and "task_s" not in rerun[0].to_json()  # no worker ran it


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "engine", "grid", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "ENGINE_CACHE_DIR": str(tmp_path_factory.mktemp("grid-cache")), "PYTHONPATH": str(ROOT)}


def test_cli_bad_input_is_one_line_and_exit_2(env, folders):
    result = _cli(env, "--models", folders["bert"], "--plans", "int3", "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "int3" in result.stderr


# ---- Ray ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module: 2 CPUs, every server on 127.0.0.1, stopped even on failure."""
    pytest.importorskip("ray")
    from engine.grid.ray_backend import start_local_cluster, stop_local_cluster

    temp_dir = None
    try:
        temp_dir = start_local_cluster(num_cpus=2)
        yield
    finally:
        stop_local_cluster(temp_dir)


def test_ray_rows_equal_the_local_backends(ray_cluster, tasks, local_rows):
    from engine.grid.ray_backend import RayBackend
    from engine.grid.run import run_grid

    chosen = [(task, row) for task, row in zip(tasks, local_rows) if task.data == "embedded"]  # 2 groups, 1 each
    backend = RayBackend(threads=1)
    rows = run_grid([task for task, _ in chosen], backend)
    assert [figures(row) for row in rows] == [figures(row) for _, row in chosen]
    assert {row.backend for row in rows} == {"ray"}
    assert len({row.worker for row in rows}) == 2  # an actor per (model, set), each its own process
    assert backend.workers == 2 and rows.stats["errors"] == 1


def test_ray_a_killed_worker_loses_no_row(ray_cluster, folders, tasks, local_rows):
    from engine.grid.ray_backend import RayBackend
    from engine.grid.run import run_grid

    chosen = [t for t in tasks if t.model == folders["bert"] and t.kind == "sensitivity" and t.data == "amazon"]
    expected = {row.key: figures(row) for row in local_rows}
    killed: list[int] = []

    def kill_first_worker(done, total, row):
        if not killed and row.worker:  # the actor has 2 tasks queued: both must be rerun
            killed.append(int(row.worker.rsplit(":", 1)[1]))
            os.kill(killed[0], signal.SIGKILL)

    backend = RayBackend(threads=1)
    rows = run_grid(chosen, backend, progress=kill_first_worker)
    assert killed and len(rows) == len(chosen) and not [row for row in rows if row.error]
    assert [figures(row) for row in rows] == [expected[t.key()] for t in chosen]
    assert len({row.worker for row in rows}) == 2  # the restarted actor, a new process, finished the group
    assert [info["restarted"] for info in backend.actors_info] == [True]


def test_cli_on_ray_starts_and_stops_its_cluster_and_a_rerun_answers_from_the_cache(ray_cluster, env, folders,
                                                                                     tmp_path, monkeypatch):
    from cache import grid as cached
    from engine.grid.run import run_grid
    from engine.grid.tasks import build_tasks

    def servers() -> set[str]:
        listing = subprocess.run(["pgrep", "-f", "gcs_server"], check=False, capture_output=True, text=True).stdout
        return set(listing.split())

    before = servers()
    out = tmp_path / "rows.jsonl"
    result = _cli(env, "--models", folders["distilbert"], "--data", "embedded", "--plans", "fp32,int8", "--limit",
                  str(LIMIT), "--backend", "ray", "--num-cpus", "1", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert servers() <= before  # the cluster it started is gone
    rows = json.loads(result.stdout)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [(r["backend"], r["plan_name"], "error" in r) for r in rows] == \
        [("ray", "fp32", False), ("ray", "int8", False)]

    # A second run, here on the local backend, answers from the cache that the first one filled.
    monkeypatch.setenv("ENGINE_CACHE_DIR", env["ENGINE_CACHE_DIR"])
    again = Counting()
    rerun = run_grid(build_tasks([folders["distilbert"]], ["embedded"], ["fp32", "int8"], limit=LIMIT), again,
                     cached.find, cached.keep)
    assert again.given == [] and all(row.cached for row in rerun)
    assert [figures(row) for row in rerun] == [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]
