"""Ingest throughput: end-to-end `ingest()` vs the bare embedder on the very same chunks.

The embedder is the floor of ingest cost, so the ratio (ingest chunks/s) / (embedder chunks/s)
says how much loading, chunking, SQLite, FAISS and BM25 snapshots add on top (target >= 0.9).
Rounds alternate which of the two runs first, so a drift in machine load hits both alike.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.data import BENCH_DIR, text_folder
from rag.config import Settings
from rag.embed import Embedder, get_embedder
from rag.ingest.chunker import Chunker
from rag.ingest.job import find_files, ingest
from rag.ingest.loaders import SkipFile, load_document

BATCH_CHUNKS = 256  # ingest()'s default: the baseline feeds the embedder batches of the same size


def chunk_texts(paths: list[Path], settings: Settings, embedder: Embedder) -> list[str]:
    """The chunks ingest() will embed, produced by the same loader and chunker."""
    chunker = Chunker.from_settings(embedder.tokenizer, settings)
    texts: list[str] = []
    for path in find_files(paths)[0]:
        try:
            doc = load_document(path, settings.max_file_bytes)
        except SkipFile:
            continue
        texts.extend(c.text for c in chunker.chunk_document(doc))
    return texts


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and process-CPU seconds of one call. On a shared CPU, wall time includes waiting for a
    core; the CPU-time ratio is steadier but leaves out time spent waiting on the disk (fsync)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def embed_only(embedder: Embedder, texts: list[str]) -> None:
    """Embed `texts` in ingest-sized batches."""
    for i in range(0, len(texts), BATCH_CHUNKS):
        embedder.encode(texts[i : i + BATCH_CHUNKS])


def ingest_once(folder: Path, embedder: Embedder, scratch: Path) -> int:
    """Chunks written by one full ingest of `folder` into a new index under `scratch`."""
    index = Path(tempfile.mkdtemp(dir=scratch))
    report = ingest([folder], Settings(index_dir=index), embedder=embedder, batch_chunks=BATCH_CHUNKS)
    return report.chunks


def profile_ingest(folder: Path, embedder: Embedder, scratch: Path, top: int = 15) -> list[dict]:
    """Where ingest spends its time: the `top` functions by own time (cProfile)."""
    prof = cProfile.Profile()
    prof.runcall(ingest_once, folder, embedder, scratch)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    return [
        {"function": f"{Path(file).name}:{line}({name})", "own_s": tt, "share": tt / total}
        for (file, line, name), (_, _, tt, _, _) in rows
    ]


def run(
    files: int = 200,
    words: int = 400,
    rounds: int = 2,
    folder: Path | None = None,
    profile: bool = False,
    threads: int = 2,
) -> dict:
    """Ingest vs embed-only throughput over `rounds`; `folder` replaces the generated corpus."""
    import torch

    torch.set_num_threads(threads)
    if folder is None:
        folder = text_folder(BENCH_DIR / "ingest" / f"gutenberg-{files}x{words}w", files, words)
    elif not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    settings = Settings()
    embedder = get_embedder(settings.embedding_model, settings.device, settings.embedding_batch_size)
    texts = chunk_texts([folder], settings, embedder)
    if not texts:
        raise ValueError(f"no indexable text under {folder}")
    embedder.encode(texts[:BATCH_CHUNKS])  # warm-up: first calls allocate
    BENCH_DIR.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as scratch:
        for r in range(rounds):
            runs = {
                "embed": lambda: embed_only(embedder, texts),
                "ingest": lambda: ingest_once(folder, embedder, Path(scratch)),
            }
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            t = {name: timed(runs[name]) for name in order}
            n = t["ingest"][2]
            if n != len(texts):
                raise RuntimeError(f"ingest wrote {n} chunks, the chunker gave {len(texts)}")
            (embed_s, embed_cpu, _), (ingest_s, ingest_cpu, _) = t["embed"], t["ingest"]
            rows.append(
                {
                    "round": r + 1,
                    "embed_chunks_per_s": n / embed_s,
                    "ingest_chunks_per_s": n / ingest_s,
                    "ratio": embed_s / ingest_s,
                    "embed_chunks_per_cpu_s": n / embed_cpu,
                    "ingest_chunks_per_cpu_s": n / ingest_cpu,
                    "cpu_ratio": embed_cpu / ingest_cpu,
                }
            )
        profiled = profile_ingest(folder, embedder, Path(scratch)) if profile else []
    return {
        "corpus": str(folder),
        "files": len(find_files([folder])[0]),
        "chunks": len(texts),
        "threads": threads,
        "rounds": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rows),
        "target_ratio": 0.9,
        **({"profile": profiled} if profile else {}),
    }
