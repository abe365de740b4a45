"""The Streamlit UI in a real headless Chromium, against a real API server and index.

Chromium comes from Debian's package (`.ci/run` installs it); without it the test skips.
"""

from __future__ import annotations

import re

import pytest

from tests.app.servers import CHROMIUM, KEY, chromium_page, ui_server

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def ui(corpus):
    with ui_server(corpus, corpus / "index", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def page(ui):
    with chromium_page() as page:
        yield page


def test_search_shows_cited_passages(ui, page, tmp_path):
    page.goto(ui)
    page.get_by_text("Search", exact=True).click()  # the chat page opens first
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
