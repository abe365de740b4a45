"""The Streamlit UI in a real headless Chromium, against a real API server and index.

Chromium comes from Debian's package (`.ci/run` installs it); without it the test skips.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.app.servers import CHROMIUM, KEY, chromium_page, listening_on, ui_server

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def ui(corpus):
    with ui_server(corpus, corpus / "index", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def page(ui):
    with chromium_page() as page:
        yield page


def settle(page: Page) -> None:
    """Wait until Streamlit's script run is over (its status widget gone): a widget filled while a
    run re-renders the page can be replaced and lose what was typed."""
    page.wait_for_timeout(500)  # a run started by the last action shows its status widget
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=60_000)


def commit_key(page: Page, key: str) -> None:
    """Type the API key and let the rerun its commit starts (Streamlit commits a text input on
    Enter) finish, so that the next request carries it; typed again if a re-render cleared it."""
    field = page.locator('input[aria-label="API key"]')
    for _ in range(3):
        settle(page)
        field.fill(key)
        field.press("Enter")
        settle(page)
        if field.input_value() == key:
            return
    pytest.fail("the API key field does not keep what is typed")


def wait_for_report(page: Page, pattern: str, timeout: float = 120_000) -> None:
    """Wait for a message; if it never comes, fail with what the page shows instead."""
    try:
        page.get_by_text(re.compile(pattern)).first.wait_for(timeout=timeout)
    except PlaywrightTimeout:
        alerts = page.locator('[data-testid="stAlert"]').all_inner_texts()
        pytest.fail(f"no {pattern!r} after {timeout / 1000:.0f} s; the page's messages: {alerts}")


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
    commit_key(page, "wrong-key")
    page.get_by_role("button", name="Ingest").click()
    wait_for_report(page, "missing or wrong API key", timeout=60_000)


def test_ui_listens_on_this_machine_only_and_shows_no_deploy_button(ui, page):
    assert listening_on(int(ui.rsplit(":", 1)[1])) == {"127.0.0.1"}  # not every interface
    page.goto(ui)
    page.get_by_text("Search your documents").or_(page.get_by_text("Ask your documents")).wait_for(
        timeout=60_000
    )
    assert page.get_by_role("button", name="Deploy").count() == 0
    assert page.get_by_text("Deploy", exact=True).count() == 0


def test_admin_ingest_shows_progress_then_the_report(ui, page, corpus):
    page.goto(ui)
    page.get_by_text("Admin").click()
    commit_key(page, KEY)
    page.get_by_label("Folders or files on the server, one per line").fill(str(corpus / "docs"))
    page.get_by_role("button", name="Ingest").click()
    wait_for_report(page, r"\d+ ingested, \d+ unchanged")
    page.get_by_text("Done").wait_for(timeout=10_000)  # the progress bar's last state


def test_served_to_other_machines_the_admin_page_wants_the_key(corpus, page):
    with ui_server(corpus, corpus / "index", KEY, address="0.0.0.0") as url:
        assert listening_on(int(url.rsplit(":", 1)[1])) == {"0.0.0.0"}
        page.goto(url)
        page.get_by_text("Admin").click()
        page.get_by_text("enter the API key to manage documents").wait_for(timeout=60_000)
        assert page.get_by_text("Documents (").count() == 0 and page.get_by_text("Index").count() == 0
        key = page.locator('input[aria-label="API key"]')
        key.fill("wrong-key")
        key.press("Enter")
        page.get_by_text("missing or wrong API key").first.wait_for(timeout=60_000)
        assert page.get_by_text("Documents (").count() == 0
        key.fill(KEY)
        key.press("Enter")
        page.get_by_text("Documents (").wait_for(timeout=60_000)
