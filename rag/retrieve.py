"""Dense, BM25 and hybrid retrieval over a Store, with optional MMR diversification.

Hybrid fuses ranks, not scores (reciprocal rank fusion): cosine similarities and BM25 scores live
on unrelated scales, while ranks are comparable and need no per-corpus calibration.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from rag.config import Settings, get_settings
from rag.embed import Embedder, get_embedder
from rag.store import Store
from rag.types import Hit

Scored = list[tuple[int, float]]  # (chunk id, score), best first

MODES = ("hybrid", "dense", "bm25")
# Cormack et al. (2009) use 60; a smaller k trusts the top ranks of each list more. On SciFact
# (docs/benchmarks.md) k=10 beat 60 by +0.012 nDCG@10, on both halves of the queries.
RRF_K = 10
DEPTH = 100  # candidates taken from each list before fusing
MMR_POOL = 4  # MMR re-ranks this many times k candidates


def rrf(rankings: Sequence[Scored], k: int = RRF_K, weights: Sequence[float] | None = None) -> Scored:
    """Reciprocal rank fusion: score(d) = sum_i w_i / (k + rank_i(d)), ranks from 1; ties by id."""
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    fused: dict[int, float] = defaultdict(float)
    for ranking, w in zip(rankings, weights, strict=True):
        for rank, (item, _) in enumerate(ranking, start=1):
            fused[item] += w / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def mmr(candidates: Scored, vectors: np.ndarray, k: int, lam: float) -> Scored:
    """Maximal marginal relevance: greedily pick lam*relevance - (1-lam)*max similarity to picks.

    Relevance is the candidates' own score min-max scaled to [0, 1], so MMR works on top of any
    mode (BM25 and RRF scores are not cosines); similarity is cosine between the chunk vectors.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mmr_lambda must be in [0, 1], got {lam}")
    if not candidates:
        return []
    scores = np.array([s for _, s in candidates], dtype=np.float64)
    span = scores.max() - scores.min()
    relevance = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    sim = vectors @ vectors.T
    chosen: list[int] = []
    redundancy = np.full(len(candidates), -np.inf)
    remaining = np.ones(len(candidates), dtype=bool)
    for _ in range(min(k, len(candidates))):
        gain = lam * relevance - (1.0 - lam) * (redundancy if chosen else 0.0)
        gain[~remaining] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        remaining[best] = False
        redundancy = np.maximum(redundancy, sim[best])
    return [candidates[i] for i in chosen]


class Retriever:
    """Ranks chunks of one Store for a query; `search` returns citable Hits."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        *,
        rrf_k: int = RRF_K,
        depth: int = DEPTH,
        weights: tuple[float, float] = (1.0, 1.0),
    ):
        self.store, self.embedder = store, embedder
        self.rrf_k, self.depth, self.weights = rrf_k, depth, weights

    def rank(self, query: str, k: int, mode: str = "hybrid", query_vec: np.ndarray | None = None) -> Scored:
        """Top-k (chunk id, score); hybrid fuses the top max(depth, k) chunks of each list.

        Pass query_vec to reuse a batch-encoded query (evaluation).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "bm25":
            return self.store.bm25_search(query, k)
        vec = self.embedder.encode_query(query) if query_vec is None else query_vec
        if mode == "dense":
            return self.store.dense_search(vec, k)
        depth = max(self.depth, k)
        lists = [self.store.dense_search(vec, depth), self.store.bm25_search(query, depth)]
        return rrf(lists, k=self.rrf_k, weights=self.weights)[:k]

    def search(
        self, query: str, k: int = 5, mode: str = "hybrid", mmr_lambda: float | None = None
    ) -> list[Hit]:
        if not query.strip():
            raise ValueError("query is empty")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if mmr_lambda is None:
            return self.store.hits(self.rank(query, k, mode))
        vec = None if mode == "bm25" else self.embedder.encode_query(query)
        with self.store.pinned():  # a concurrent refresh() must not drop pool ids before vectors()
            pool = self.rank(query, k * MMR_POOL, mode, query_vec=vec)
            vectors = self.store.vectors([cid for cid, _ in pool])
        return self.store.hits(mmr(pool, vectors, k, mmr_lambda))


def open_retriever(settings: Settings | None = None) -> Retriever:
    """Open the configured index read-only with the embedder it was built with."""
    settings = settings or get_settings()
    store = Store(settings.index_dir, embedding_model=settings.embedding_model, readonly=True)
    return Retriever(store, get_embedder(settings.embedding_model, settings.device))
