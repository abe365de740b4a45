"""The ONNX Runtime backends against sentence-transformers: the same real model, exported here."""

from __future__ import annotations

import numpy as np
import pytest

from rag.embed import Embedder, onnx_file, resolve_model

TEXTS = [
    "The zebra has black and white stripes.",
    "short",
    "",
    "Praha je hlavní město České republiky a leží na Vltavě.",
    "Київ є столицею України.",
    "Protein folding " * 300,  # longer than the model's 256 tokens: truncated alike
    "What is the capital of France?",
    "Scaling laws describe how the loss of a language model falls with its size.",
]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


def test_onnx_vectors_match_sentence_transformers(embedder, onnx_dir):
    fast = Embedder(backend="onnx", batch_size=3, onnx_cache_dir=onnx_dir)  # batches pad differently
    got, want = fast.encode(TEXTS), embedder.encode(TEXTS)
    assert got.shape == want.shape and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * want).sum(axis=1)
    assert cos.min() >= 0.99, cos
    # the same nearest text for each text, among the others
    sim_got, sim_want = got @ got.T, want @ want.T
    np.fill_diagonal(sim_got, -2), np.fill_diagonal(sim_want, -2)
    assert (sim_got.argmax(1) == sim_want.argmax(1)).all()
    assert float(fast.encode_query(TEXTS[0]) @ want[0]) >= 0.99


def test_onnx_export_is_made_once_and_reused(embedder, onnx_dir):
    path = onnx_file(embedder.model, resolve_model(embedder.name), onnx_dir)
    before = path.stat().st_mtime_ns
    again = onnx_file(embedder.model, resolve_model(embedder.name), onnx_dir)
    assert again == path and path.stat().st_mtime_ns == before
    assert not list(onnx_dir.rglob(".tmp-*"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown embedding backend"):
        Embedder(backend="tensorrt")
