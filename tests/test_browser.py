"""Real-browser flows: clicks on the layer map each count, the history follows them, an upload then a
dropdown choice, and two browser sessions toggling at once each see only their own plan.

Needs Debian's Chromium (/usr/bin/chromium) and Playwright's Python package; skipped, saying so, where
either is missing. The Streamlit server listens on 127.0.0.1 only and is stopped afterwards. The flows
evaluate a small uploaded CSV, so that a click costs a fraction of a second.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
CELLS = ".cell"
TIMEOUT = 240_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {**os.environ, "ENGINE_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Streamlit server did not answer within 90 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    lines = [f"a {'fine' if i % 2 else 'dull'} film number {i},{'positive' if i % 2 else 'negative'}"
             for i in range(44)]
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    return path


def _open_layer_map(browser, server: str, reviews: Path):
    page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
    page.goto(f"{server}/layer_map", timeout=60_000)
    page.locator("section[data-testid='stSidebar'] input[type='file']").set_input_files(str(reviews))
    page.get_by_text("Evaluated on reviews.csv").wait_for(timeout=TIMEOUT)
    page.locator(CELLS).first.wait_for(timeout=TIMEOUT)
    return page


def _settled(page, history_rows: int) -> None:
    """Wait until the history lists `history_rows` plans and no change is pending."""
    page.get_by_text(f"{history_rows} plans tried").wait_for(timeout=TIMEOUT)
    # A locator, not document.querySelector: the grid's cells live in the component's shadow root.
    playwright.expect(page.locator(".cell.pending")).to_have_count(0, timeout=TIMEOUT)


def _labels(page) -> list[str]:
    return [text.split("\n")[-1] for text in page.locator(CELLS).all_inner_texts()]


def test_ten_clicks_change_ten_cells_and_the_history_shows_ten_plans(server, browser, reviews, tmp_path):
    page = _open_layer_map(browser, server, reviews)
    assert "INT8" not in _labels(page)
    cells = page.locator(CELLS)
    for i in range(1, 11):  # one click after another, as a person clicks, each awaited
        box = cells.nth(i).bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        _settled(page, i + 1)
    page.screenshot(path=str(tmp_path / "ten-clicks.png"), full_page=True)
    assert _labels(page).count("INT8") == 10


def test_fast_clicks_are_never_lost(server, browser, reviews):
    page = _open_layer_map(browser, server, reviews)
    cells = page.locator(CELLS)
    for i in range(12, 17):  # five clicks half a second apart, while updates run
        cells.nth(i).click()
        page.wait_for_timeout(500)
    _settled(page, 6)
    assert _labels(page).count("INT8") == 5


def test_two_sessions_toggle_at_once_and_see_only_their_own_plan(server, browser, reviews):
    first = _open_layer_map(browser, server, reviews)
    second = _open_layer_map(browser, server, reviews)
    first.locator(CELLS).nth(1).click()
    second.locator(CELLS).nth(3).click()
    second.locator(CELLS).nth(3).click()  # INT8 then INT4
    _settled(first, 2)
    _settled(second, 3)
    assert _labels(first)[1] == "INT8" and _labels(first).count("INT8") == 1 and "INT4" not in _labels(first)
    assert _labels(second)[3] == "INT4" and "INT8" not in _labels(second)


def test_an_upload_then_another_set_in_the_dropdown(server, browser, reviews):
    page = _open_layer_map(browser, server, reviews)
    page.locator("section[data-testid='stSidebar'] [data-testid='stSelectbox']").nth(1).click()
    page.get_by_role("option", name="nyt: New York Times editorial sentences (out of domain)").click()
    page.get_by_text("Evaluated on nyt").wait_for(timeout=TIMEOUT)
    page.reload()
    page.get_by_text("Evaluated on").wait_for(timeout=TIMEOUT)
    assert page.get_by_text("Evaluated on reviews.csv").count() == 0  # a new page load is a new session
