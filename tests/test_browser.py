"""One real-browser flow: clicking a cell of the layer map changes that layer's precision.

Needs Debian's Chromium (/usr/bin/chromium) and Playwright's Python package; skipped, saying so,
where either is missing. The Streamlit server listens on 127.0.0.1 only and is stopped afterwards.
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "ENGINE_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the Streamlit server did not answer within 60 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def test_clicking_a_cell_toggles_its_precision(server, tmp_path):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"{server}/layer_map", timeout=60_000)
            points = page.locator(".js-plotly-plot .scatterlayer path.point")
            points.first.wait_for(timeout=300_000)
            labels = page.locator(".js-plotly-plot .scatterlayer .textpoint text")
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .textpoint').length > 10")
            assert not any("INT8" in t for t in labels.all_text_contents())
            box = points.nth(1).bounding_box()  # forward order: the embedding table, then block 0's query
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # as a person clicks
            page.wait_for_function(
                "() => [...document.querySelectorAll('.js-plotly-plot .textpoint text')]"
                ".some(t => t.textContent.includes('INT8'))", timeout=300_000)
            page.get_by_text("flips").first.wait_for(timeout=300_000)
            page.screenshot(path=str(tmp_path / "layer_map.png"), full_page=True)
            texts = labels.all_text_contents()
            assert sum("INT8" in t for t in texts) == 1
        finally:
            browser.close()
