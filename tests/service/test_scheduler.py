"""The server's one queue: a timing (a yielding job) never holds back an evaluation queued after it."""
from __future__ import annotations

import threading

from service.scheduler import QUIET_S, Scheduler


def test_queued_evaluations_go_first_and_a_timing_waits_for_a_quiet_queue():
    scheduler, gate, order = Scheduler(workers=1, threads=1), threading.Event(), []

    def work(name: str, wait: bool = False):
        def run(job):
            if wait:
                gate.wait(10)
            order.append(name)
        return run

    first = scheduler.submit("a", "layer-map", work("first", wait=True))
    timing = scheduler.submit("b", "latency", work("timing"))
    second = scheduler.submit("c", "layer-map", work("second"))
    gate.set()
    assert timing.done_event.wait(10) and first.done and second.done
    assert order == ["first", "second", "timing"]  # submitted first, started last
    assert timing.started - second.finished >= 0.9 * QUIET_S


def test_a_timing_alone_starts_once_the_queue_has_been_quiet():
    scheduler = Scheduler(workers=1, threads=1)
    timing = scheduler.submit("a", "latency", lambda job: "timed")
    assert timing.done_event.wait(10) and timing.result == "timed"


def test_load_counts_running_and_queued_work():
    scheduler, started, gate = Scheduler(workers=1, threads=1), threading.Event(), threading.Event()

    def hold(job):
        started.set()
        gate.wait(10)

    assert scheduler.load().idle
    first = scheduler.submit("a", "layer-map", hold)
    second = scheduler.submit("b", "layer-map", lambda job: None)
    assert started.wait(10)
    load = scheduler.load()
    assert (load.running, load.queued, load.workers, load.threads, load.idle) == (1, 1, 1, 1, False)
    gate.set()
    assert first.done_event.wait(10) and second.done_event.wait(10)
    assert scheduler.load().idle
