"""The REST API over a real uvicorn server, a real index and the real embedding model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rag.config import DEFAULT_EMBEDDING_MODEL, Settings
from rag.embed import resolve_model
from rag.ingest.job import ingest
from tests.app.servers import KEY, start_server, stop, warm_up


@pytest.fixture(scope="module")
def server(corpus):
    proc, url = start_server(corpus, corpus / "index", KEY)
    warm_up(url)
    yield url
    stop(proc)


def test_search_returns_citable_hits(server):
    r = httpx.post(f"{server}/v1/search", json={"query": "striped African equines", "k": 2}, timeout=60)
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["path"].endswith("zebra.md")
    hit = results[0]
    assert hit["page"] == 1 and hit["end"] > hit["start"] >= 0
    assert "striped" in hit["text"]


@pytest.mark.parametrize(
    "body",
    [
        {"query": ""},
        {"query": "   "},
        {"query": "x" * 2001},
        {"query": "zebra", "k": 0},
        {"query": "zebra", "k": 1000},
        {"query": "zebra", "k": "many"},
        {"query": "zebra", "mode": "telepathy"},
        {"query": "zebra", "mmr_lambda": 2},
        {"k": 3},
    ],
)
def test_invalid_search_input_is_4xx(server, body):
    r = httpx.post(f"{server}/v1/search", json=body, timeout=30)
    assert r.status_code == 422, r.text


def test_non_json_body_is_4xx(server):
    r = httpx.post(f"{server}/v1/search", content=b"\xff\xfe not json", timeout=30)
    assert r.status_code == 422


def test_documents_and_stats(server):
    docs = httpx.get(f"{server}/v1/documents", timeout=30).json()
    assert sorted(Path(d["path"]).name for d in docs) == ["faiss.txt", "zebra.md"]
    stats = httpx.get(f"{server}/v1/stats", timeout=30).json()
    assert stats["documents"] == 2


def test_admin_endpoints_need_the_key(server, corpus):
    body = {"paths": [str(corpus / "docs")]}
    assert httpx.post(f"{server}/v1/ingest", json=body, timeout=30).status_code == 401
    wrong = {"X-API-Key": "nope"}
    assert httpx.post(f"{server}/v1/ingest", json=body, headers=wrong, timeout=30).status_code == 401
    assert httpx.delete(f"{server}/v1/documents/1", timeout=30).status_code == 401


def test_ingest_path_validation(server, corpus):
    h = {"X-API-Key": KEY}
    outside = {"paths": [str(corpus / "outside")]}
    assert httpx.post(f"{server}/v1/ingest", json=outside, headers=h, timeout=30).status_code == 403
    escape = {"paths": [str(corpus / "docs" / ".." / "outside")]}
    assert httpx.post(f"{server}/v1/ingest", json=escape, headers=h, timeout=30).status_code == 403
    missing = {"paths": [str(corpus / "docs" / "nope.txt")]}
    assert httpx.post(f"{server}/v1/ingest", json=missing, headers=h, timeout=30).status_code == 404
    assert httpx.post(f"{server}/v1/ingest", json={"paths": []}, headers=h, timeout=30).status_code == 422
    for bad in ["~nosuchuser-xyz/a", str(corpus / "docs" / ("n" * 1000)), "x" * 5000, ""]:
        r = httpx.post(f"{server}/v1/ingest", json={"paths": [bad]}, headers=h, timeout=30)
        assert r.status_code == 422, (bad[:40], r.status_code, r.text[:200])
    assert httpx.post(f"{server}/v1/ingest", json={"paths": "docs"}, headers=h, timeout=30).status_code == 422


def test_ingest_then_search_then_delete(server, corpus):
    h = {"X-API-Key": KEY}
    new = corpus / "docs" / "okapi.txt"
    new.write_text("The okapi is a giraffid from the Congo with zebra-like stripes on its legs.\n")
    report = httpx.post(f"{server}/v1/ingest", json={"paths": [str(corpus / "docs")]}, headers=h, timeout=300)
    assert report.status_code == 200, report.text
    assert report.json()["ingested"] == 1 and report.json()["unchanged"] == 2

    r = httpx.post(f"{server}/v1/search", json={"query": "okapi Congo", "mode": "bm25", "k": 1}, timeout=30)
    okapi = r.json()["results"][0]
    assert okapi["path"].endswith("okapi.txt")

    assert httpx.delete(f"{server}/v1/documents/999999", headers=h, timeout=30).status_code == 404
    assert httpx.delete(f"{server}/v1/documents/abc", headers=h, timeout=30).status_code == 422
    assert httpx.delete(f"{server}/v1/documents/{10**23}", headers=h, timeout=30).status_code == 422
    assert httpx.delete(f"{server}/v1/documents/0", headers=h, timeout=30).status_code == 422
    assert httpx.delete(f"{server}/v1/documents/{okapi['doc_id']}", headers=h, timeout=30).status_code == 200
    r = httpx.post(f"{server}/v1/search", json={"query": "okapi Congo", "mode": "bm25", "k": 5}, timeout=30)
    assert all(not hit["path"].endswith("okapi.txt") for hit in r.json()["results"])


def test_missing_index_and_disabled_admin(tmp_path, corpus):
    proc, url = start_server(corpus, tmp_path / "no-index", api_key=None)
    try:
        r = httpx.post(f"{url}/v1/search", json={"query": "zebra"}, timeout=30)
        assert r.status_code == 503 and "rag ingest" in r.json()["detail"]
        r = httpx.post(f"{url}/v1/ingest", json={"paths": ["docs"]}, headers={"X-API-Key": "x"}, timeout=30)
        assert r.status_code == 403 and "RAG_API_KEY" in r.json()["detail"]
    finally:
        stop(proc)


def test_delete_on_a_missing_index_creates_nothing(tmp_path, corpus):
    proc, url = start_server(corpus, tmp_path / "no-index", api_key=KEY)
    try:
        r = httpx.delete(f"{url}/v1/documents/1", headers={"X-API-Key": KEY}, timeout=30)
        assert r.status_code == 503 and "rag ingest" in r.json()["detail"]
        assert not (tmp_path / "no-index").exists()
    finally:
        stop(proc)


def test_openapi_docs_are_served(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    assert {"/v1/search", "/v1/ingest", "/v1/documents"} <= set(spec["paths"])


@pytest.fixture(scope="module")
def foreign_index(tmp_path_factory) -> tuple[Path, str]:
    """An index built under another model name (the bundled weights behind a symlink, gone after)."""
    root = tmp_path_factory.mktemp("foreign")
    (root / "docs").mkdir()
    (root / "docs" / "heron.md").write_text("# Herons\n\nHerons are long-legged freshwater wading birds.\n")
    link = root / "model-now-gone"
    link.symlink_to(resolve_model(DEFAULT_EMBEDDING_MODEL), target_is_directory=True)
    ingest([root / "docs"], Settings(index_dir=root / "index", embedding_model=str(link)))
    link.unlink()
    return root, str(link)


def test_listing_works_on_an_index_of_another_model_search_is_409(foreign_index):
    root, model = foreign_index
    proc, url = start_server(root, root / "index", api_key=None)  # the default embedding model
    try:
        docs = httpx.get(f"{url}/v1/documents", timeout=30)
        assert docs.status_code == 200, docs.text
        assert [Path(d["path"]).name for d in docs.json()] == ["heron.md"]
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        assert stats["documents"] == 1 and stats["embedding_model"] == model
        r = httpx.post(f"{url}/v1/search", json={"query": "wading birds"}, timeout=30)
        assert r.status_code == 409, r.text
        assert model in r.json()["detail"] and repr(DEFAULT_EMBEDDING_MODEL) in r.json()["detail"]
    finally:
        stop(proc)


def test_listing_never_loads_the_embedder(foreign_index, monkeypatch):
    """The server's model is the index's, but cannot be loaded: only search may notice."""
    root, model = foreign_index
    monkeypatch.setenv("RAG_EMBEDDING_MODEL", model)
    proc, url = start_server(root, root / "index", api_key=None)
    try:
        assert httpx.get(f"{url}/v1/documents", timeout=30).status_code == 200
        r = httpx.post(f"{url}/v1/search", json={"query": "wading birds"}, timeout=600)  # tries to load it
        assert r.status_code == 503 and "cannot load embedding model" in r.json()["detail"]
        stats = httpx.get(f"{url}/v1/stats", timeout=30)
        assert stats.status_code == 200 and stats.json()["documents"] == 1
    finally:
        stop(proc)
