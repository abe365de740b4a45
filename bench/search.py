"""Search latency at 100k chunks: dense, BM25 and hybrid, against a raw FAISS search.

Embedding 100k chunks takes hours on 2 CPU cores, so the benchmark index holds REAL texts
(Gutenberg passages) with RANDOM unit vectors, written through the real `Store.put_document`
path. That leaves latency unchanged: a flat inner-product scan costs the same whatever the
values, and BM25 sees the real texts. Queries (SQuAD questions) are embedded for real.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from bench.data import BENCH_DIR, DONE, passages, squad_questions
from bench.ingest import timed
from rag.config import Settings
from rag.embed import get_embedder
from rag.retrieve import Retriever
from rag.store import FAISS_NAME, FileMeta, Store
from rag.types import Chunk

CHUNKS_PER_DOC = 100


def random_unit_vectors(dim: int, seed: int = 0) -> Callable[[int], np.ndarray]:
    """n -> (n, dim) float32 unit vectors, uniform on the sphere, one seeded stream."""
    rng = np.random.default_rng(seed)

    def draw(n: int) -> np.ndarray:
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)

    return draw


def build_index(
    index_dir: Path,
    n_chunks: int,
    words: int,
    model: str,
    dim: int,
    vectors: Callable[[int], np.ndarray] | None = None,
) -> None:
    """Documents of CHUNKS_PER_DOC passages each, with `vectors(n)` (default: random unit vectors);
    reused if complete."""
    if (index_dir / DONE).exists():
        return
    shutil.rmtree(index_dir, ignore_errors=True)
    texts = passages(n_chunks, words)
    draw = vectors or random_unit_vectors(dim)
    with Store(index_dir, model, dim) as store:
        for d in tqdm(range(0, n_chunks, CHUNKS_PER_DOC), desc="building benchmark index", unit="doc"):
            part = texts[d : d + CHUNKS_PER_DOC]
            chunks, start = [], 0
            for text in part:
                chunks.append(Chunk(page=1, start=start, end=start + len(text), text=text))
                start += len(text) + 2  # the document is the passages joined by blank lines
            vecs = draw(len(part))
            store.put_document(
                f"/bench/doc{d // CHUNKS_PER_DOC:05d}.txt",
                title=f"benchmark document {d // CHUNKS_PER_DOC}",
                meta=FileMeta(sha256="0" * 64, size=start, mtime=0.0),
                batches=[(chunks, vecs)],
            )
        store.save()
    (index_dir / DONE).touch()


def _timed_ms(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and process-CPU milliseconds; with 1 thread, CPU time estimates an idle core's latency."""
    wall, cpu, out = timed(fn)
    return wall * 1e3, cpu * 1e3, out


def measure(retriever: Retriever, raw: faiss.Index, queries: list[str], k: int) -> dict[str, list[float]]:
    """Per-query wall ms ("stage") and CPU ms ("stage/cpu") of each stage, interleaved per query
    so that drift in machine load hits all stages alike."""
    store, embedder = retriever.store, retriever.embedder
    times: dict[str, list[float]] = {}
    for q in tqdm(queries, desc="queries", unit="q"):
        *embed_ms, vec = _timed_ms(lambda q=q: embedder.encode_query(q))
        stages = {
            "embed_query": embed_ms,
            "faiss_raw": _timed_ms(lambda v=vec: raw.search(v.reshape(1, -1), k))[:2],
            "store_dense": _timed_ms(lambda v=vec: store.dense_search(v, k))[:2],
            "dense": _timed_ms(lambda q=q: retriever.search(q, k, mode="dense"))[:2],
            "bm25": _timed_ms(lambda q=q: retriever.search(q, k, mode="bm25"))[:2],
            "hybrid": _timed_ms(lambda q=q: retriever.search(q, k, mode="hybrid"))[:2],
        }
        for name, (wall, cpu) in stages.items():
            times.setdefault(name, []).append(wall)
            times.setdefault(f"{name}/cpu", []).append(cpu)
    return times


def run(chunks: int = 100_000, queries: int = 200, k: int = 5, words: int = 120, threads: int = 1) -> dict:
    """Build (or reuse) the index, then time `queries` SQuAD questions in every mode."""
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    settings = Settings()
    embedder = get_embedder(settings.embedding_model, settings.device, settings.embedding_batch_size)
    index_dir = BENCH_DIR / "search" / f"index-{chunks}x{words}w"
    build_index(index_dir, chunks, words, embedder.name, embedder.dim)
    qs = squad_questions(queries + 10)
    with Store(index_dir, embedder.name, readonly=True) as store:
        retriever = Retriever(store, embedder)
        raw = faiss.read_index(str(index_dir / FAISS_NAME))
        measure(retriever, raw, qs[:10], k)  # warm-up: caches, lazy BM25 structures, allocator
        times = measure(retriever, raw, qs[10:], k)
        n = store.stats()["chunks"]
    p = {name: np.percentile(ms, [50, 95]) for name, ms in times.items()}
    stages = [name for name in times if not name.endswith("/cpu")]
    rows = [
        {
            "stage": s,
            "p50_ms": float(p[s][0]),
            "p95_ms": float(p[s][1]),
            "cpu_p50_ms": float(p[f"{s}/cpu"][0]),
            "cpu_p95_ms": float(p[f"{s}/cpu"][1]),
        }
        for s in stages
    ]
    ratios = {
        f"{what}{suffix}": p[f"{a}{suffix}"][0] / p[f"{b}{suffix}"][0]
        for suffix in ("", "/cpu")
        for what, a, b in (
            ("store_dense_over_raw_faiss_p50", "store_dense", "faiss_raw"),
            ("hybrid_over_raw_faiss_p50", "hybrid", "faiss_raw"),
            ("embed_share_of_hybrid_p50", "embed_query", "hybrid"),
        )
    }
    return {
        "chunks": n,
        "queries": len(qs) - 10,
        "k": k,
        "threads": threads,
        "vectors": "random unit vectors (texts are real Gutenberg passages)",
        "latency": rows,
        **{name: float(v) for name, v in ratios.items()},
        "hybrid_p50_target_ms": 20.0,
    }
