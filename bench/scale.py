"""Flat vs approximate vector index at a base size (100k) and at N chunks (1M): `rag bench scale`.

Texts are REAL (Gutenberg passages, written through `Store.put_document` by bench/search.py's
`build_index`). Vectors are a STAND-IN: embedding 1M chunks takes days on 2 CPU cores, and random
unit vectors (what `rag bench search` uses) have no neighbourhood structure, so an IVF index would
look far worse on them than on real embeddings. Here they come from a Gaussian mixture: `clusters`
random unit centres, each vector a centre plus isotropic noise of norm `NOISE`, normalized (cosine
0.8 to its centre, ~0.64 between two of a cluster: a plausible spread, not a measured one).
Recall@10 of the approximate index is measured against flat on query vectors drawn from the same
mixture; hybrid latency on SQuAD dev questions embedded for real through `rag.retrieve.Retriever`.

For each size, the vector index is rebuilt from SQLite's vectors as flat and as the approximate
kind (settings' `vector_auto_kind` with their nlist / nprobe / rerank), by opening a writer
`Store` with that `VectorSpec`, the kind already on disk last: "build_s" is that open (the other
kind's snapshot loaded, the rebuild, the snapshot written; BM25 loaded from its snapshot).
"rss_mb" is the whole process (embedder included) after the queries; "rss_delta_mb" its growth
while this kind was opened and queried (freed memory is not always returned to the system).
Then 10 files are added to the N-chunk approximate index (BM25 + vectors, embedding excluded:
`put_document` + `save`) and deleted again, so the cached index stays as built.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

from bench.data import BENCH_DIR, passages, squad_questions
from bench.search import _timed_ms, build_index
from rag.config import Settings
from rag.embed import Embedder, get_embedder
from rag.retrieve import Retriever
from rag.store import MANIFEST_NAME, FileMeta, Store
from rag.types import Chunk
from rag.vectors import VectorSpec

NOISE = 0.75  # norm of a vector's offset from its cluster centre, before normalizing
ADD_FILES, CHUNKS_PER_ADDED_FILE = 10, 20
RECALL_TARGET, P50_FACTOR_TARGET, ADD_TARGET_S = 0.95, 2.0, 5.0
WARMUP = 10


class GaussianMixture:
    """Unit vectors clustered like real embeddings: a fixed set of random unit centres, each vector
    one centre plus Gaussian noise of norm about NOISE, normalized (cosine ~0.8 to its centre)."""

    def __init__(self, clusters: int, dim: int, seed: int):
        self.rng = np.random.default_rng(seed)
        centres = np.random.default_rng(12345).standard_normal((clusters, dim))  # one fixed mixture
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def unit(self, n: int) -> np.ndarray:
        dim = self.centres.shape[1]
        noise = self.rng.standard_normal((n, dim)) * (NOISE / np.sqrt(dim))
        vecs = (self.centres[self.rng.integers(len(self.centres), size=n)] + noise).astype(np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _add_files(store: Store, mixture: GaussianMixture, words: int) -> float:
    """Seconds to add ADD_FILES documents (BM25 + vectors, pre-computed) and publish the snapshot."""
    texts = passages(ADD_FILES * CHUNKS_PER_ADDED_FILE, words)
    vecs = mixture.unit(len(texts))
    added = []
    t0 = time.perf_counter()
    for f in range(ADD_FILES):
        part = slice(f * CHUNKS_PER_ADDED_FILE, (f + 1) * CHUNKS_PER_ADDED_FILE)
        chunks = [Chunk(page=1, start=0, end=len(t), text=t) for t in texts[part]]
        batches = [(chunks, vecs[part])]
        added.append(
            store.put_document(
                f"/bench/added{f:02d}.txt", title=f"added {f}", meta=FileMeta(), batches=batches
            )
        )
    store.save()
    seconds = time.perf_counter() - t0
    for doc in added:  # restore the cached index (not timed)
        store.delete_document(doc.id, persist=False)
    store.save()
    return seconds


def _measure_kind(
    index_dir: Path, spec: VectorSpec, embedder: Embedder, questions: list[str], qvecs: np.ndarray, k: int
) -> tuple[dict, list[set[int]], Store]:
    """Row of one (size, kind); the store is returned open (the caller closes it)."""
    gc.collect()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    store = Store(index_dir, embedder.name, vectors=spec)  # a writer: rebuilds the vector index
    build_s = time.perf_counter() - t0
    found = [{cid for cid, _ in store.dense_search(q, k)} for q in qvecs]
    retriever = Retriever(store, embedder)
    hybrid = [_timed_ms(lambda q=q: retriever.search(q, k, mode="hybrid"))[0] for q in questions]
    lexical = [_timed_ms(lambda q=q: store.bm25_search(q, k))[0] for q in questions]
    stats = store.stats()
    p50, p95 = np.percentile(hybrid[WARMUP:], [50, 95])
    bm25_p50, bm25_p95 = np.percentile(lexical[WARMUP:], [50, 95])
    row = {
        "chunks": stats["chunks"],
        "kind": stats["vector_index"],
        "nlist": stats["vector_nlist"],
        "nprobe": spec.nprobe if stats["vector_nlist"] else None,
        "build_s": build_s,
        "rss_mb": _rss_mb(),
        "rss_delta_mb": _rss_mb() - rss0,
        "bytes_per_vector": stats["vector_bytes_per_vector"],
        "hybrid_p50_ms": float(p50),
        "hybrid_p95_ms": float(p95),
        "bm25_p50_ms": float(bm25_p50),  # Store.bm25_search alone: the segmented BM25 at this size
        "bm25_p95_ms": float(bm25_p95),
        "bm25_segments": stats["bm25_segments"],
    }
    return row, found, store


def run(
    chunks: int = 1_000_000,
    base_chunks: int = 100_000,
    queries: int = 200,
    k: int = 10,
    words: int = 120,
    clusters: int = 256,
    threads: int = 1,
    bench_dir: Path = BENCH_DIR,
) -> dict:
    """Build (or reuse) both indexes; measure flat and the approximate kind at each size."""
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    settings = Settings()
    embedder = get_embedder(settings.embedding_model, settings.device, settings.embedding_batch_size)
    approx = VectorSpec.from_settings(settings)
    questions = squad_questions(queries + WARMUP)
    qvecs = GaussianMixture(clusters, embedder.dim, seed=1).unit(queries)
    rows, add_s = [], None
    for size, n in (("base", base_chunks), ("N", chunks)):
        index_dir = bench_dir / "scale" / f"index-{n}x{words}w-mix{clusters}"
        vectors = GaussianMixture(clusters, embedder.dim, seed=0).unit
        build_index(index_dir, n, words, embedder.name, embedder.dim, vectors)
        # the kind already on disk goes last, so that each open really rebuilds the vector index
        on_disk = json.loads((index_dir / MANIFEST_NAME).read_text())["vectors"]["kind"]
        found, measured = {}, {}
        for kind in sorted(("flat", approx.auto_kind), key=lambda kind: kind == on_disk):
            spec = dataclasses.replace(approx, kind=kind)
            measured[kind], found[kind], store = _measure_kind(index_dir, spec, embedder, questions, qvecs, k)
            with store:
                if size == "N" and kind != "flat":
                    add_s = _add_files(store, GaussianMixture(clusters, embedder.dim, seed=2), words)
        for kind in ("flat", approx.auto_kind):
            overlap = [len(a & e) / max(1, len(e)) for a, e in zip(found[kind], found["flat"], strict=True)]
            rows.append({"size": size, **measured[kind], "recall_at_10": float(np.mean(overlap))})
    base_flat_p50 = next(r["hybrid_p50_ms"] for r in rows if r["size"] == "base" and r["kind"] == "flat")
    p50_target = P50_FACTOR_TARGET * base_flat_p50
    for r in rows:  # the same columns in every row (tables), None where no target applies
        r["recall_at_10_target"] = RECALL_TARGET if r["kind"] != "flat" else None
        r["hybrid_p50_target_ms"] = p50_target if r["size"] == "N" else None
    n_approx = next(r for r in rows if r["size"] == "N" and r["kind"] != "flat")
    return {
        "chunks": chunks,
        "base_chunks": base_chunks,
        "queries": queries,
        "k": k,
        "threads": threads,
        "texts": f"real Gutenberg passages of {words} words",
        "vectors": f"stand-in: Gaussian mixture of {clusters} random unit centres, offset noise of norm "
        f"{NOISE}, normalized (random unit vectors would understate IVF recall)",
        "recall_queries": f"{queries} vectors from the same mixture; recall@{k} of each kind vs flat",
        "latency_queries": f"{queries} SQuAD dev questions embedded for real, hybrid via Retriever",
        "rows": rows,
        "add_10_files_s": add_s,
        "add_10_files_what": f"{ADD_FILES} files x {CHUNKS_PER_ADDED_FILE} chunks into the N-chunk "
        f"{approx.auto_kind} index: put_document + save (BM25 + vectors), embedding excluded",
        "add_10_files_target_s": ADD_TARGET_S,
        "targets_met": {
            "recall_at_10": all(r["recall_at_10"] >= RECALL_TARGET for r in rows),
            "hybrid_p50_at_N": n_approx["hybrid_p50_ms"] <= p50_target,
            "add_10_files": add_s is not None and add_s <= ADD_TARGET_S,
        },
    }
