"""Load test of the layer map (issue 15): N browser sessions clicking at once on one server.

    HF_HUB_OFFLINE=1 python benchmarks/load_test.py                    # 8 sessions x 3 clicks, embedded set
    python benchmarks/load_test.py --sessions 2 --clicks 2 --data small.csv [--model FOLDER]   # a smoke run

Starts the dashboard on a free 127.0.0.1 port with a cold cache (a fresh ENGINE_CACHE_DIR) and drives headless
Chromium through Playwright. First one session alone: the server's resident memory once it has settled (the
"idle one session" figure), then three clicks spread over the cells the load clicks, whose median settle time is
one update's time t1. Then N sessions
open the layer map and, for --clicks rounds, click a cell each at the same moment, each its own cell; a click's
settle time runs from the click until the session's history counts it and no cell is pending. Checks:
(a) timing: in each round the i-th fastest session settles within 1.3 x ceil(i / workers) x t1;
(b) memory: the server's peak RSS during the load exceeds the idle one-session figure by less than 1.5 GB;
(c) isolation: each session ends with INT8 on exactly the cells it clicked and FP32 elsewhere.
Prints a Markdown table and writes everything to --json. Exit 0: all checks pass; 1: a check failed or the run
did not finish; 2: bad arguments. Run it alone on the machine: the browsers share the CPU with the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SIDEBAR = "section[data-testid='stSidebar']"
CELLS = ".cell"
WAIT_MS = 900_000  # any one wait; --timeout-s bounds the whole run
SLACK, MEMORY_LIMIT = 1.3, 1.5e9


class BadArguments(Exception):
    """Arguments found wrong only once the app is open (too few layers for the clicks asked for)."""


def say(message: str) -> None:  # progress on stderr: a full run takes many minutes
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and all its descendants (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            continue
    return total


def sample_rss(pid: int, samples: list, halt: threading.Event) -> None:
    """The server's RSS every 0.5 s all through, so that a peak between two phases is not missed."""
    while not halt.wait(0.5):
        samples.append((time.monotonic(), rss_bytes(pid)))


def machine() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    cores, workers = os.cpu_count() or 1, max(1, int(os.environ.get("ENGINE_WORKERS") or 1))
    return {"cpu": cpu.group(1) if cpu else "unknown", "cores": cores, "engine_workers": workers,
            "torch_threads": int(os.environ.get("ENGINE_THREADS") or 0) or max(1, cores // workers),  # as the scheduler
            "load_average_before": os.getloadavg()}


def start_server(cache_dir: Path, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ENGINE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.port", str(port),
                                "--server.address", "127.0.0.1", "--server.headless", "true"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return process, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the Streamlit server did not answer its health check within 120 s")


def stop_server(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)  # the whole group: the server and anything it started
            process.wait(timeout=wait_s)
            break
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


async def wait_or_fail(page, awaited) -> None:
    """Wait for `awaited`, but fail at once on an error on the page (a CSV the model cannot read, a model that fell
    back to embedded, an exception) rather than at the timeout."""
    trouble = page.locator(f"[data-testid='stAlertContentError'], [data-testid='stException'], "
                           f"{SIDEBAR} [data-testid='stAlertContentWarning']")
    await awaited.or_(trouble).first.wait_for(timeout=WAIT_MS)
    if await trouble.count():
        raise RuntimeError(f"the layer map shows: {(await trouble.first.inner_text()).strip()[:300]}")


async def open_layer_map(browser, url: str, model: str, data: str):
    """A new browser session on the layer map with the model and set chosen in the sidebar, once its script ran."""
    page = await (await browser.new_context(viewport={"width": 1400, "height": 1800})).new_page()
    await page.goto(f"{url}/layer_map", timeout=WAIT_MS)
    if model != "embedded":  # the app takes a model only from the sidebar: "other…", then the folder
        await page.locator(f"{SIDEBAR} [data-testid='stSelectbox']").first.click(timeout=WAIT_MS)
        await page.get_by_role("option", name="other…").click(timeout=WAIT_MS)
        typed = page.get_by_label("Hub id or local folder")
        await typed.fill(model, timeout=WAIT_MS)
        await typed.press("Enter")
    if data != "embedded":
        await page.locator(f"{SIDEBAR} input[type='file']").set_input_files(data, timeout=WAIT_MS)
    name = "embedded" if data == "embedded" else Path(data).name
    caption = page.get_by_text(re.compile(rf"^Evaluated on {re.escape(name)} \([\d,]+ sentences\) with "
                                          rf"{re.escape(model)}\.$"))
    await wait_or_fail(page, caption)
    await page.wait_for_function("() => document.querySelector(\"[data-testid='stApp']\")"
                                 "?.dataset.testScriptState === 'notRunning'", timeout=WAIT_MS)
    size = re.search(r"\(([\d,]+) sentences\)", await caption.inner_text()).group(1)
    return page, int(size.replace(",", ""))


async def where(page, index: int) -> tuple[float, float]:
    """The middle of cell `index`, scrolled into view (a grid of many blocks is taller than the window); asked
    again if a rerun redraws the grid meanwhile."""
    for attempt in range(10):
        try:
            await page.locator(CELLS).nth(index).scroll_into_view_if_needed(timeout=WAIT_MS)
            box = await page.locator(CELLS).nth(index).bounding_box(timeout=WAIT_MS)
            return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        except Exception:
            if attempt == 9:
                raise
            await page.wait_for_timeout(500)


async def click_and_settle(page, at: tuple[float, float], history: int) -> tuple[float, float, float]:
    """(start, clicked, settled): one click at `at`, settled once the history lists `history` plans and no cell
    is pending. A bare mouse click, without a locator's actionability checks (which take up to a second on a
    busy machine), so that the sessions' clicks land at the same moment."""
    start = time.monotonic()
    await page.mouse.click(*at)
    clicked = time.monotonic()
    await wait_or_fail(page, page.get_by_text(re.compile(rf"^{history} plans tried in this session$")))
    # A locator, not document.querySelector: it also looks inside the grid component's shadow root.
    await page.locator(f"{CELLS}.pending").first.wait_for(state="detached", timeout=WAIT_MS)
    return start, clicked, time.monotonic()


def browser_command(priority: str, scratch: Path) -> str:
    """Chromium, or Chromium at the lowest CPU priority: the browsers stand in for users' own machines, so on
    a 2-core box they should not take the cores the server's evaluations need."""
    if priority == "normal":
        return CHROMIUM
    wrapper = scratch / "chromium"
    wrapper.write_text(f'#!/bin/sh\nexec nice -n 19 {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


async def measure(args, url: str, pid: int, samples: list, report: dict) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=browser_command(args.browser_priority, args.scratch), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"])
        try:
            say("one session opens the layer map")
            alone, report["set_size"] = await open_layer_map(browser, url, args.model, args.data)
            if args.sessions * args.clicks >= (cells := await alone.locator(CELLS).count()):
                raise BadArguments(f"the model has {cells} layers: --sessions x --clicks must be below that")
            report["memory"] = {"idle_one_session": rss_bytes(pid)}
            # Three cells at the start, middle and end of the load's cells, so that t1 is what a load click costs
            # alone; set to INT4 (the load cycles to INT8), so no load click is answered from the cache this fills.
            await alone.get_by_text("set INT4", exact=True).click(timeout=WAIT_MS)
            await alone.wait_for_function("() => document.querySelector(\"[data-testid='stApp']\")"
                                          "?.dataset.testScriptState === 'notRunning'", timeout=WAIT_MS)
            span = args.sessions * args.clicks
            reference = []
            for history, cell in enumerate(sorted({1, 1 + span // 2, span}), start=2):
                start, _, end = await click_and_settle(alone, await where(alone, cell), history)
                reference.append(end - start)
            report["one_update"] = {"clicks_s": reference, "t1_s": (t1 := statistics.median(reference))}
            say(f"one update alone: {', '.join(f'{t:.2f}' for t in reference)} s; {args.sessions} sessions open it")
            await alone.context.close()

            load_start, report["memory"]["before_load"] = time.monotonic(), rss_bytes(pid)
            pages = [page for page, _ in await asyncio.gather(*(
                open_layer_map(browser, url, args.model, args.data) for _ in range(args.sessions)))]
            workers, report["rounds"] = report["machine"]["engine_workers"], []
            for r in range(args.clicks):
                say(f"round {r + 1} of {args.clicks}: {args.sessions} clicks at once")
                spots = await asyncio.gather(*(where(page, 1 + s * args.clicks + r) for s, page in enumerate(pages)))
                timed = await asyncio.gather(*(click_and_settle(page, at, r + 2) for page, at in zip(pages, spots)))
                settle = [end - start for start, _, end in timed]
                ranked = sorted(range(args.sessions), key=settle.__getitem__)
                clicks = [{"session": s, "cell": 1 + s * args.clicks + r, "rank": i, "settle_s": settle[s],
                           "ratio": settle[s] / (math.ceil(i / workers) * t1)} for i, s in enumerate(ranked, start=1)]
                spread = max(t[1] for t in timed) - min(t[1] for t in timed)  # how simultaneous the clicks were
                report["rounds"].append({"round": r + 1, "clicks": clicks, "click_spread_s": spread})
            report["memory"]["peak_under_load"] = max([rss_bytes(pid)] + [rss for t, rss in samples if t >= load_start])
            report["isolation"] = []
            for s, page in enumerate(pages):
                own = {1 + s * args.clicks + r for r in range(args.clicks)}
                shown = [text.split("\n")[-1] for text in await page.locator(CELLS).all_inner_texts()]
                wrong = [i for i, label in enumerate(shown) if label != ("INT8" if i in own else "FP32")]
                report["isolation"].append({"session": s, "clicked": sorted(own), "wrong_cells": wrong})
        finally:
            await browser.close()


def checks(report: dict) -> dict:
    memory = report["memory"]
    memory["growth"] = memory["peak_under_load"] - memory["idle_one_session"]
    worst = max(c["ratio"] for r in report["rounds"] for c in r["clicks"])
    foreign = [s["session"] for s in report["isolation"] if s["wrong_cells"]]
    return {"timing": {"ok": worst <= SLACK, "worst_ratio": worst, "limit": SLACK},
            "memory": {"ok": memory["growth"] < MEMORY_LIMIT, "growth_bytes": memory["growth"],
                       "limit_bytes": MEMORY_LIMIT},
            "isolation": {"ok": not foreign, "sessions_with_foreign_cells": foreign}}


def table(report: dict) -> str:
    found, memory, m, a = report["checks"], report["memory"], report["machine"], report["args"]
    yes, mb = {True: "yes", False: "**no**"}, (lambda key: f"{memory[key] / 1e6:.0f} MB")
    alone = ", ".join(f"{t:.2f}" for t in report["one_update"]["clicks_s"])
    rows = [f"| one update alone, t1 (median of {alone} s) | {report['one_update']['t1_s']:.2f} s | | |"]
    for r in report["rounds"]:
        worst, times = max(c["ratio"] for c in r["clicks"]), ", ".join(f"{c['settle_s']:.2f}" for c in r["clicks"])
        rows.append(f"| round {r['round']}: settle times, fastest first (clicks within {r['click_spread_s']:.2f} s) "
                    f"| {times} s | worst ratio {worst:.2f} <= {SLACK} | {yes[worst <= SLACK]} |")
    isolated = len(report["isolation"]) - len(found["isolation"]["sessions_with_foreign_cells"])
    rows += [f"| server RSS, one idle session | {mb('idle_one_session')} | | |",
             f"| server RSS, after t1's clicks (before the load) | {mb('before_load')} | | |",
             f"| server RSS, peak under load - idle | {mb('growth')} | < {MEMORY_LIMIT / 1e9} GB "
             f"| {yes[found['memory']['ok']]} |",
             f"| isolation: sessions seeing only their own plan | {isolated} of {len(report['isolation'])} | all "
             f"| {yes[found['isolation']['ok']]} |"]
    load = [" ".join(f"{x:.2f}" for x in m[key]) for key in ("load_average_before", "load_average_after")]
    return "\n".join([
        f"{a['sessions']} sessions x {a['clicks']} clicks; model {a['model']}, set {a['data']} "
        f"({report['set_size']:,} sentences evaluated); {m['cpu']}, {m['cores']} cores, {m['engine_workers']} "
        f"worker(s) x {m['torch_threads']} torch threads; load average {load[0]} before, {load[1]} after", "",
        "| figure | value | limit | ok |", "|---|---|---|---|", *rows])


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.error = lambda message: (print(f"load_test.py: {message}", file=sys.stderr), sys.exit(2))
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--model", default="embedded", help="embedded, or a local model folder")
    parser.add_argument("--data", default="embedded", help="embedded, or a CSV with columns text,label")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "load_test.json")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--browser-priority", choices=("low", "normal"), default="low",
                        help="low: the browsers run at nice 19, standing in for users' own machines")
    args = parser.parse_args()
    if args.sessions < 1 or args.clicks < 1 or args.timeout_s <= 0:
        parser.error("--sessions, --clicks and --timeout-s must be positive")
    if args.model != "embedded" and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a folder")
    if args.data != "embedded" and not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} is missing (Debian's chromium package)")
    args.model, args.data = (v if v == "embedded" else str(Path(v).resolve()) for v in (args.model, args.data))
    return args


def main() -> int:
    args = arguments()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": machine()}
    started, process, samples, halt = time.monotonic(), None, [], threading.Event()
    with tempfile.TemporaryDirectory(prefix="load_test_") as tmp, open(Path(tmp) / "server.log", "w+") as log:
        args.scratch = Path(tmp)
        try:
            process, url = start_server(Path(tmp) / "cache", log)
            threading.Thread(target=sample_rss, args=(process.pid, samples, halt), daemon=True).start()
            asyncio.run(asyncio.wait_for(measure(args, url, process.pid, samples, report),
                                         args.timeout_s - (time.monotonic() - started)))
        except BadArguments as error:
            print(f"load_test.py: {error}", file=sys.stderr)
            return 2
        except (Exception, KeyboardInterrupt) as error:
            reason = f"timed out after --timeout-s {args.timeout_s:g}" if isinstance(error, TimeoutError) else \
                f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            log.seek(0)
            tail = "".join(log.readlines()[-5:])
            print(f"load_test.py: the run did not finish: {reason}\nserver log, last lines:\n{tail}", file=sys.stderr)
            return 130 if isinstance(error, KeyboardInterrupt) else 1
        finally:
            halt.set()
            if process is not None:
                stop_server(process)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["checks"] = checks(report)
    report["memory"]["samples"] = [(round(t - started, 2), rss) for t, rss in samples]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(table(report) + f"\n\nWritten to {args.json}")
    failed = [f"{name} {check}" for name, check in report["checks"].items() if not check["ok"]]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
