"""The embedder: bundled model offline, unit-length float32 vectors, batching that changes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag.config import DEFAULT_EMBEDDING_MODEL
from rag.embed import BATCH_SIZE, Embedder, get_embedder, resolve_model


def test_resolve_model_maps_only_the_bundled_name():
    path = Path(resolve_model(DEFAULT_EMBEDDING_MODEL))
    assert (path / "config.json").is_file()
    assert resolve_model("/some/local/model") == "/some/local/model"


def test_vectors_are_normalized_float32(embedder):
    texts = ["The cat sat on the mat.", "Příliš žluťoučký kůň úpěl ďábelské ódy.", "Київ — столиця України."]
    vecs = embedder.encode(texts)
    assert vecs.shape == (3, embedder.dim) == (3, 384)
    assert vecs.dtype == np.float32 and vecs.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, embedder.dim)
    query = embedder.encode_query(texts[0])
    assert query.shape == (embedder.dim,)
    np.testing.assert_allclose(query, vecs[0], atol=1e-5)


def test_similar_texts_score_higher(embedder):
    q = embedder.encode_query("How do I bake bread at home?")
    docs = embedder.encode(["A recipe for baking a loaf of bread in your oven.", "Stock market prices fell."])
    assert docs[0] @ q > docs[1] @ q + 0.2


def test_batch_size_does_not_change_vectors(embedder):
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(7)]
    small = Embedder(DEFAULT_EMBEDDING_MODEL, batch_size=2)
    np.testing.assert_allclose(small.encode(texts), embedder.encode(texts), atol=1e-5)
    assert (small.n_calls, small.n_texts) == (1, 7)


def test_get_embedder_is_cached(embedder):
    assert get_embedder() is embedder
    # ingest passes the batch size, search does not: both must share one loaded model
    assert get_embedder(DEFAULT_EMBEDDING_MODEL, "cpu", BATCH_SIZE) is embedder
    assert embedder.name == DEFAULT_EMBEDDING_MODEL
    assert embedder.tokenizer("ahoj světe", return_offsets_mapping=True)["offset_mapping"]


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot load embedding model"):
        Embedder("/nonexistent/model/dir")
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)
