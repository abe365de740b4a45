"""`rag bench scale` in miniature: 1,000 and 3,000 chunks, flat vs IVF really used at both."""

from __future__ import annotations

from bench.scale import run


def test_bench_scale_measures_both_kinds_at_both_sizes(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("RAG_VECTOR_NPROBE", "8")  # fewer lists than the index has: really approximate
    result = run(chunks=3000, base_chunks=1000, queries=20, clusters=32, bench_dir=tmp_path)
    rows = {(r["size"], r["kind"]): r for r in result["rows"]}
    assert set(rows) == {("base", "flat"), ("base", "ivf-sq8"), ("N", "flat"), ("N", "ivf-sq8")}
    assert [rows[("base", k)]["chunks"] for k in ("flat", "ivf-sq8")] == [1000, 1000]
    assert [rows[("N", k)]["chunks"] for k in ("flat", "ivf-sq8")] == [3000, 3000]  # the 10 files removed
    for (_, kind), r in rows.items():
        assert 0.0 <= r["recall_at_10"] <= 1.0
        assert r["hybrid_p95_ms"] >= r["hybrid_p50_ms"] > 0 and r["build_s"] > 0 and r["rss_mb"] > 100
        assert r["bm25_p95_ms"] >= r["bm25_p50_ms"] > 0 and r["bm25_segments"] >= 1
        if kind == "flat":
            assert r["recall_at_10"] == 1.0 and r["bytes_per_vector"] == 384 * 4 + 8 and r["nlist"] == 0
        else:
            assert r["nlist"] > r["nprobe"] == 8  # only some lists scanned
            assert r["recall_at_10"] >= 0.9 and r["recall_at_10_target"] == 0.95  # clustered stand-in
            assert r["bytes_per_vector"] == 384 + 8
    base_p50 = rows[("base", "flat")]["hybrid_p50_ms"]
    assert rows[("N", "ivf-sq8")]["hybrid_p50_target_ms"] == 2 * base_p50
    assert (
        rows[("base", "flat")]["hybrid_p50_target_ms"] is None is rows[("N", "flat")]["recall_at_10_target"]
    )
    assert 0 < result["add_10_files_s"] < 60 and result["add_10_files_target_s"] == 5.0
    assert set(result["targets_met"]) == {"recall_at_10", "hybrid_p50_at_N", "add_10_files"}
    assert "Gaussian mixture" in result["vectors"] and "real" in result["texts"]
