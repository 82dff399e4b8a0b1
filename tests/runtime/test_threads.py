"""A session's own thread keeps torch on one core, so that it never leaves an OpenMP pool alive next to the
queue's worker (libgomp then makes every team sleep at each barrier); the worker keeps its threads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a fresh process: the OpenMP pools of the test session's own threads would blur the thread counts.
SCRIPT = """
import json, os, sys, threading
sys.path.insert(0, {root!r})
import torch
from service.scheduler import Scheduler
from engine.runtime.threads import single_core_here

torch.set_num_threads(2)
x = torch.randn(3000, 1000)

def native_threads():
    return len(os.listdir("/proc/self/task"))

def work(guarded, out):
    if guarded:
        out["set"] = single_core_here()
    before = native_threads()
    torch.softmax(x, -1)
    x @ x.T  # MKL's parallel region as well as torch's own
    out.update(new_threads=native_threads() - before, torch_threads=torch.get_num_threads())
    if guarded:  # work this thread queues still runs on the scheduler's threads
        job = Scheduler(workers=1, threads=2).submit("test", "count", lambda job: torch.get_num_threads())
        job.done_event.wait()
        out["worker_threads"] = job.result

found = {{}}
for guarded in (True, False):
    out = {{}}
    thread = threading.Thread(target=work, args=(guarded, out))
    thread.start()
    thread.join()
    found["guarded" if guarded else "plain"] = out
found["main_threads"] = torch.get_num_threads()
print(json.dumps(found))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc (Linux)")
def test_a_single_core_thread_starts_no_pool_and_other_threads_keep_their_count():
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], check=True, capture_output=True,
                         text=True)
    found = json.loads(run.stdout.strip().splitlines()[-1])
    guarded, plain = found["guarded"], found["plain"]
    assert guarded["set"] is True
    assert guarded["new_threads"] == 0 and guarded["torch_threads"] == 1
    assert plain["new_threads"] >= 1 and plain["torch_threads"] == 2  # the same work without it starts a pool
    assert guarded["worker_threads"] == 2 and found["main_threads"] == 2
