"""Embedding throughput: sentence-transformers (torch) vs ONNX Runtime variants on the same texts.

Variants of the bundled MiniLM, each derived locally from the `onnx` backend's export and kept
next to it in `onnx_cache_dir`:
- `onnx`: the exported graph as `RAG_EMBEDDING_BACKEND=onnx` runs it;
- `onnx-fused`: ONNX Runtime's transformer optimizer (fused Attention, EmbedLayerNormalization,
  SkipLayerNormalization, BiasGelu);
- `onnx-int8`: the fused graph with int8 dynamic quantization of the encoder's MatMuls only
  (per-channel signed int8 weights; embeddings, attention QKV, LayerNorm and pooling stay fp32).

Passages are embedded in batches (the ingest path), queries one at a time (the query path).
Rounds alternate the order of the runs, so a drift in machine load hits all alike; wall and
process-CPU seconds are both kept (on a shared CPU, wall time includes waiting for a core).
Each variant's vectors are compared with torch's: the minimum cosine must be >= 0.99.
"""

from __future__ import annotations

import os
import statistics
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.data import passages, squad_questions
from bench.ingest import timed
from rag.config import get_settings
from rag.embed import Embedder, onnx_file, resolve_model

VARIANTS = ("onnx", "onnx-fused", "onnx-int8")
HEADS, HIDDEN = 12, 384  # all-MiniLM-L6-v2
MIN_COSINE = 0.99
TARGET_RATIO = 2.0


def _write_once(path: Path, make: Callable[[Path], None]) -> Path:
    """`make(tmp)` then rename to `path`, unless `path` exists (a killed run leaves no half file)."""
    if not path.is_file():
        tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
        try:
            make(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _fuse(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(src), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN).save_model_to_file(
        str(dst)
    )


def _quantize(src: Path, dst: Path) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": TensorProto.FLOAT},  # fused ops lack inferred types
    )


def variant_file(embedder: Embedder, variant: str, cache_dir: Path) -> Path:
    """The ONNX file of `variant`, built once from the exported model into its folder."""
    base = onnx_file(embedder.model, resolve_model(embedder.name), cache_dir)
    if variant == "onnx":
        return base
    fused = _write_once(base.with_name("model-fused.onnx"), lambda tmp: _fuse(base, tmp))
    if variant == "onnx-fused":
        return fused
    if variant == "onnx-int8":
        return _write_once(base.with_name("model-int8.onnx"), lambda tmp: _quantize(fused, tmp))
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _embed_all(embedder: Embedder, texts: list[str], queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return embedder.encode(texts), np.stack([embedder.encode_query(q) for q in queries])


def _time_once(embedder: Embedder, texts: list[str], queries: list[str]) -> dict:
    """Texts per wall and per CPU second: the passages in one call, then each query alone."""
    wall, cpu, _ = timed(lambda: embedder.encode(texts))
    q_wall, q_cpu, _ = timed(lambda: [embedder.encode_query(q) for q in queries])
    return {
        "passages_per_s": len(texts) / wall,
        "passages_per_cpu_s": len(texts) / cpu,
        "queries_per_s": len(queries) / q_wall,
        "queries_per_cpu_s": len(queries) / q_cpu,
    }


def _throughput(rows: list[dict], name: str, key: str) -> float:
    return statistics.median(r[name][key] for r in rows)


def run(
    n_passages: int = 192,
    words: int = 120,
    n_queries: int = 192,
    rounds: int = 2,
    threads: int = 1,
    variants: tuple[str, ...] = VARIANTS,
    cache_dir: Path | None = None,
) -> dict:
    """Texts/s of torch and each variant (median over rounds), ratios to torch, minimum cosine."""
    import torch

    torch.set_num_threads(threads)  # the ONNX sessions take the same thread count
    settings = get_settings()
    cache_dir = cache_dir or settings.onnx_cache_dir
    torch_embedder = Embedder(settings.embedding_model, batch_size=settings.embedding_batch_size)
    models = {"torch": torch_embedder} | {
        v: Embedder(
            settings.embedding_model,
            batch_size=settings.embedding_batch_size,
            backend="onnx",
            onnx_path=variant_file(torch_embedder, v, cache_dir),
        )
        for v in variants
    }
    texts, queries = passages(n_passages, words), squad_questions(n_queries)
    want = np.concatenate(_embed_all(torch_embedder, texts, queries))  # also the warm-up
    cosine = {
        v: float((np.concatenate(_embed_all(models[v], texts, queries)) * want).sum(1).min())
        for v in variants
    }
    rows = []
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        row: dict = {"round": r + 1}
        for name in order:
            row[name] = _time_once(models[name], texts, queries)
        rows.append(row)
    keys = ("passages_per_s", "passages_per_cpu_s", "queries_per_s", "queries_per_cpu_s")
    table = []
    for name in models:
        entry = {"backend": name} | {k: _throughput(rows, name, k) for k in keys}
        entry |= {f"{k}_ratio": entry[k] / _throughput(rows, "torch", k) for k in keys}
        entry["min_cosine"] = 1.0 if name == "torch" else cosine[name]
        entry["cosine_ok"] = entry["min_cosine"] >= MIN_COSINE
        entry["target_met"] = (
            name != "torch" and entry["cosine_ok"] and entry["passages_per_cpu_s_ratio"] >= TARGET_RATIO
        )
        table.append(entry)
    return {
        "passages": len(texts),
        "words": words,
        "queries": len(queries),
        "batch_size": settings.embedding_batch_size,
        "threads": threads,
        "rounds": rounds,
        "backends": table,
        "target_ratio": TARGET_RATIO,
        "min_cosine_bar": MIN_COSINE,
    }
