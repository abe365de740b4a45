"""POST /v1/ask over a real uvicorn server, a real index and real (tiny) reader checkpoints."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.readers import ANSWER, QUESTION, save_babbler, save_parrot
from tests.app.servers import api_server, warm_up


def server_with(save: Callable[[Path, Path], None], corpus: Path, tmp: Path) -> Iterator[str]:
    save(corpus, tmp)
    with api_server(corpus, corpus / "index", model_dir=tmp) as url:
        warm_up(url, "/v1/ask", {"question": "warm up", "max_new_tokens": 1})  # embedder and reader
        yield url


@pytest.fixture(scope="module")
def parrot(corpus, tmp_path_factory) -> Iterator[str]:
    """A server whose reader answers QUESTION with ANSWER (citing the zebra source)."""
    yield from server_with(save_parrot, corpus, tmp_path_factory.mktemp("parrot"))


@pytest.fixture(scope="module")
def babbler(corpus, tmp_path_factory) -> Iterator[str]:
    """A server whose reader never stops before max_new_tokens."""
    yield from server_with(save_babbler, corpus, tmp_path_factory.mktemp("babbler"))


def ask(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/ask", json=body, timeout=60)


def events(resp: httpx.Response) -> Iterator[dict | str]:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except `[DONE]`."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)
        else:
            assert line == "", f"unexpected SSE line {line!r}"


def reader_status(url: str) -> dict:
    return httpx.get(f"{url}/v1/health", timeout=10).json()["reader"]


def test_answer_cites_the_source_it_came_from(parrot):
    r = ask(parrot, question=f"  {QUESTION}\n")  # surrounding whitespace is dropped, not an error
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["question"], body["answer"], body["finish_reason"]) == (QUESTION, ANSWER, "stop")
    assert not body["abstained"]
    assert [s["n"] for s in body["sources"]] == [1, 2]
    assert body["sources"][0]["path"].endswith("zebra.md")
    [citation] = body["citations"]
    assert citation["n"] == 1 and citation["valid"] and citation["supported"]
    assert citation["source"] == body["sources"][0]
    assert ANSWER[citation["start"] : citation["end"]] == "[1]"
    assert {"retrieve_ms", "generate_ms", "prompt_tokens", "new_tokens"} <= set(body["timings"])
    assert reader_status(parrot)["loaded"]


def test_stream_sends_tokens_then_the_same_answer(parrot):
    with httpx.stream(
        "POST", f"{parrot}/v1/ask", json={"question": QUESTION, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        got = list(events(r))
    assert got[-1] == "[DONE]"
    *tokens, final, _ = got
    assert len(tokens) > 3 and all(t["type"] == "token" and t["text"] for t in tokens)
    assert "".join(t["text"] for t in tokens) == ANSWER
    assert final.pop("type") == "answer"
    whole = ask(parrot, question=QUESTION).json()
    final.pop("timings"), whole.pop("timings")
    assert final == whole


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"question": ""},
        {"question": " \n\t "},
        {"question": "x" * 2001},
        {"question": 42},
        {"question": "zebra", "k": 0},
        {"question": "zebra", "k": 21},
        {"question": "zebra", "k": "many"},
        {"question": "zebra", "mode": "telepathy"},
        {"question": "zebra", "max_new_tokens": 0},
        {"question": "zebra", "max_new_tokens": 513},
        {"question": "zebra", "temperature": -0.1},
        {"question": "zebra", "temperature": 2.5},
        {"question": "zebra", "stream": "maybe"},
    ],
)
def test_invalid_input_is_422(parrot, body):
    r = ask(parrot, **body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_malformed_bodies_are_422(parrot):
    for content in [b"\xff\xfe not json", b'{"question": "zebra", "temperature": NaN}', b"[1, 2]"]:
        r = httpx.post(f"{parrot}/v1/ask", content=content, timeout=30)
        assert r.status_code == 422, (content, r.status_code, r.text)


def test_more_new_tokens_than_the_model_has_context_is_422(parrot):
    """512 is within the API's range, but this model's whole context is 512 tokens."""
    for stream in (False, True):
        r = ask(parrot, question=QUESTION, max_new_tokens=512, stream=stream)
        assert r.status_code == 422, r.text
        assert "max_new_tokens" in r.json()["detail"] and "512" in r.json()["detail"]


def test_the_longest_question_is_answered(parrot):
    """2000 characters, emoji included: the prompt cuts the question to fit, the API does not fail."""
    question = ("Do zebras 🦓 have stripes? " * 100)[:2000].strip()
    r = ask(parrot, question=question, k=20)
    assert r.status_code == 200, r.text
    assert r.json()["question"] == question and r.json()["sources"]


def test_no_model_returns_the_passages_with_the_reason(corpus):
    """No reader: 200 with the matching passages as `sources`, `answer: null` and why, streamed
    as one `answer` event; a broken checkpoint that appears later is reported, not cached."""
    model_dir = corpus / "no-reader-model"  # where api_server points the server by default
    with api_server(corpus, corpus / "index") as url:
        body = ask(url, question=QUESTION, k=2)
        assert body.status_code == 200, body.text
        found = body.json()
        assert (found["answer"], found["finish_reason"], found["citations"]) == (
            None,
            "reader_unavailable",
            [],
        )
        assert str(model_dir) in found["reader_unavailable"] and "make reader" in found["reader_unavailable"]
        assert [s["n"] for s in found["sources"]] == [1, 2] and found["sources"][0]["path"].endswith(
            "zebra.md"
        )
        assert found["sources"][0]["score"] > 0 and found["question"] == QUESTION
        with httpx.stream(
            "POST", f"{url}/v1/ask", json={"question": QUESTION, "k": 2, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            *answer, done = list(events(r))
        assert done == "[DONE]" and [a.pop("type") for a in answer] == ["answer"]
        answer[0].pop("timings"), found.pop("timings")
        assert answer[0] == found
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{not json")
        r = ask(url, question=QUESTION)
        assert r.status_code == 200 and "cannot be loaded" in r.json()["reader_unavailable"], r.text
        assert not reader_status(url)["loaded"]


def test_closing_a_stream_stops_generating_and_frees_the_reader(babbler):
    body = {"question": "What is FAISS?", "stream": True, "max_new_tokens": 512}
    before = reader_status(babbler)
    with httpx.stream("POST", f"{babbler}/v1/ask", json=body, timeout=60) as r:
        first = next(events(r))
        assert first["type"] == "token"
    # the client is gone: the generation must stop (~1.5 s for all 512 tokens if it went on;
    # the babbler never stops early, see test_concurrent_streams_both_complete_undisturbed)
    deadline = time.monotonic() + 30
    while (status := reader_status(babbler))["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not status["busy"], "the reader is still generating for a client that left"
    assert (status["cancelled"], status["answered"]) == (before["cancelled"] + 1, before["answered"])

    # the lock is free: the next question is answered, sampled this time
    r = ask(babbler, question="What is FAISS?", max_new_tokens=7, temperature=1.5)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "length" and r.json()["timings"]["new_tokens"] == 7
    assert reader_status(babbler)["answered"] == before["answered"] + 1


def test_concurrent_streams_both_complete_undisturbed(babbler):
    """Two streams at once take turns on the one model (a lock): neither hangs nor garbles the other."""
    body = {"question": "What is FAISS?", "stream": True, "max_new_tokens": 40}
    before = reader_status(babbler)["answered"]
    with (
        httpx.stream("POST", f"{babbler}/v1/ask", json=body, timeout=60) as a,
        httpx.stream("POST", f"{babbler}/v1/ask", json=body, timeout=60) as b,
    ):
        first, second = list(events(a)), list(events(b))
    for got in (first, second):
        assert got[-1] == "[DONE]" and got[-2]["type"] == "answer"
        assert got[-2]["timings"]["new_tokens"] == 40
        assert "".join(e["text"] for e in got[:-2]) == got[-2]["answer"]
    assert first[-2]["answer"] == second[-2]["answer"]  # greedy: the same question, the same text
    assert reader_status(babbler)["answered"] == before + 2


def test_openapi_lists_ask(parrot):
    spec = httpx.get(f"{parrot}/openapi.json", timeout=30).json()
    schema = spec["components"]["schemas"]["AskRequest"]["properties"]
    max_new = next(a for a in schema["max_new_tokens"]["anyOf"] if a.get("type") == "integer")
    assert schema["k"]["maximum"] == 20 and max_new["maximum"] == 512


def test_a_full_answer_queue_is_503_and_the_server_stays_responsive(babbler):
    """RAG_ANSWER_QUEUE (4) answers may run or wait; the next is refused at once with Retry-After
    instead of blocking a server thread, and other endpoints keep answering."""
    body = {"question": "What is FAISS?", "max_new_tokens": 512, "stream": True}
    with contextlib.ExitStack() as streams:
        opened = [
            streams.enter_context(httpx.stream("POST", f"{babbler}/v1/ask", json=body, timeout=60))
            for _ in range(4)
        ]
        assert all(r.status_code == 200 for r in opened)
        t0 = time.monotonic()
        busy = ask(babbler, question="What is FAISS?", max_new_tokens=4)
        assert (
            busy.status_code == 503 and busy.headers["retry-after"] == "2" and "busy" in busy.json()["detail"]
        )
        assert reader_status(babbler)["busy"] and time.monotonic() - t0 < 5
        assert httpx.get(f"{babbler}/v1/stats", timeout=10).status_code == 200
    deadline = time.monotonic() + 30  # closed streams give their slots back within a token or so
    while (r := ask(babbler, question="What is FAISS?", max_new_tokens=4)).status_code == 503:
        assert time.monotonic() < deadline, "answer slots were not given back"
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["timings"]["new_tokens"] == 4
