"""Ingest job: files -> Documents -> Chunks -> vectors -> Store; incremental and kill-safe.

Incremental: a file whose sha256 matches its indexed record is not even parsed. Throughput:
chunks of small files are embedded together (~`batch_chunks` per model call), then each file
is committed in its own transaction, so a kill loses at most the uncommitted batch. Memory:
only one batch of vectors lives here; a large file is embedded and written batch by batch
inside its (single) transaction. FAISS/BM25 snapshots are written every `snapshot_every_s`
seconds (stretched to 10x the time a snapshot takes) and at the end; a kill in between costs
nothing but a repair on the next open (see rag/store.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rag.config import Settings, get_settings
from rag.embed import Embedder, get_embedder
from rag.ingest.chunker import Chunker
from rag.ingest.loaders import SkipFile, load_document
from rag.store import FileMeta, IndexBusy, Store
from rag.types import Chunk, Document

# Test hook: seconds to sleep after loading each file that needs embedding, so that a test's
# `kill -9` lands mid-ingest deterministically. Every code path stays the real one.
SLOWDOWN_ENV = "RAG_INGEST_SLOWDOWN_S"
LOCK_NAME = "ingest.lock"
# Chunks per embedding call: progress moves at least this often inside a large file (a 121 KB file
# once showed "0 chunks" for 54 s); 4 model batches of 16, so calls stay as efficient.
PROGRESS_CHUNKS = 64


@dataclass
class IngestReport:
    ingested: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks: int = 0  # chunks embedded and written in this run
    deleted: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "ingested": self.ingested,
            "unchanged": self.unchanged,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "chunks": self.chunks,
            "deleted": self.deleted,
            "seconds": self.seconds,
        }


@dataclass
class ProgressEvent:
    files_done: int
    files_total: int
    chunks_done: int  # chunks embedded so far in this run
    current_path: str
    # within current_path, so a large file shows progress before it is done
    file_chunks_done: int = 0
    file_chunks_total: int = 0
    stage: str = ""  # what runs before the first file, e.g. "loading embedding model"


def display_path(path: Path | str) -> str:
    """`path` as text that SQLite, JSON and a terminal accept: bytes of a file name that are not
    UTF-8 (Python keeps them as lone surrogates) are written as `\\xNN`, so two such names stay apart."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no file name byte makes (e.g. from JSON)
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return raw.decode("utf-8", "backslashreplace")


def _refusal(path: Path) -> str | None:
    """Why the entry `path` is not taken at all (an odd name, a link that leads nowhere), or None.

    Such entries are reported but never reach the store: a name that is not UTF-8 cannot be stored
    as text, and a looping link has no file to record.
    """
    if display_path(path) != str(path):
        return "file name is not valid UTF-8: rename it"
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.11/3.12 say "Symlink loop" this way
        return "symlink loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if isinstance(exc, FileNotFoundError):
            return "broken symlink (its target does not exist)"
        return f"cannot follow symlink: {exc.strerror or exc}"
    return None


def safe_resolve(path: Path) -> Path:
    """`path` absolute with links resolved, or only absolute when it cannot be (a symlink loop):
    find_files then reports why instead of the run failing."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):
        return path.expanduser().absolute()


def find_files(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under `paths` (folders walked recursively, hidden entries skipped; anything else given
    directly is taken as it is, so a FIFO is reported as "not a regular file"), sorted and unique;
    plus (path, reason) for refused entries. One odd entry (a symlink loop, a name that is not
    UTF-8, an unreadable folder) is refused on its own; it never stops the walk.

    A symlink inside a folder whose target lies outside that folder is refused: the API confines
    ingestion to configured roots, and a link must not carry other files past that check.
    """
    found: set[Path] = set()
    refused: list[tuple[str, str]] = []
    for root in paths:
        if reason := _refusal(root):
            refused.append((display_path(root), reason))
        elif root.is_dir():
            _walk(root, found, refused)
        elif os.path.lexists(root):
            found.add(root)  # a file, or a FIFO or device that the job refuses by its own check
        else:
            refused.append((display_path(root), "no such file or directory"))
    return sorted(found), refused


def _walk(root: Path, found: set[Path], refused: list[tuple[str, str]]) -> None:
    real_root = safe_resolve(root)

    def unreadable(exc: OSError) -> None:
        refused.append((display_path(exc.filename or root), f"cannot read folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if reason := _refusal(path):
                refused.append((display_path(path), reason))
            elif path.is_symlink() and not path.resolve().is_relative_to(real_root):
                refused.append((str(path), f"symlink to a file outside {root}"))
            else:
                found.add(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def ingest_lock(index_dir: Path) -> Iterator[None]:
    """One ingest per index at a time (readers are never locked out)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(f"another ingest is writing to {index_dir}; wait for it to finish") from None
        yield  # the lock goes with the file descriptor, also when the process is killed


class _EmbedError(Exception):
    """The embedder failed on one file's text: that file is skipped, the run goes on."""


@dataclass
class _Pending:
    """A loaded and chunked file waiting for its vectors."""

    path: str
    title: str
    meta: FileMeta
    chunks: list[Chunk]


class _Job:
    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        chunker: Chunker,
        settings: Settings,
        n_files: int,
        on_progress: Callable[[ProgressEvent], None] | None,
        batch_chunks: int,
        snapshot_every_s: float,
    ):
        self.store, self.embedder, self.chunker = store, embedder, chunker
        self.max_bytes = settings.max_file_bytes
        self.n_files = n_files
        self.on_progress = on_progress
        self.batch_chunks = batch_chunks
        self.snapshot_every_s = snapshot_every_s
        self.snapshot_interval = snapshot_every_s
        self.last_snapshot = time.monotonic()
        self.slowdown = float(os.environ.get(SLOWDOWN_ENV, "0") or 0)
        self.report = IngestReport()
        self.pending: list[_Pending] = []
        self.files_done = 0
        self.embedded = 0  # chunks embedded, committed or about to be

    def _emit(self, path: str, file_done: int = 0, file_total: int = 0) -> None:
        if self.on_progress is not None:
            event = ProgressEvent(self.files_done, self.n_files, self.embedded, path, file_done, file_total)
            self.on_progress(event)

    def _done(self, path: str) -> None:
        self.files_done += 1
        self._emit(path)

    def _embedding(self, items: Sequence[_Pending], position: int) -> None:
        """Progress at `position` in the chunks of `items`, one after the other."""
        for item in items:
            if position <= len(item.chunks):
                break
            position -= len(item.chunks)
        self._emit(item.path, position, len(item.chunks))

    def _skip(self, path: str, reason: str, meta: FileMeta = FileMeta()) -> None:
        self.store.skip_document(path, reason, meta)
        self.report.skipped.append((path, reason))
        self._done(path)

    def add(self, path: Path) -> None:
        """Hash, compare, load and chunk one file; queue it for embedding (or record the skip)."""
        key, meta = str(path), FileMeta()
        try:
            st = path.stat()
            meta = FileMeta(None, st.st_size, st.st_mtime)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end hashing
                raise SkipFile("not a regular file")
            if st.st_size <= self.max_bytes:  # larger files are refused by load_document without reading
                meta = FileMeta(file_sha256(path), st.st_size, st.st_mtime)
                old = self.store.find_document(key)
                if old is not None and old.status == "indexed" and old.sha256 == meta.sha256:
                    self.report.unchanged += 1
                    self._done(key)
                    return
            doc = load_document(path, self.max_bytes)
            chunks = self._chunk(doc)
        except SkipFile as exc:
            self._skip(key, str(exc), meta)
            return
        except OSError as exc:
            self._skip(key, f"cannot read file: {exc.strerror or exc}", meta)
            return
        if self.slowdown:
            time.sleep(self.slowdown)
        item = _Pending(key, doc.title, meta, chunks)
        if len(chunks) >= self.batch_chunks:  # a big file goes alone, streamed in batches
            self.flush()
            self._commit(item, self._batches(item))
            self.maybe_snapshot()
        else:
            self.pending.append(item)
            if sum(len(p.chunks) for p in self.pending) >= self.batch_chunks:
                self.flush()

    def _chunk(self, doc: Document) -> list[Chunk]:
        try:
            chunks = self.chunker.chunk_document(doc)
        except Exception as exc:  # a chunker bug on odd text: lose the file, not the run
            raise SkipFile(f"cannot chunk: {type(exc).__name__}: {exc}") from exc
        if not chunks:
            raise SkipFile("no text to index")
        return chunks

    def _encode(self, chunks: Sequence[Chunk], items: Sequence[_Pending], offset: int = 0) -> np.ndarray:
        """Vectors of `chunks`, which are those of `items` from `offset` on, PROGRESS_CHUNKS per
        model call with a progress event after each."""
        parts = []
        for i in range(0, len(chunks), PROGRESS_CHUNKS):
            part = chunks[i : i + PROGRESS_CHUNKS]
            try:
                parts.append(self.embedder.encode([c.text for c in part]))
            except Exception as exc:  # e.g. a tokenizer bug on odd text: lose the file, not the run
                raise _EmbedError(f"cannot embed: {type(exc).__name__}: {exc}") from exc
            self.embedded += len(part)
            self._embedding(items, offset + i + len(part))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _batches(self, item: _Pending) -> Iterator[tuple[list[Chunk], np.ndarray]]:
        for i in range(0, len(item.chunks), self.batch_chunks):
            part = item.chunks[i : i + self.batch_chunks]
            yield part, self._encode(part, [item], i)

    def _commit(self, item: _Pending, batches: Iterable[tuple[Sequence[Chunk], np.ndarray]]) -> None:
        try:
            rec = self.store.put_document(item.path, title=item.title, meta=item.meta, batches=batches)
        except _EmbedError as exc:
            self._skip(item.path, str(exc), item.meta)
            return
        self.report.ingested += 1
        self.report.chunks += rec.n_chunks
        self._done(item.path)

    def flush(self) -> None:
        """Embed all queued chunks together, then commit each file in its own transaction."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        embedded = self.embedded
        try:
            vecs = self._encode([c for p in pending for c in p.chunks], pending)
        except _EmbedError:  # find the culprit: embed file by file
            self.embedded = embedded
            for item in pending:
                self._commit(item, self._batches(item))
        else:
            start = 0
            for item in pending:
                n = len(item.chunks)
                self._commit(item, [(item.chunks, vecs[start : start + n])])
                start += n
        self.maybe_snapshot()

    def maybe_snapshot(self) -> None:
        """Snapshots cost O(index); spacing them >= 10x their cost keeps the overhead <= ~10%."""
        if time.monotonic() - self.last_snapshot < self.snapshot_interval:
            return
        t0 = time.monotonic()
        self.store.save()
        self.last_snapshot = time.monotonic()
        self.snapshot_interval = max(self.snapshot_every_s, 10 * (self.last_snapshot - t0))

    def prune(self, roots: list[Path]) -> None:
        """Delete documents under `roots` whose file is gone; documents elsewhere are untouched."""
        for rec in self.store.documents():
            path = Path(rec.path)
            if any(path.is_relative_to(r) for r in roots) and not path.is_file():
                self.store.delete_document(rec.id, persist=False)
                self.report.deleted += 1


def ingest(
    paths: list[Path],
    settings: Settings | None = None,
    *,
    prune: bool = False,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    embedder: Embedder | None = None,
    batch_chunks: int = 256,
    snapshot_every_s: float = 60.0,
) -> IngestReport:
    """Index `paths` (folders and/or files) into `settings.index_dir`; see the module docstring.

    `embedder` defaults to the cached one for `settings.embedding_model`; the index records that
    model and refuses another one (ModelMismatch).
    """
    t0 = time.perf_counter()
    settings = settings or get_settings()
    if batch_chunks < 1:
        raise ValueError(f"batch_chunks must be >= 1, got {batch_chunks}")
    if embedder is None:
        if on_progress is not None:  # seconds on a first run: say so rather than show a still bar
            on_progress(ProgressEvent(0, 0, 0, "", stage="loading embedding model"))
        embedder = get_embedder(settings.embedding_model, settings.device, settings.embedding_batch_size)
    if on_progress is not None:
        on_progress(ProgressEvent(0, 0, 0, "", stage="finding files"))
    roots = [safe_resolve(Path(p)) for p in paths]
    files, missing = find_files(roots)
    chunker = Chunker.from_settings(embedder.tokenizer, settings)
    with ingest_lock(settings.index_dir), Store(settings.index_dir, embedder.name, embedder.dim) as store:
        job = _Job(
            store, embedder, chunker, settings, len(files), on_progress, batch_chunks, snapshot_every_s
        )
        job.report.skipped.extend(missing)
        if on_progress is not None:
            on_progress(ProgressEvent(0, len(files), 0, ""))
        for path in files:
            job.add(path)
        job.flush()
        if prune:
            job.prune(roots)
        store.wait_for_merges()  # so the final snapshot holds merged BM25 segments
        store.save()
    job.report.seconds = time.perf_counter() - t0
    return job.report


def main(argv: list[str] | None = None) -> int:
    """`python -m rag.ingest.job PATH...`: the job without the CLI's progress bar (tests kill it)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--index", type=Path, help="index directory (default: RAG_INDEX_DIR)")
    parser.add_argument("--prune", action="store_true", help="delete documents whose files are gone")
    parser.add_argument("--batch-chunks", type=int, default=256)
    parser.add_argument("--snapshot-every", type=float, default=60.0, help="seconds between snapshots")
    args = parser.parse_args(argv)
    settings = Settings() if args.index is None else Settings(index_dir=args.index)
    report = ingest(
        args.paths,
        settings,
        prune=args.prune,
        batch_chunks=args.batch_chunks,
        snapshot_every_s=args.snapshot_every,
    )
    json.dump(report.to_dict(), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
