"""The reader that ships in models/reader, over a real server and a real index: `make run` answers
out of the box, with a quote that is the source's own text and evidence inside the cited source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.servers import api_server

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "reader"


@pytest.fixture(scope="module")
def shipped(corpus) -> Iterator[str]:
    assert (SHIPPED / "model.safetensors").is_file(), f"the shipped reader is missing from {SHIPPED}"
    with api_server(corpus, corpus / "index", model_dir=SHIPPED) as url:
        yield url


def test_ask_answers_with_a_quote_and_evidence_from_the_cited_source(shipped):
    r = httpx.post(f"{shipped}/v1/ask", json={"question": "What coats do zebras have?"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert not body["abstained"], body
    zebra = next(s for s in body["sources"] if s["path"].endswith("zebra.md"))
    quote = body["quote"]
    assert quote["n"] == zebra["n"] and "striped" in quote["text"]
    # the answer is the source's own characters at the quote's offsets, then its citation
    assert body["answer"] == f"{quote['text']} [{zebra['n']}]"
    assert zebra["text"][quote["start"] - zebra["start"] : quote["end"] - zebra["start"]] == quote["text"]
    (citation,) = body["citations"]
    assert citation["valid"] and citation["source"]["path"] == zebra["path"]
    assert body["evidence"] and all(e["n"] == zebra["n"] for e in body["evidence"])
    top = body["evidence"][0]
    assert zebra["text"][top["start"] - zebra["start"] : top["end"] - zebra["start"]] == top["text"]


def test_chat_completions_carry_the_quote(shipped):
    r = httpx.post(
        f"{shipped}/v1/chat/completions",
        json={"model": "rag-reader", "messages": [{"role": "user", "content": "What coats do zebras have?"}]},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["message"]["content"]
    assert "striped" in content and content.endswith("]")
    assert body["rag"]["quote"]["text"] in content and body["rag"]["evidence"]


def test_unrelated_question_is_not_answered_from_a_wrong_source(shipped):
    """Nothing in the index says who won the 1998 World Cup: the reader should abstain."""
    r = httpx.post(f"{shipped}/v1/ask", json={"question": "Who won the 1998 FIFA World Cup?"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["abstained"], r.json()


def test_chat_page_highlights_the_quote_and_the_evidence(corpus, tmp_path):
    """In a real browser: the shipped reader's answer, then its source with the quoted answer and
    the words it attended to most highlighted."""
    from tests.app.servers import CHROMIUM, chromium_page, ui_server

    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    with ui_server(corpus, corpus / "index", model_dir=SHIPPED) as url, chromium_page() as page:
        page.goto(url)
        page.get_by_text("Chat", exact=True).click()
        box = page.get_by_placeholder("Ask a question about your documents")
        box.fill("What coats do zebras have?")
        box.press("Enter")
        page.get_by_text("what the reader attended to most").wait_for(timeout=120_000)
        marked = page.locator("span", has_text="striped").filter(has_not=page.locator("span")).first
        marked.wait_for(timeout=10_000)
        color = marked.evaluate("e => getComputedStyle(e).backgroundColor")
        assert color not in ("rgba(0, 0, 0, 0)", "transparent"), color  # drawn with a background
        page.screenshot(path=str(tmp_path / "highlight.png"), full_page=True)
    assert (tmp_path / "highlight.png").stat().st_size > 10_000
