"""The Streamlit UI in a real headless Chromium, against a real API server and index.

Chromium comes from Debian's package (`.ci/run` installs it); without it the test skips.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.servers import KEY, free_port, start_server, wait_healthy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ui(corpus):
    api, api_url = start_server(corpus, corpus / "index", KEY)
    port = free_port()
    env = {**os.environ, "RAG_API_URL": api_url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app/ui.py",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, f"{url}/_stcore/health")
    except RuntimeError:
        api.kill()
        raise
    yield url
    for p in (proc, api):
        p.terminate()
        p.wait(10)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],  # fmt: skip
        )
        yield browser.new_page(viewport={"width": 1200, "height": 900})
        browser.close()


def test_search_shows_cited_passages(ui, page, tmp_path):
    page.goto(ui)
    page.get_by_label("Question or keywords").fill("striped African equines")
    page.get_by_role("button", name="Search").click()
    page.get_by_text("[1] Zebras").wait_for(timeout=60_000)
    citation = page.get_by_text(re.compile(r"page 1 · chars \d+–\d+")).first
    assert citation.is_visible()
    page.get_by_text("distinctive black-and-white striped coats").first.wait_for(timeout=10_000)
    page.screenshot(path=str(tmp_path / "search.png"))
    assert (tmp_path / "search.png").stat().st_size > 10_000


def test_admin_page_lists_documents_and_refuses_a_wrong_key(ui, page):
    page.goto(ui)
    page.get_by_text("Admin").click()
    page.get_by_text("Documents (").wait_for(timeout=30_000)
    key = page.locator('input[aria-label="API key"]')
    key.fill("wrong-key")
    key.press("Enter")  # Streamlit commits a text input on Enter/blur, then reruns the script
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Ingest").click()
    page.get_by_text("missing or wrong X-API-Key").first.wait_for(timeout=60_000)
