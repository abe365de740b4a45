"""`rag bench api` in miniature: a real server process, real clients, every phase measured."""

from __future__ import annotations

from bench.api import run
from bench.search import build_index
from rag.config import Settings


def test_bench_api_measures_every_phase(tmp_path, shared_data):
    index = tmp_path / "index"
    build_index(index, 200, 40, Settings().embedding_model, 384)
    result = run(index, tmp_path / "no-reader", search_clients=2, searches=5, answer_clients=1, answers=2)
    assert result["reader"] == "none: answers are the search fallback"
    assert result["server"].endswith("index of 200 chunks")
    single, many, asked_1, during_1, asked, during = result["phases"]
    assert (single["requests"], many["requests"], asked_1["requests"], asked["requests"]) == (5, 10, 2, 2)
    assert all(p["errors"] == 0 and p["p95_ms"] >= p["p50_ms"] > 0 for p in result["phases"])
    assert during_1["requests"] >= 1 and during["requests"] >= 2
    assert result["search_p95_during_answers_over_single_p95"] == during_1["p95_ms"] / single["p95_ms"]
    assert result["many_search_p95_during_answers_over_many_p95"] == during["p95_ms"] / many["p95_ms"]
    assert result["peak_server_rss_mb"] > 100  # the server with its embedder loaded
