"""Load test of the layer map (issue 15): N browser sessions clicking at once on one server.

    HF_HUB_OFFLINE=1 python benchmarks/load_test.py                    # 8 sessions x 3 clicks, embedded set
    python benchmarks/load_test.py --sessions 2 --clicks 2 --data small.csv [--model FOLDER]   # a smoke run
    python benchmarks/load_test.py --client browser                    # the same with 8 Chromium pages

Starts the dashboard on a free 127.0.0.1 port with a cold cache (a fresh ENGINE_CACHE_DIR). The sessions are
websocket clients that send what a browser sends (streamlit_socket.py), so that the server's cores serve only
the server, as they do when its users' browsers run on their own machines. With --client browser they are
headless Chromium pages driven through Playwright, at the lowest CPU priority but on the same cores: their
rendering slows the server, is slowed by it, and counts in their settle times.

First one session alone: the server's resident memory once it has settled (the "idle one session" figure),
then three clicks spread over the cells the load clicks, whose median settle time is one update's time t1.
Then N sessions open the layer map and, for --clicks rounds, click a cell each at the same moment, each its own
cell; a click's settle time runs from the click until the session's history counts it (and, in a browser, no
cell is pending). Checks:
(a) timing: in each round the i-th fastest session settles within 1.3 x ceil(i / workers) x t1;
(b) memory: the server's peak RSS during the load exceeds the idle one-session figure by less than 1.5 GB;
(c) isolation: each session ends with INT8 on exactly the cells it clicked and FP32 elsewhere.
Prints a Markdown table and writes everything to --json. Exit 0: all checks pass; 1: a check failed or the run
did not finish; 2: bad arguments. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from streamlit_socket import SocketSession

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SIDEBAR = "section[data-testid='stSidebar']"
CELLS = ".cell"
WAIT_MS = 900_000  # any one wait; --timeout-s bounds the whole run
SLACK, MEMORY_LIMIT = 1.3, 1.5e9
CLIENTS = {"socket": "websocket sessions", "browser": "Chromium sessions"}


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


def caption_pattern(model: str, data: str) -> str:
    """The layer map's caption once the chosen model and set are evaluated."""
    name = "embedded" if data == "embedded" else Path(data).name
    return rf"Evaluated on {re.escape(name)} \(([\d,]+) sentences\) with {re.escape(model)}\."


class BrowserClient:
    """A headless Chromium page on the layer map."""

    def __init__(self, browser):
        self.browser = browser

    async def wait_or_fail(self, awaited) -> None:
        """Wait for `awaited`, but fail at once on an error on the page (a CSV the model cannot read, a model that
        fell back to embedded, an exception) rather than at the timeout."""
        trouble = self.page.locator(f"[data-testid='stAlertContentError'], [data-testid='stException'], "
                                    f"{SIDEBAR} [data-testid='stAlertContentWarning']")
        await awaited.or_(trouble).first.wait_for(timeout=WAIT_MS)
        if await trouble.count():
            raise RuntimeError(f"the layer map shows: {(await trouble.first.inner_text()).strip()[:300]}")

    async def idle(self) -> None:
        await self.page.wait_for_function("() => document.querySelector(\"[data-testid='stApp']\")"
                                          "?.dataset.testScriptState === 'notRunning'", timeout=WAIT_MS)

    async def open(self, url: str, model: str, data: str) -> int:
        """The layer map with the model and set chosen in the sidebar, once its script ran; the set's size."""
        page = self.page = await (await self.browser.new_context(viewport={"width": 1400, "height": 1800})).new_page()
        await page.goto(f"{url}/layer_map", timeout=WAIT_MS)
        if model != "embedded":  # the app takes a model only from the sidebar: "other…", then the folder
            await page.locator(f"{SIDEBAR} [data-testid='stSelectbox']").first.click(timeout=WAIT_MS)
            await page.get_by_role("option", name="other…").click(timeout=WAIT_MS)
            typed = page.get_by_label("Hub id or local folder")
            await typed.fill(model, timeout=WAIT_MS)
            await typed.press("Enter")
        if data != "embedded":
            await page.locator(f"{SIDEBAR} input[type='file']").set_input_files(data, timeout=WAIT_MS)
        caption = page.get_by_text(re.compile(f"^{caption_pattern(model, data)}$"))
        await self.wait_or_fail(caption)
        await self.idle()
        return int(re.fullmatch(caption_pattern(model, data), await caption.inner_text()).group(1).replace(",", ""))

    async def cell_count(self) -> int:
        return await self.page.locator(CELLS).count()

    async def choose_action(self, label: str) -> None:
        await self.page.get_by_text(label, exact=True).click(timeout=WAIT_MS)
        await self.idle()

    async def where(self, index: int) -> tuple[float, float]:
        """The middle of cell `index`, scrolled into view (a grid of many blocks is taller than the window);
        asked again if a rerun redraws the grid meanwhile."""
        for attempt in range(10):
            try:
                await self.page.locator(CELLS).nth(index).scroll_into_view_if_needed(timeout=WAIT_MS)
                box = await self.page.locator(CELLS).nth(index).bounding_box(timeout=WAIT_MS)
                return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            except Exception:
                if attempt == 9:
                    raise
                await self.page.wait_for_timeout(500)

    async def click_and_settle(self, at: tuple[float, float], history: int) -> tuple[float, float, float]:
        """(start, clicked, settled): one click at `at` (from `where`), settled once the history lists `history`
        plans and no cell is pending. A bare mouse click, without a locator's actionability checks (which take
        up to a second on a busy machine), so that the sessions' clicks land at the same moment."""
        start = time.monotonic()
        await self.page.mouse.click(*at)
        clicked = time.monotonic()
        await self.wait_or_fail(self.page.get_by_text(re.compile(rf"^{history} plans tried in this session$")))
        # A locator, not document.querySelector: it also looks inside the grid component's shadow root.
        await self.page.locator(f"{CELLS}.pending").first.wait_for(state="detached", timeout=WAIT_MS)
        return start, clicked, time.monotonic()

    async def shown(self) -> list[str]:
        """Each cell's precision as the page shows it."""
        return [text.split("\n")[-1] for text in await self.page.locator(CELLS).all_inner_texts()]

    async def close(self) -> None:
        await self.page.context.close()


class SocketClient:
    """A websocket session on the layer map (streamlit_socket.py): no browser, so no rendering on these cores."""

    def __init__(self, url: str):
        self.session = SocketSession(url)

    async def open(self, url: str, model: str, data: str) -> int:
        session = self.session
        await session.open("layer_map")
        if model != "embedded":
            await session.set_widget("sidebar_model", string_value="other…")
            await session.idle()
            await session.set_widget("sidebar_model_typed", string_value=model)
            await session.idle()
        if data != "embedded":
            await session.upload("sidebar_upload", Path(data))
            await session.idle()
        await session.text(caption_pattern(model, data), since=0, timeout=WAIT_MS / 1000)
        await session.idle()
        caption = next(body for _, body in reversed(session.texts) if re.fullmatch(caption_pattern(model, data), body))
        return int(re.fullmatch(caption_pattern(model, data), caption).group(1).replace(",", ""))

    async def cell_count(self) -> int:
        return len(self.session.cells())

    async def choose_action(self, label: str) -> None:
        await self.session.set_widget("click_action", string_value=label)
        await self.session.idle()

    async def where(self, index: int) -> int:
        return index

    async def click_and_settle(self, at: int, history: int) -> tuple[float, float, float]:
        """(start, clicked, settled): the click on cell `at`, settled when the server's message listing
        `history` plans arrives."""
        start = time.monotonic()
        await self.session.click_cell("lm_grid", at)
        clicked = time.monotonic()
        settled = await self.session.text(rf"{history} plans tried in this session", since=start,
                                          timeout=WAIT_MS / 1000)
        return start, clicked, settled

    async def shown(self) -> list[str]:
        return [cell["precision"].upper() for cell in self.session.cells()]

    async def close(self) -> None:
        await self.session.close()


def browser_command(priority: str, scratch: Path) -> str:
    """Chromium, or Chromium at the lowest CPU priority: the browsers stand in for users' own machines, so on
    a 2-core box they should not take the cores the server's evaluations need.

    A nice value alone does not do it. Playwright starts Chromium in a session of its own, and with the
    kernel's autogroup scheduling (on by default) each session's group gets an equal share of the CPU, whatever
    the nice values inside it; Chromium running as root also renices its own processes (its browser process
    to -8). So the wrapper lowers the whole group's weight (/proc/self/autogroup: Chromium's processes all
    share this session) and, for kernels without autogroup, the nice value too."""
    if priority == "normal":
        return CHROMIUM
    wrapper = scratch / "chromium"
    wrapper.write_text(f'#!/bin/sh\necho 19 > /proc/self/autogroup 2>/dev/null\nexec nice -n 19 {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@contextlib.asynccontextmanager
async def client_factory(args, url: str):
    """A function making a new client session: a websocket one, or a page in one shared Chromium."""
    if args.client == "socket":
        yield lambda: SocketClient(url)
        return
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=browser_command(args.browser_priority, args.scratch), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"])
        try:
            yield lambda: BrowserClient(browser)
        finally:
            await browser.close()


async def opened(new_client, url: str, args) -> tuple[object, int]:
    client = new_client()
    return client, await client.open(url, args.model, args.data)


async def measure(args, url: str, pid: int, samples: list, report: dict) -> None:
    async with client_factory(args, url) as new_client:
        say("one session opens the layer map")
        alone, report["set_size"] = await opened(new_client, url, args)
        if args.sessions * args.clicks >= (cells := await alone.cell_count()):
            raise BadArguments(f"the model has {cells} layers: --sessions x --clicks must be below that")
        report["memory"] = {"idle_one_session": rss_bytes(pid)}
        # Three cells at the start, middle and end of the load's cells, so that t1 is what a load click costs
        # alone; set to INT4 (the load cycles to INT8), so no load click is answered from the cache this fills.
        await alone.choose_action("set INT4")
        span = args.sessions * args.clicks
        reference = []
        for history, cell in enumerate(sorted({1, 1 + span // 2, span}), start=2):
            start, _, end = await alone.click_and_settle(await alone.where(cell), history)
            reference.append(end - start)
        report["one_update"] = {"clicks_s": reference, "t1_s": (t1 := statistics.median(reference))}
        say(f"one update alone: {', '.join(f'{t:.2f}' for t in reference)} s; {args.sessions} sessions open it")
        await alone.close()

        load_start, report["memory"]["before_load"] = time.monotonic(), rss_bytes(pid)
        sessions = [client for client, _ in await asyncio.gather(*(
            opened(new_client, url, args) for _ in range(args.sessions)))]
        workers, report["rounds"] = report["machine"]["engine_workers"], []
        for r in range(args.clicks):
            say(f"round {r + 1} of {args.clicks}: {args.sessions} clicks at once")
            spots = await asyncio.gather(*(c.where(1 + s * args.clicks + r) for s, c in enumerate(sessions)))
            timed = await asyncio.gather(*(c.click_and_settle(at, r + 2) for c, at in zip(sessions, spots)))
            settle = [end - start for start, _, end in timed]
            ranked = sorted(range(args.sessions), key=settle.__getitem__)
            clicks = [{"session": s, "cell": 1 + s * args.clicks + r, "rank": i, "settle_s": settle[s],
                       "ratio": settle[s] / (math.ceil(i / workers) * t1)} for i, s in enumerate(ranked, start=1)]
            spread = max(t[1] for t in timed) - min(t[1] for t in timed)  # how simultaneous the clicks were
            report["rounds"].append({"round": r + 1, "clicks": clicks, "click_spread_s": spread})
        report["memory"]["peak_under_load"] = max([rss_bytes(pid)] + [rss for t, rss in samples if t >= load_start])
        report["isolation"] = []
        for s, client in enumerate(sessions):
            own = {1 + s * args.clicks + r for r in range(args.clicks)}
            wrong = [i for i, label in enumerate(await client.shown()) if label != ("INT8" if i in own else "FP32")]
            report["isolation"].append({"session": s, "clicked": sorted(own), "wrong_cells": wrong})
        for client in sessions:
            await client.close()


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
        f"{a['sessions']} {CLIENTS[a['client']]} x {a['clicks']} clicks; model {a['model']}, set {a['data']} "
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
    parser.add_argument("--client", choices=("socket", "browser"), default="socket",
                        help="socket: websocket sessions (no rendering on the server's cores); browser: Chromium pages")
    parser.add_argument("--browser-priority", choices=("low", "normal"), default="low",
                        help="low: the browsers run at the lowest CPU priority (autogroup nice 19), standing in for "
                             "users' own machines")
    args = parser.parse_args()
    if args.sessions < 1 or args.clicks < 1 or args.timeout_s <= 0:
        parser.error("--sessions, --clicks and --timeout-s must be positive")
    if args.model != "embedded" and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a folder")
    if args.data != "embedded" and not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.client == "browser" and not Path(CHROMIUM).exists():
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
