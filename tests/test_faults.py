"""Faults a shared server survives: kill -9 while the cache writes (an entry is whole or absent), a damaged entry
(dropped and recomputed, never returned), a full disk (one warning, nothing stored lost, work goes on), a killed or
damaged export (rebuilt), a failing job (one line to its own session, the queue serves the others) and a session
that has gone (its queued work dropped)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import cache
from benchmarks.fault_injection import EXPORTER, FILLER, WRITER, full_tmpfs, value
from service import scheduler as sched
from engine.core.errors import EngineError
from engine.evaluation.evaluator import Cancelled

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "engine-cache"
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(folder))
    monkeypatch.setitem(cache._write_problem, "line", None)
    return folder


def _entries(folder: Path) -> dict[str, object]:
    """Every key the store holds, read as the server reads them after a restart."""
    keys = [row[0] for row in sqlite3.connect(folder / "cache.db").execute("SELECT key FROM Cache")]
    return {key: cache.lookup(key, cache.MISSING) for key in keys}


@pytest.mark.parametrize("mode", ["mid-file", "before-commit", "random"])
def test_kill_9_while_writing_leaves_every_entry_whole_or_absent(cache_dir, mode, caplog):
    env = {**os.environ, "ENGINE_CACHE_DIR": str(cache_dir)}
    child = subprocess.Popen([sys.executable, "-c", WRITER, mode, "41" if mode != "random" else "-1"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done = []
    for line in child.stdout:
        done.append(int(line))
        if mode == "random" and len(done) >= 60:
            child.send_signal(signal.SIGKILL)  # at whatever write it is in
            break
    assert child.wait(60) == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="cache"):
        found = _entries(cache_dir)
    assert all(entry == value(int(key[1:])) for key, entry in found.items())  # whole...
    assert all(cache.lookup(f"k{i}") == value(i) for i in done)  # ...and nothing acknowledged lost
    in_flight = done[-1] + 1
    if mode != "random":
        assert f"k{in_flight}" not in found and in_flight == 41  # absent, and recomputed on demand:
    assert cache.remember(f"k{in_flight}", lambda: value(in_flight)) == value(in_flight)
    assert cache.lookup(f"k{in_flight}") == value(in_flight)
    assert not caplog.records


def _value_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*.val")]


def test_a_truncated_or_damaged_entry_is_dropped_and_recomputed(cache_dir, caplog):
    cache.put("big", value(1))  # a file under the cache folder
    cache.put("small", value(2))  # a row in the database
    cache.store().set("legacy", {"blob": b"x" * 50_000})  # a plain pickle, as stored before checksums
    files = _value_files(cache_dir)
    assert len(files) == 2
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with sqlite3.connect(cache_dir / "cache.db") as db:
        (blob,) = db.execute("SELECT value FROM Cache WHERE key = 'small'").fetchone()
        damaged = bytearray(blob)
        damaged[-5] ^= 0xFF
        db.execute("UPDATE Cache SET value = ? WHERE key = 'small'", (bytes(damaged),))
    with caplog.at_level(logging.WARNING, logger="cache"):
        for key in ("big", "small", "legacy"):
            assert cache.lookup(key, "absent") == "absent"  # never the damaged value
            assert key not in cache.store()  # dropped
            assert cache.remember(key, lambda: "recomputed") == "recomputed"
            assert cache.lookup(key) == "recomputed"
    assert sum("corrupt" in record.getMessage() for record in caplog.records) == 3


def test_a_full_disk_costs_one_warning_and_nothing_stored(cache_dir, monkeypatch, caplog):
    """ENOSPC raised by the value file's write (as a full file system raises it); the real one is below."""
    import errno

    import diskcache

    cache.put("before", value(1))

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", full)
    with caplog.at_level(logging.WARNING, logger="cache"):
        results = [cache.remember(f"new{i}", lambda i=i: value(i)) for i in range(3, 13, 2)]
    assert results == [value(i) for i in range(3, 13, 2)]  # the work goes on without the cache
    assert [record.getMessage() for record in caplog.records if "full" in record.getMessage()] and \
        len(caplog.records) == 1
    assert "disk is full" in cache.problem()
    assert cache.lookup("before") == value(1)  # nothing stored is lost
    monkeypatch.undo()
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(cache, "RETRY_WRITES_S", 0.0)
    cache.put("after", value(3))  # the disk has room again: writes resume, the line goes
    assert cache.problem() is None and cache.lookup("after") == value(3)


def test_a_real_full_file_system_for_the_cache(tmp_path):
    """A 1 MB tmpfs for the cache folder, in a private mount namespace (skipped where one cannot be made)."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare to make a private tmpfs")
    folder = tmp_path / "tiny"
    folder.mkdir()
    run = full_tmpfs(folder, FILLER, {**os.environ, "ENGINE_CACHE_DIR": str(folder / "cache")})
    if run.returncode != 0 and "mount" in run.stderr + run.stdout and "computed" not in run.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()[:200]}")
    import json

    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["computed"] and outcome["kept"] == {"kept": True} and "disk is full" in outcome["problem"]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING cache")]
    assert len(warnings) == 1, run.stderr


def test_a_failing_job_reaches_only_its_session_in_one_line():
    queue = sched.Scheduler(workers=1, threads=1)

    def bug(job):
        raise ValueError("a bug\nwith a second line")

    def oom(job):
        raise MemoryError()

    failing = queue.submit("alice", "layer-map", bug, label="Evaluating the plan")
    starved = queue.submit("carol", "layer-map", oom, label="Evaluating")
    refused = queue.submit("dave", "layer-map", lambda job: (_ for _ in ()).throw(EngineError("bad plan")))
    served = queue.submit("bob", "layer-map", lambda job: 42)
    assert served.done_event.wait(10) and failing.done and starved.done and refused.done
    assert served.error is None and served.result == 42
    assert isinstance(failing.error, sched.JobFailed) and isinstance(failing.error, EngineError)
    assert str(failing.error) == "Evaluating the plan failed: ValueError: a bug"
    assert str(starved.error) == "Evaluating ran out of memory"
    assert type(refused.error) is EngineError and str(refused.error) == "bad plan"  # already one line: as it was
    assert queue.submit("alice", "layer-map", lambda job: "again").done_event.wait(10)  # the worker lives on


def test_a_gone_sessions_queued_work_is_dropped(monkeypatch):
    monkeypatch.setattr(sched, "ORPHAN_S", 0.3)
    monkeypatch.setattr(sched, "REAP_EVERY_S", 0.05)
    queue, gate = sched.Scheduler(workers=1, threads=1), threading.Event()
    blocker = queue.submit("server", "evaluator", lambda job: gate.wait(10))
    jobs = {}

    def session(name: str, tag: str):  # a script thread that submits and ends (a closed browser)
        jobs[name] = queue.submit(name, "layer-map", lambda job: name, tag=tag)

    for name in ("gone", "rerun"):
        thread = threading.Thread(target=session, args=(name, "t"))
        thread.start()
        thread.join()
    stays = queue.submit("here", "layer-map", lambda job: "here", tag="t")  # this thread waits for it
    time.sleep(0.15)
    assert queue.submit("rerun", "layer-map", lambda job: "new", tag="t") is jobs["rerun"]  # a rerun finds its job
    time.sleep(0.6)
    gate.set()
    assert stays.done_event.wait(10) and jobs["rerun"].done_event.wait(10)
    assert isinstance(jobs["gone"].error, Cancelled) and "gone" in str(jobs["gone"].error)
    assert jobs["rerun"].result == "rerun" and stays.result == "here"
    assert blocker.done


def test_kill_9_during_an_export_and_a_damaged_export_are_rebuilt(tmp_path):
    import onnxruntime as ort
    import zoo

    from engine.analysis.deploy import Exports
    from engine.model.loading import load_model

    folder, root = zoo.save("bert", tmp_path / "bert"), tmp_path / "exports"
    child = subprocess.run([sys.executable, "-c", EXPORTER, str(folder), str(root)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    whole = Path(child.stdout.strip())
    shown = [path for path in root.iterdir() if not path.name.startswith(".")]
    assert shown == [whole] and Exports.whole(whole)  # the finished export, and nothing half-written shown
    ort.InferenceSession(str(whole / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [path for path in root.iterdir() if ".partial-" in path.name]  # the killed one, out of sight
    exports = Exports(root)
    exports.sweep(stale_s=0.0)  # a restart clears what the dead process left
    assert sorted(path.name for path in root.iterdir()) == [whole.name]
    model, tokenizer = load_model(str(folder))
    rebuilt = exports.folder(model, tokenizer, "int8")  # what is missing is made again
    assert Exports.whole(rebuilt) and rebuilt != whole
    onnx = whole / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])  # damaged after the fact
    assert not Exports.whole(whole)
    assert exports.folder(model, tokenizer, "fp32") == whole and Exports.whole(whole)
    ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
