"""Dense, BM25 and hybrid retrieval over a Store, with optional MMR diversification.

Hybrid fuses ranks, not scores (reciprocal rank fusion): cosine similarities and BM25 scores live
on unrelated scales, while ranks are comparable and need no per-corpus calibration.

The dense list only counts where the embedding model can read the text. The bundled model's
English vocabulary spells Russian or Ukrainian letter by letter and returns noise for it, and plain
RRF let that noise push the right BM25 hit down (XQuAD-ru hit@1: BM25 0.76, hybrid 0.51). So each
dense entry's RRF share is weighted by `dense_weight` of the query's and the chunk's coverage
(`Embedder.coverage`): 1 for English, German or Czech, 0 for Cyrillic with that model, where hybrid
then is BM25 exactly. Equal fused scores go to the better BM25 rank. docs/benchmarks.md has the
measurements behind the thresholds.
"""

from __future__ import annotations

import math
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
# Dense weight from coverage: 0 at or below a ramp's low end, 1 at or above its high end, linear
# between. Chosen on XQuAD en/de/ru and SciFact, on two halves of each (docs/benchmarks.md): a
# chunk ramp from 0.6 cost SciFact abstracts, whose technical words split into pieces, 0.008 nDCG@10.
QUERY_RAMP = (0.6, 0.8)
CHUNK_RAMP = (0.55, 0.75)
COVERAGE_CACHE = 200_000  # chunk coverages remembered per Retriever (a chunk id's text never changes)


def dense_weight(coverage: np.ndarray | float, ramp: tuple[float, float] = QUERY_RAMP) -> np.ndarray:
    """How much a dense score counts, from the embedder's coverage of the text (see module doc)."""
    low, high = ramp
    return np.clip((np.asarray(coverage, dtype=np.float64) - low) / (high - low), 0, 1)


def fuse(
    dense: Scored, bm25: Scored, dense_weights: Sequence[float], k: int = RRF_K, bm25_weight: float = 1.0
) -> Scored:
    """Hybrid score(c) = w_c / (k + dense rank) + bm25_weight / (k + BM25 rank), ranks from 1, w_c
    the dense weight of chunk c in this query. Ties go to the better BM25 rank, then the better
    dense rank (so chunks of weight 0 still fill the list, last), then the lower id."""
    if len(dense_weights) != len(dense):
        raise ValueError(f"{len(dense_weights)} dense weights for {len(dense)} dense results")
    fused: dict[int, float] = defaultdict(float)
    semantic = {}
    for rank, ((cid, _), w) in enumerate(zip(dense, dense_weights, strict=True), start=1):
        fused[cid] += w / (k + rank)
        semantic[cid] = rank
    lexical = {cid: rank for rank, (cid, _) in enumerate(bm25, start=1)}
    for cid, rank in lexical.items():
        fused[cid] += bm25_weight / (k + rank)
    inf = math.inf
    return sorted(
        fused.items(), key=lambda kv: (-kv[1], lexical.get(kv[0], inf), semantic.get(kv[0], inf), kv[0])
    )


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
        self._coverage: dict[int, float] = {}

    def chunk_coverage(self, chunk_ids: list[int]) -> np.ndarray:
        """Embedder coverage of each chunk (cached by id); chunks deleted meanwhile count as 0."""
        missing = [cid for cid in chunk_ids if cid not in self._coverage]
        if missing:
            if len(self._coverage) + len(missing) > COVERAGE_CACHE:
                self._coverage.clear()
            texts = {h.chunk_id: h.text for h in self.store.hits([(cid, 0.0) for cid in missing])}
            found = [cid for cid in missing if cid in texts]
            self._coverage.update(zip(found, self.embedder.coverage([texts[c] for c in found]), strict=True))
        return np.array([self._coverage.get(cid, 0.0) for cid in chunk_ids])

    def hybrid(self, query: str, depth: int, query_vec: np.ndarray | None = None) -> Scored:
        """`fuse` of the top `depth` of each list, dense weighted by coverage of query and chunk.
        A query the embedder cannot read is not even embedded."""
        bm25 = self.store.bm25_search(query, depth)
        query_w = float(dense_weight(self.embedder.coverage([query])[0])) * self.weights[0]
        dense: Scored = []
        chunk_w = np.zeros(0)
        if query_w > 0:
            vec = self.embedder.encode_query(query) if query_vec is None else query_vec
            dense = self.store.dense_search(vec, depth)
            chunk_w = query_w * dense_weight(self.chunk_coverage([cid for cid, _ in dense]), CHUNK_RAMP)
        return fuse(dense, bm25, list(chunk_w), k=self.rrf_k, bm25_weight=self.weights[1])

    def rank(self, query: str, k: int, mode: str = "hybrid", query_vec: np.ndarray | None = None) -> Scored:
        """Top-k (chunk id, score); hybrid fuses the top max(depth, k) chunks of each list.

        Pass query_vec to reuse a batch-encoded query (evaluation).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "bm25":
            return self.store.bm25_search(query, k)
        if mode == "hybrid":
            return self.hybrid(query, max(self.depth, k), query_vec)[:k]
        vec = self.embedder.encode_query(query) if query_vec is None else query_vec
        return self.store.dense_search(vec, k)

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
