"""`rag bench embed` in miniature: torch and the three ONNX variants on a few real texts."""

from __future__ import annotations

from bench.embed import VARIANTS, run, variant_file


def test_bench_embed_times_every_variant_against_torch(tmp_path, shared_data, embedder):
    result = run(n_passages=6, words=40, n_queries=4, rounds=1, cache_dir=tmp_path)
    rows = {r["backend"]: r for r in result["backends"]}
    assert list(rows) == ["torch", *VARIANTS]
    assert rows["torch"]["passages_per_cpu_s_ratio"] == 1.0 and not rows["torch"]["target_met"]
    for row in rows.values():
        assert row["passages_per_s"] > 0 and row["queries_per_cpu_s"] > 0
    # fp32 graphs give torch's vectors; int8 is close but is measured, not assumed
    assert rows["onnx"]["min_cosine"] >= 0.999 and rows["onnx-fused"]["min_cosine"] >= 0.999
    assert 0.9 < rows["onnx-int8"]["min_cosine"] < 1.0
    files = {v: variant_file(embedder, v, tmp_path) for v in VARIANTS}
    assert len(set(files.values())) == 3 and all(p.is_file() for p in files.values())
    assert not list(tmp_path.rglob(".tmp-*"))
