"""The chat page in a real headless Chromium, against a real API server, index and reader model.

The server starts without a reader model: the page shows why and the passages that match.
Then a model is saved where the server looks, and the same page streams a cited answer.
"""

from __future__ import annotations

import re

import pytest

from tests.app.readers import ANSWER, QUESTION, save_parrot
from tests.app.servers import CHROMIUM, chromium_page, ui_server

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def model_dirs(corpus, tmp_path_factory):
    """(where the server looks for the reader: empty for now, a trained reader to move there)."""
    trained = tmp_path_factory.mktemp("trained") / "reader"
    save_parrot(corpus, trained)
    return corpus / "models" / "reader", trained


@pytest.fixture(scope="module")
def ui(corpus, model_dirs):
    with ui_server(corpus, corpus / "index", model_dir=model_dirs[0]) as url:
        yield url


def ask(page, question: str) -> None:
    box = page.get_by_placeholder("Ask a question about your documents")
    box.fill(question)
    box.press("Enter")


def test_chat_falls_back_to_search_then_streams_a_cited_answer(ui, model_dirs, tmp_path):
    serving, trained = model_dirs
    with chromium_page() as page:
        page.goto(ui)
        page.get_by_text("Chat", exact=True).click()
        ask(page, QUESTION)
        page.get_by_text(f"No answer: no reader model at {serving}").wait_for(timeout=60_000)
        page.get_by_text("[1] Zebras").wait_for(timeout=30_000)  # the search results instead
        page.get_by_text(re.compile(r"score \d\.\d{4}")).first.wait_for(timeout=10_000)

        serving.parent.mkdir(parents=True)
        trained.rename(serving)  # a model appears: the server loads it on the next question
        ask(page, QUESTION)
        page.get_by_text(ANSWER).wait_for(timeout=60_000)
        supported = page.get_by_text(re.compile(r"zebra\.md · cited · supported by this text"))
        supported.wait_for(timeout=30_000)
        page.get_by_text(re.compile(r"faiss\.txt · not cited")).last.wait_for(timeout=10_000)
        # numbered sources with their page and exact span, below the answer
        assert page.get_by_text(re.compile(r"\[1\] Zebras · page 1 · chars 0–\d+")).count() == 2
        page.get_by_text("[2] faiss").last.wait_for(timeout=10_000)
        assert page.get_by_text(f"no reader model at {serving}").is_visible()  # the first turn stays
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000
