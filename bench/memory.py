"""Peak RSS of `ingest()` on many small files and on one long PDF, each in a fresh subprocess.

Memory is bounded if the ingest overhead (peak RSS minus the RSS right after the model is loaded)
stays flat as the corpus grows 10x: documents are embedded in batches, a PDF page by page, and
only the FAISS matrix (n x 384 floats) and the BM25 index are expected to grow with the corpus.
The child reports its RSS after loading the model, then resets its kernel high-water mark
(/proc/self/clear_refs, so the transient peak of loading the weights is not counted) and reports
VmHWM at the end; the parent also polls the child's RSS (psutil) as a cross-check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.data import BENCH_DIR, passages, pdf_file, text_folder

MB = 1024 * 1024
POLL_S = 0.05


def _rss() -> int:
    return psutil.Process().memory_info().rss


def child(mode: str, index_dir: Path, paths: list[Path]) -> None:
    """Runs in the subprocess: load + warm the model, say so, then either ingest `paths` or (mode
    "embed", the baseline) only embed their chunks; report as JSON lines on stdout."""
    from bench.ingest import BATCH_CHUNKS, chunk_texts, embed_only
    from rag.config import Settings
    from rag.embed import get_embedder
    from rag.ingest.job import ingest

    settings = Settings(index_dir=index_dir)
    embedder = get_embedder(settings.embedding_model, settings.device, settings.embedding_batch_size)
    embedder.encode(passages(settings.embedding_batch_size, 150))  # first batch allocates buffers
    texts = chunk_texts(paths, settings, embedder) if mode == "embed" else []
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    print(json.dumps({"event": "model", "rss": _rss()}), flush=True)
    if mode == "embed":
        embed_only(embedder, texts)
        chunks = len(texts)
    else:
        chunks = ingest(paths, settings, embedder=embedder, batch_chunks=BATCH_CHUNKS).chunks
    print(json.dumps({"event": "done", "rss": _rss(), "hwm": _hwm(), "chunks": chunks}))


def _hwm() -> int:
    """Peak RSS since the last reset, in bytes (VmHWM is in KiB)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def measure(paths: list[Path], label: str, size: int, mode: str = "ingest") -> dict:
    """Ingest (or only embed) `paths` in a child process, into a fresh temporary index; RSS in MB."""
    BENCH_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as tmp:
        cmd = [sys.executable, "-m", "bench.memory", mode, str(Path(tmp) / "index"), *map(str, paths)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        events: dict[str, dict] = {}
        reader = threading.Thread(target=_read_events, args=(proc, events), daemon=True)
        reader.start()
        ps = psutil.Process(proc.pid)
        peak_ingest = 0
        t0 = time.perf_counter()
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss
            except psutil.NoSuchProcess:
                break
            if "model" in events:
                peak_ingest = max(peak_ingest, rss)
            time.sleep(POLL_S)
        reader.join()
        if proc.returncode != 0 or "done" not in events:
            raise RuntimeError(f"memory benchmark child failed (exit {proc.returncode}): {' '.join(cmd)}")
    model_rss = events["model"]["rss"]
    done = events["done"]
    peak = max(peak_ingest, done["hwm"])
    return {
        "corpus": label,
        "run": mode,
        "size": size,
        "disk_mb": sum(_size(p) for p in paths) / MB,
        "chunks": done["chunks"],
        "seconds": time.perf_counter() - t0,
        "rss_model_mb": model_rss / MB,
        "peak_rss_mb": peak / MB,
        "overhead_mb": (peak - model_rss) / MB,
        "peak/model": peak / model_rss,
    }


def _read_events(proc: subprocess.Popen, events: dict[str, dict]) -> None:
    """Collect the child's JSON lines by event name (anything else on stdout is ignored)."""
    for line in proc.stdout:
        if line.startswith("{"):
            event = json.loads(line)
            events[event["event"]] = event


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(
    files: int, pages: int, baseline: bool = True, words_per_file: int = 60, words_per_page: int = 250
) -> list[dict]:
    """Each corpus at 1/10 and full size, so growth of peak RSS with corpus size is visible; with
    `baseline`, also embed the same chunks without ingest (the embedder's own peak, for the ratio).
    A size of 0 skips that corpus; each result also goes to stderr as soon as it is measured."""
    root = BENCH_DIR / "memory"
    jobs = [
        (
            lambda n: [text_folder(root / f"files-{n}x{words_per_file}w", n, words_per_file)],
            f"txt files ({words_per_file} words)",
            files,
        ),
        (
            lambda n: [pdf_file(root / f"book-{n}p-{words_per_page}w.pdf", n, words_per_page)],
            f"pdf pages ({words_per_page} words)",
            pages,
        ),
    ]
    results = []
    for make, label, full in jobs:
        for n in sorted({max(1, full // 10), full}) if full else []:
            for mode in ("ingest", "embed") if baseline else ("ingest",):
                results.append(measure(make(n), label, n, mode))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
