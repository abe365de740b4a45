"""Request limits and client conventions over a real uvicorn server: oversized bodies (declared or
chunked) get 413 before they are read, caps on lists and strings are 422, /v1/health, Bearer auth,
/v1/models, and the admin key check the web UI uses."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.app.servers import KEY, start_server, stop

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def served(corpus) -> Iterator[tuple[str, int]]:
    """(URL, pid) of a server whose request limit is LIMIT."""
    proc, url = start_server(corpus, corpus / "index", KEY, RAG_MAX_REQUEST_BYTES=str(LIMIT))
    yield url, proc.pid
    stop(proc)


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(
    url: str, head: str, body: Iterator[bytes] = iter(()), chunked: bool = False
) -> tuple[bytes, int]:
    """Send `head`, then `body` piece by piece (as chunks if `chunked`) until the server answers;
    return (the response, body bytes sent). Looks for an answer before each piece, as a client that
    watches its socket does."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=60) as sock:
        sock.sendall(head.encode())
        for piece in body:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is there
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while not answer.endswith(b"}") and (data := sock.recv(65536)):
                answer += data
    return answer, sent


def pieces(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def post_head(path: str, length: int | None = None) -> str:
    size = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{size}\r\n\r\n"


def test_a_declared_body_over_the_limit_is_413_before_a_byte_is_read(server):
    answer, sent = raw_request(server, post_head("/v1/search", 10**9))  # headers only: no body sent
    assert answer.startswith(b"HTTP/1.1 413") and sent == 0
    assert b"RAG_MAX_REQUEST_BYTES" in answer and b"65,536 bytes" in answer
    assert b"connection: close" in answer.lower()
    get = "GET /v1/health HTTP/1.1\r\nHost: test\r\nContent-Length: 999999999\r\n\r\n"
    assert raw_request(server, get)[0].startswith(b"HTTP/1.1 413")  # an endpoint that reads no body too


def test_a_chunked_body_is_counted_and_refused_without_reading_it_all(server):
    answer, sent = raw_request(server, post_head("/v1/search"), pieces(10**9), chunked=True)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 64 * 1024 * 1024  # the server stopped reading long before 1 GB


def test_an_ordinary_client_gets_the_413_not_a_broken_pipe(server):
    """httpx sends the whole body before reading: the server reads and drops a few MB to answer it."""
    for body in (b"x" * 2_000_000, pieces(2_000_000)):  # Content-Length, then chunked
        r = httpx.post(f"{server}/v1/search", content=body, timeout=60)
        assert r.status_code == 413 and "RAG_MAX_REQUEST_BYTES" in r.json()["detail"]
    r = httpx.post(f"{server}/v1/chat/completions", content=b"x" * 200_000, timeout=60)
    error = r.json()["error"]  # OpenAI's shape on OpenAI's routes
    assert r.status_code == 413 and error["code"] == "request_too_large" and "bytes" in error["message"]
    r = httpx.post(f"{server}/v1/search", json={"query": "zebra " * 5000}, timeout=60)  # under the limit
    assert r.status_code == 422  # read, then refused for its length


def test_concurrent_huge_bodies_cost_no_memory(served):
    """Three 1 GB chunked bodies at once: each is refused, the server grows by a few MB at most."""
    server, pid = served
    rss = psutil.Process(pid).memory_info().rss
    answers: list[bytes] = []
    peak = [rss]

    def send() -> None:
        answers.append(raw_request(server, post_head("/v1/ask"), pieces(10**9), chunked=True)[0])

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(psutil.Process(pid).memory_info().rss)
        time.sleep(0.05)
    assert len(answers) == 3 and all(a.startswith(b"HTTP/1.1 413") for a in answers)
    assert max(peak) - rss < 64 * 1024 * 1024, f"server grew by {(max(peak) - rss) / 2**20:.0f} MB"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}] * 51}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "t" * 33}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "m" * 257}),
        ("/v1/ingest", {"paths": ["docs"] * 101}),
        ("/v1/search", {"query": "q" * 2001}),
    ],
)
def test_lists_and_strings_are_capped(server, path, body):
    r = httpx.post(f"{server}{path}", json=body, headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 422, r.text


def test_health_under_v1_and_the_old_name(server):
    for path in ("/v1/health", "/health"):
        r = httpx.get(f"{server}{path}", timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_admin_key_as_bearer_or_x_api_key(server):
    check = f"{server}/v1/admin"
    assert httpx.get(check, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json() == {"admin": True}
    assert httpx.get(check, headers={"X-API-Key": KEY}, timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(check, headers=headers, timeout=30)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"], headers
    r = httpx.delete(f"{server}/v1/documents/999999", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 404  # past the key check


def test_models_lists_the_reader(server):
    models = httpx.get(f"{server}/v1/models", timeout=30).json()
    [card] = models["data"]
    assert models["object"] == "list" and (card["id"], card["object"]) == ("rag", "model")
    assert card["rag"]["available"] is False and card["rag"]["model_dir"].endswith("no-reader-model")
    assert httpx.get(f"{server}/v1/models/rag", timeout=30).json() == card
    r = httpx.get(f"{server}/v1/models/gpt-4", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
