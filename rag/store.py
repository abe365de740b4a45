"""The index on disk: SQLite (truth) + FAISS and BM25 (derived snapshots).

Crash safety rests on three rules:
1. SQLite (WAL) is the source of truth, vectors included. A document is written in ONE
   transaction (old chunks out, new chunks in, status set), so a kill leaves it all-or-nothing.
2. Chunk ids come from AUTOINCREMENT: never reused, and a chunk's vector never changes. Any
   FAISS or BM25 snapshot, however old, can therefore be brought up to date by an id diff
   against SQLite; a snapshot is never trusted, only checked (FAISS ids, `chunk_ids.npy`).
3. Snapshots are written to a temp name, fsynced and renamed into place, so a reader (or a
   process started after a crash) sees an old whole file or a new whole file, never half of one.

BM25 is segmented (`rag.bm25`): new chunks go into a new small segment, deleted ones become
tombstones, and background merges keep the number of segments logarithmic; a snapshot lists its
segments (immutable directories under `segments/`, shared between snapshots) and tombstones.

The vector snapshot is exact (flat) while the index is small and approximate (IVF) when large
(`rag.vectors`); a writer's `save()` rebuilds it from SQLite's vectors when the size or the
settings call for another kind, and readers pick the new kind up on their next `refresh()`.

Readers are never blocked: WAL gives them the last committed state while a writer works,
and `refresh()` moves them to the newest one. `generation` in the settings table counts
writes, so an unchanged index costs one query to refresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rag.analysis import Analyzer
from rag.bm25 import Segment, SegmentedBM25, build_segment, merge_segments
from rag.types import Chunk, Hit
from rag.vectors import VectorIndex, VectorSpec

SCHEMA_VERSION = 1
DB_NAME = "meta.sqlite"
FAISS_NAME = "vectors.faiss"
MANIFEST_NAME = "manifest.json"
BM25_PREFIX = "bm25-"  # + generation + merge count + analyzer tag: one small directory per snapshot
ANALYZER_FILE = "analyzer.txt"  # in a BM25 snapshot: the Analyzer.name its tokens came from
LANGUAGES_FILE = "languages.json"  # in a BM25 snapshot: chunks per detected language
SEGMENTS_FILE = "segments.json"  # in a BM25 snapshot: names of its segments, in SEGMENTS_DIR
DELETED_FILE = "deleted.npy"  # in a BM25 snapshot: tombstones (chunk ids deleted from its segments)
SEGMENTS_DIR = "segments"  # BM25 segments, each an immutable directory that snapshots refer to
TMP_PREFIX = ".tmp-"  # + pid: leftovers of a killed writer are removed by the next one
SQL_BATCH = 500  # ids per `IN (...)` query, well under SQLite's variable limit

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS documents (
        id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, title TEXT, sha256 TEXT, size INTEGER,
        mtime REAL, status TEXT NOT NULL, error TEXT, n_chunks INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id INTEGER NOT NULL REFERENCES documents(id),
        page INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL,
        vector BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id)",
]

SQLITE_MAX_INT = 2**63 - 1  # larger ids cannot exist (and make sqlite3 raise OverflowError)


class StoreError(Exception):
    """The index cannot be opened or used as asked; the message says why and what to do."""


class IndexBusy(StoreError):
    """Another ingest holds the index's write lock (readers are never refused)."""


class ModelMismatch(StoreError):
    """The index was built with another embedding model: its vectors are not comparable."""


@dataclass(frozen=True)
class FileMeta:
    """What the ingest job knows of a file on disk; sha256 tells unchanged files from changed ones."""

    sha256: str | None = None
    size: int | None = None
    mtime: float | None = None


@dataclass
class DocRecord:
    id: int
    path: str
    title: str
    sha256: str | None
    size: int | None
    mtime: float | None
    status: str  # "indexed" | "skipped"
    error: str | None
    n_chunks: int
    updated_at: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def meta(self) -> FileMeta:
        return FileMeta(self.sha256, self.size, self.mtime)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written temp file or directory visible under its final name, durably."""
    for f in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:
        _fsync_path(f)
    os.replace(tmp, final)
    _fsync_path(final.parent)


def _snapshot_gen(snap: Path) -> int:
    """The generation in a BM25 snapshot's name (bm25-<generation>-...)."""
    try:
        return int(snap.name[len(BM25_PREFIX) :].split("-")[0])
    except ValueError:
        return -1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _to_blob(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype="<f4").tobytes()


class Store:
    """One index directory. Thread-safe (one lock); any number of reader processes plus writers."""

    def __init__(
        self,
        index_dir: Path,
        embedding_model: str | None = None,
        dim: int | None = None,
        readonly: bool = False,
        create: bool = True,
        analyzer: Analyzer | None = None,
        vectors: VectorSpec | None = None,
    ):
        self.index_dir = Path(index_dir)
        if vectors is None:
            from rag.config import get_settings

            vectors = VectorSpec.from_settings(get_settings())
        self.vector_spec = vectors
        self.readonly = readonly
        # BM25 is derived from SQLite's chunk texts, so an index made with another analyzer needs no
        # re-ingest: its snapshots are ignored, BM25 is rebuilt, and a writer saves the new one.
        self.analyzer = analyzer or Analyzer()
        self._analyzer_tag = hashlib.sha1(self.analyzer.name.encode()).hexdigest()[:8]
        self._lock = threading.RLock()
        db_path = self.index_dir / DB_NAME
        if (readonly or not create) and not db_path.is_file():
            raise StoreError(f"no index at {self.index_dir} (run `rag ingest` first)")
        self.index_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(db_path, isolation_level=None, timeout=60.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing
            if readonly:
                self._db.execute("PRAGMA query_only=ON")
            self.embedding_model, self.dim = self._init_settings(embedding_model, dim)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open index database {db_path}: {exc}") from exc
        try:
            self.vector_spec.check(self.dim)
        except ValueError as exc:
            self._db.close()
            raise StoreError(str(exc)) from None
        self.gen = -1  # SQLite generation that the in-memory FAISS reflects
        self._vectors = VectorIndex.flat(self.dim)
        self._txn_added: list[np.ndarray] = []  # vectors added by the write transaction under way
        self._bm25 = SegmentedBM25()
        self._bm25_gen = -1  # SQLite generation that BM25 reflects
        self._merges = 0  # merges committed: a snapshot of the same generation after one is new
        self._merger: threading.Thread | None = None
        self._closed = False
        self._load_snapshot()
        if not readonly:
            self._remove_dead_temps()
            manifest = self._manifest()
            if (
                manifest.get("generation") != self.gen
                or manifest.get("analyzer") != self.analyzer.name
                or "bm25_segments" not in manifest  # an index from before segmented BM25
                or self.vector_spec.needs_rebuild(self._vectors, self._vectors.ntotal)
            ):
                self.save()  # after a crash, an analyzer or vector-index change: persist the new state

    # ---- SQLite plumbing -------------------------------------------------------------------

    @contextlib.contextmanager
    def _txn(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A read transaction sees one consistent state; a write one (IMMEDIATE) is all-or-nothing."""
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _init_settings(self, model: str | None, dim: int | None) -> tuple[str, int]:
        with self._txn(write=not self.readonly) as db:
            if not self.readonly:
                for stmt in SCHEMA:
                    db.execute(stmt)
            try:
                saved = dict(db.execute("SELECT key, value FROM settings").fetchall())
            except sqlite3.OperationalError:
                saved = {}
            if not saved:
                if self.readonly:
                    raise StoreError(f"{self.index_dir} holds no index yet (run `rag ingest` first)")
                if model is None or dim is None:
                    raise StoreError(f"creating an index in {self.index_dir} needs embedding_model and dim")
                saved = {"embedding_model": model, "dim": str(dim), "schema_version": str(SCHEMA_VERSION)}
                db.executemany("INSERT INTO settings VALUES (?, ?)", [*saved.items(), ("generation", "0")])
        if int(saved["schema_version"]) != SCHEMA_VERSION:
            raise StoreError(
                f"index {self.index_dir} has schema v{saved['schema_version']}, this code reads "
                f"v{SCHEMA_VERSION}; re-ingest into a new index directory"
            )
        if (model is not None and model != saved["embedding_model"]) or (
            dim is not None and dim != int(saved["dim"])
        ):
            raise ModelMismatch(
                f"index {self.index_dir} was built with embedding model {saved['embedding_model']!r} "
                f"(dim {saved['dim']}), not {model!r} (dim {dim}); use that model "
                f"(RAG_EMBEDDING_MODEL) or another index directory"
            )
        return saved["embedding_model"], int(saved["dim"])

    def _db_gen(self) -> int:
        return int(self._db.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()[0])

    def _bump_gen(self) -> int:
        """Inside a write transaction: count this write; returns the generation it replaced."""
        gen = self._db_gen()
        self._db.execute("UPDATE settings SET value = ? WHERE key = 'generation'", (str(gen + 1),))
        return gen

    def _chunk_ids(self) -> np.ndarray:
        rows = self._db.execute("SELECT id FROM chunks ORDER BY id")
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def _rows_by_id(self, sql: str, ids: Sequence[int]) -> Iterator[tuple]:
        """Run `sql` (with one `{}` placeholder list) over `ids` in batches."""
        ids = [int(i) for i in ids]
        for i in range(0, len(ids), SQL_BATCH):
            part = ids[i : i + SQL_BATCH]
            yield from self._db.execute(sql.format(",".join("?" * len(part))), part)

    # ---- keeping FAISS and BM25 in step with SQLite ------------------------------------------

    def _load_snapshot(self) -> None:
        """Start from the files on disk (if readable), then repair them against SQLite."""
        self._load_vectors()
        self._sync()

    def _load_vectors(self) -> None:
        """The FAISS snapshot, if readable (missing: a new index, or killed before the first one)."""
        index = VectorIndex.read(str(self.index_dir / FAISS_NAME), self.dim)
        if index is not None:
            self._vectors = index

    def _published_vectors_differ(self) -> bool:
        """The writer's manifest names another vector index than ours (it rebuilt it): reload."""
        published = self._manifest().get("vectors")
        return published is not None and published != self._vectors_facts()

    def _vectors_facts(self) -> dict:
        return {"kind": self._vectors.kind, "nlist": self._vectors.nlist}

    def _sync(self) -> None:
        """Bring FAISS and BM25 to SQLite's newest committed state, both from ONE read transaction."""
        with self._lock:
            with self._txn(write=False):
                gen = self._db_gen()
                if gen == self.gen and gen == self._bm25_gen:
                    return
                ids = self._chunk_ids()
                if gen != self.gen:
                    if self._published_vectors_differ():
                        self._load_vectors()
                    self._sync_faiss(ids)
                    self.gen = gen
                self._sync_bm25(ids)
                self._bm25_gen = gen
            self._schedule_merge()

    def _faiss_ids(self) -> np.ndarray:
        return self._vectors.ids()

    def _sync_faiss(self, ids: np.ndarray) -> None:
        have = np.sort(self._faiss_ids())
        self._vectors.remove(np.setdiff1d(have, ids, assume_unique=True))
        missing = np.setdiff1d(ids, have, assume_unique=True)
        sql = "SELECT id, vector FROM chunks WHERE id IN ({})"
        for i in range(0, len(missing), 8 * SQL_BATCH):
            self._vectors.add(*self._id_vectors(self._rows_by_id(sql, missing[i : i + 8 * SQL_BATCH])))

    def _id_vectors(self, rows: Iterable[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of SQLite rows (id, vector blob)."""
        rows = list(rows)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
        return ids, vecs

    def _all_vectors(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every chunk's (ids, vectors) in batches, from the read transaction under way."""
        cursor = self._db.execute("SELECT id, vector FROM chunks ORDER BY id")
        while rows := cursor.fetchmany(8 * SQL_BATCH):
            yield self._id_vectors(rows)

    def _rebuild_vectors(self) -> bool:
        """Rebuild the vector index from SQLite if its size or the settings call for another one
        (`VectorSpec.needs_rebuild`); IVF is trained on a seeded random sample. Only in `save()`,
        so the new index is published like any snapshot; False if not due (or another writer got
        in first: the next save tries again)."""
        spec, n = self.vector_spec, self._vectors.ntotal
        if not spec.needs_rebuild(self._vectors, n):
            return False
        with self._txn(write=False):
            if self._db_gen() != self.gen:
                return False
            kind = spec.kind_for(n, self._vectors.kind)
            ids = self._chunk_ids()
            sample = np.zeros((0, self.dim), dtype=np.float32)
            if kind != "flat":
                pick = np.sort(np.random.default_rng(0).choice(ids, spec.train_size(n), replace=False))
                sql = "SELECT id, vector FROM chunks WHERE id IN ({})"
                sample = self._id_vectors(self._rows_by_id(sql, pick))[1]
            self._vectors = VectorIndex.build(kind, self.dim, spec, n, sample, self._all_vectors())
        return True

    def _sync_bm25(self, ids: np.ndarray) -> None:
        """Make BM25 cover exactly `ids`: start from a writer's newer snapshot if there is one (its
        segments may be merged already), then mark deleted chunks dead and index the new ones as
        one new segment. Cost: the new chunks, not the index (bm25s had to rebuild it all)."""
        if np.array_equal(self._bm25.alive_ids(), ids):
            return
        self._load_bm25_snapshot()
        have = self._bm25.alive_ids()
        self._bm25.delete(np.setdiff1d(have, ids, assume_unique=True))
        missing = np.setdiff1d(ids, have, assume_unique=True)
        if len(missing) == len(ids):  # from nothing: one scan beats batches of IN (...)
            rows = self._db.execute("SELECT id, text FROM chunks ORDER BY id")
        else:
            rows = self._rows_by_id("SELECT id, text FROM chunks WHERE id IN ({})", missing)
        self._bm25.add(build_segment(self._analyzed(rows)))

    def _analyzed(self, rows: Iterable[tuple[int, str]]) -> Iterator[tuple[int, list[str], str | None]]:
        for cid, text in rows:
            lang = self.analyzer.language(text)
            yield cid, self.analyzer.tokens(text, lang), lang

    def _load_bm25_snapshot(self) -> None:
        """Replace our BM25 by the newest readable snapshot of a later generation than ours, if any
        (segments we already hold are reused, not read again)."""
        for snap in self._bm25_snapshots()[:2]:
            if _snapshot_gen(snap) <= self._bm25_gen:
                return
            try:
                if (snap / ANALYZER_FILE).read_text() != self.analyzer.name:
                    continue
                names = json.loads((snap / SEGMENTS_FILE).read_text())
                dead = np.load(snap / DELETED_FILE)
                held = {seg.name: seg for seg in self._bm25.segments if seg.name}
                segments = [
                    (held.get(name) or Segment.load(self.index_dir / SEGMENTS_DIR / name)).with_dead(dead)
                    for name in names
                ]
            except (OSError, ValueError, KeyError):  # older format, or removed by a newer writer
                continue
            self._bm25 = SegmentedBM25(segments)
            return

    def _schedule_merge(self) -> None:
        """Start a background merge if one is due and none is running (one at a time per Store)."""
        with self._lock:
            if self._closed or (self._merger is not None and self._merger.is_alive()):
                return
            inputs = self._bm25.merge_plan(published=not self.readonly)
            if inputs:
                self._merger = threading.Thread(
                    target=self._merge, args=(self._bm25, inputs), name="bm25-merge", daemon=True
                )
                self._merger.start()

    def _merge(self, bm25: SegmentedBM25, inputs: list[Segment]) -> None:
        """Merge outside the lock (queries go on), swap the result in under it."""
        merged = merge_segments(inputs)
        with self._lock:
            if self._closed or bm25 is not self._bm25 or not bm25.replace(inputs, merged):
                return
            self._merges += 1
        self._schedule_merge()

    def wait_for_merges(self) -> None:
        """Return once no merge is running or due: before a final `save()`, in tests, benchmarks."""
        while True:
            self._schedule_merge()
            merger = self._merger
            if merger is None or not merger.is_alive():
                return
            merger.join()

    def _bm25_snapshots(self) -> list[Path]:
        """Newest first (names start with the zero-padded generation)."""
        return sorted(self.index_dir.glob(BM25_PREFIX + "*"), reverse=True)

    def _manifest(self) -> dict:
        try:
            return json.loads((self.index_dir / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def refresh(self) -> None:
        """See the latest state committed by another process (one query when nothing changed).

        FAISS and BM25 catch up by the difference: BM25 from a writer's newer snapshot when there
        is one, then by indexing the chunks added since (a small segment) and marking deleted ones.
        """
        self._sync()

    # ---- snapshots ---------------------------------------------------------------------------

    def save(self) -> None:
        """Write FAISS + BM25 snapshots of the current committed state, then the manifest (last).
        A BM25 snapshot writes only the segments not on disk yet (new chunks, merges) and a list."""
        self._require_writer()
        with self._lock:
            self._sync()
            name = f"{BM25_PREFIX}{self.gen:012d}-{self._merges:06d}-{self._analyzer_tag}"
            bm25_dir = self.index_dir / name
            rebuilt = self._rebuild_vectors()
            vectors_current = not rebuilt and self._manifest().get("generation") == self.gen
            if vectors_current and bm25_dir.exists():
                return  # already published (e.g. a re-ingest that changed nothing): skip the rewrite
            tag = f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            if not vectors_current:
                tmp = self.index_dir / f"{tag}-{FAISS_NAME}"
                self._vectors.write(str(tmp))
                _publish(tmp, self.index_dir / FAISS_NAME)
            if not bm25_dir.exists():
                self._publish_bm25(tag, bm25_dir)
            manifest = {
                "generation": self.gen,
                "chunks": self._vectors.ntotal,
                "faiss": FAISS_NAME,
                "vectors": self._vectors_facts(),
                "bm25": bm25_dir.name,
                "bm25_segments": len(self._bm25.segments),
                "analyzer": self.analyzer.name,
                "embedding_model": self.embedding_model,
                "dim": self.dim,
                "saved_at": time.time(),
            }
            tmp = self.index_dir / f"{tag}-{MANIFEST_NAME}"
            tmp.write_text(json.dumps(manifest, indent=1))
            _publish(tmp, self.index_dir / MANIFEST_NAME)
            self._remove_old_bm25()

    def _publish_bm25(self, tag: str, bm25_dir: Path) -> None:
        """New segments first (each under a unique name), then the snapshot that lists them."""
        (self.index_dir / SEGMENTS_DIR).mkdir(exist_ok=True)
        for seg in self._bm25.segments:
            if seg.name is None:
                name = f"seg-{self.gen:012d}-{uuid.uuid4().hex[:8]}"
                tmp = self.index_dir / f"{tag}-{name}"
                seg.save(tmp)
                _publish(tmp, self.index_dir / SEGMENTS_DIR / name)
                seg.name = name
        tmp = self.index_dir / f"{tag}-bm25"
        tmp.mkdir()
        (tmp / SEGMENTS_FILE).write_text(json.dumps([seg.name for seg in self._bm25.segments]))
        np.save(tmp / DELETED_FILE, self._bm25.dead_ids())
        np.save(tmp / "chunk_ids.npy", self._bm25.alive_ids())
        (tmp / ANALYZER_FILE).write_text(self.analyzer.name)
        (tmp / LANGUAGES_FILE).write_text(json.dumps(self._bm25.languages()))
        try:
            _publish(tmp, bm25_dir)
        except OSError:
            if not bm25_dir.exists():
                raise
            shutil.rmtree(tmp)  # another writer published this generation first

    def _remove_old_bm25(self) -> None:
        """Keep the two newest snapshots (one for readers still loading it) and the segments they
        or this Store use; a reader that loses a race here falls back to indexing from SQLite."""
        keep = {seg.name for seg in self._bm25.segments}
        for i, snap in enumerate(self._bm25_snapshots()):
            if i >= 2:
                shutil.rmtree(snap, ignore_errors=True)
                continue
            with contextlib.suppress(OSError, ValueError):
                keep.update(json.loads((snap / SEGMENTS_FILE).read_text()))
        with contextlib.suppress(OSError):
            for seg_dir in (self.index_dir / SEGMENTS_DIR).iterdir():
                if seg_dir.name not in keep:
                    shutil.rmtree(seg_dir, ignore_errors=True)

    def _remove_dead_temps(self) -> None:
        for tmp in self.index_dir.glob(TMP_PREFIX + "*"):
            pid = tmp.name[len(TMP_PREFIX) :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    # ---- writing -----------------------------------------------------------------------------

    def _require_writer(self) -> None:
        if self.readonly:
            raise StoreError("this Store was opened readonly")

    def _write(self, body: Callable[[], tuple[list[int], int]]) -> int:
        """Run `body` in one write transaction; it returns the chunk ids it removed. Then mirror it
        in memory: FAISS loses those ids (rows it added are already in), BM25 is rebuilt lazily."""
        self._require_writer()
        with self._lock:
            self._txn_added = []
            try:
                with self._txn(write=True):
                    gen = self._bump_gen()
                    removed, doc_id = body()
            except BaseException:
                if self._txn_added:  # vectors of the rolled-back transaction
                    self._vectors.remove(np.concatenate(self._txn_added))
                raise
            finally:
                self._txn_added = []
            self._vectors.remove(removed, defer=True)  # flat: in bulk, removal costs O(n) per call
            if gen == self.gen:
                self.gen = gen + 1
            else:  # another process wrote since our last look: a full diff catches both
                self._sync()
            return doc_id

    def _record(self, doc_id: int) -> DocRecord:
        record = self.find_document(doc_id)
        assert record is not None, "written in this very call"
        return record

    def _upsert_document(self, path: str, fields: dict) -> tuple[int, list[int]]:
        """Insert or update the row for `path`; drop its chunks. Returns (doc id, removed chunk ids)."""
        cols = ["path", "updated_at", *fields]
        values = [path, time.time(), *fields.values()]
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
        doc_id = self._db.execute(
            f"INSERT INTO documents ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT(path) DO UPDATE SET {updates} RETURNING id",
            values,
        ).fetchone()[0]
        removed = [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        return doc_id, removed

    def put_document(
        self, path: str, *, title: str, meta: FileMeta, batches: Iterable[tuple[Sequence[Chunk], np.ndarray]]
    ) -> DocRecord:
        """Replace the document at `path` by the chunks in `batches`, in ONE transaction.

        `batches` may be a generator that embeds while we write, so a 1000-page PDF never has all
        its vectors in memory at once. If it raises, nothing of this document changes.
        """

        def body() -> tuple[list[int], int]:
            fields = {"title": title, **asdict(meta), "status": "indexed", "error": None}
            doc_id, removed = self._upsert_document(path, fields)
            n = 0
            for chunks, vecs in batches:
                vecs = np.ascontiguousarray(vecs, dtype=np.float32)
                if vecs.shape != (len(chunks), self.dim):
                    raise StoreError(
                        f"expected vectors of shape ({len(chunks)}, {self.dim}), got {vecs.shape}"
                    )
                ids = [
                    self._db.execute(
                        'INSERT INTO chunks (doc_id, page, start, "end", text, vector) '
                        "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                        (doc_id, c.page, c.start, c.end, c.text, _to_blob(v)),
                    ).fetchone()[0]
                    for c, v in zip(chunks, vecs, strict=True)
                ]
                self._txn_added.append(np.array(ids, dtype=np.int64))
                self._vectors.add(self._txn_added[-1], vecs)
                n += len(ids)
            self._db.execute("UPDATE documents SET n_chunks = ? WHERE id = ?", (n, doc_id))
            return removed, doc_id

        return self._record(self._write(body))

    def skip_document(self, path: str, reason: str, meta: FileMeta = FileMeta()) -> DocRecord:
        """Record that `path` could not be indexed and why; any older chunks of it are dropped."""
        old = self.find_document(path)
        if old and (old.status, old.error) == ("skipped", reason) and old.meta() == meta:
            return old  # nothing new: no write, so readers need not refresh

        def body() -> tuple[list[int], int]:
            fields = {
                "title": Path(path).name,
                **asdict(meta),
                "n_chunks": 0,
                "status": "skipped",
                "error": reason,
            }
            doc_id, removed = self._upsert_document(path, fields)
            return removed, doc_id

        return self._record(self._write(body))

    def delete_document(self, doc_id: int, *, persist: bool = True) -> None:
        """Remove a document from SQLite, FAISS and BM25; `persist` writes the snapshots now."""

        def body() -> tuple[list[int], int]:
            if self._db.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is None:
                raise StoreError(f"no document with id {doc_id} in {self.index_dir}")
            removed = [r[0] for r in self._db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
            self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
            return removed, doc_id

        self._write(body)
        if persist:
            self.save()

    def set_setting(self, key: str, value: str) -> None:
        """Record a fact about the index (e.g. how `rag ingest` chunked it); not a search-visible write."""
        self._require_writer()
        if key in {"embedding_model", "dim", "schema_version", "generation"}:
            raise ValueError(f"setting {key!r} is managed by the store")
        with self._lock, self._txn(write=True) as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def forget_hashes(self) -> int:
        """For `rag ingest --rebuild`: clear every document's content hash, so the next ingest of its
        file reads, chunks and embeds it again (its chunks stay searchable until then). Returns how
        many documents it touched."""
        self._require_writer()
        with self._lock, self._txn(write=True) as db:
            return db.execute("UPDATE documents SET sha256 = NULL WHERE sha256 IS NOT NULL").rowcount

    # ---- reading -----------------------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def documents(self) -> list[DocRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, path, title, sha256, size, mtime, status, error, n_chunks, updated_at "
                "FROM documents ORDER BY path"
            ).fetchall()
        return [DocRecord(*r) for r in rows]

    def find_document(self, key: str | int) -> DocRecord | None:
        """By id (int or digits) or by path (as stored, or resolved from the current directory)."""
        cols = "id, path, title, sha256, size, mtime, status, error, n_chunks, updated_at"
        with self._lock:
            if (isinstance(key, int) or str(key).isdigit()) and int(key) <= SQLITE_MAX_INT:
                row = self._db.execute(f"SELECT {cols} FROM documents WHERE id = ?", (int(key),)).fetchone()
                if row is not None:
                    return DocRecord(*row)
            if isinstance(key, int):
                return None
            try:
                candidates = [str(key), str(Path(key).expanduser().resolve())]
            except (OSError, RuntimeError):  # unknown ~user, name too long: not a path we hold
                candidates = [str(key)]
            for path in candidates:
                row = self._db.execute(f"SELECT {cols} FROM documents WHERE path = ?", (path,)).fetchone()
                if row is not None:
                    return DocRecord(*row)
        return None

    def dense_search(self, query_vec: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Top-k chunks by inner product (== cosine: vectors are normalized). An approximate index
        proposes k * rerank candidates, scored again with their exact vectors from SQLite (chunks
        deleted since this Store's last refresh drop out, as `hits()` would drop them)."""
        q = np.asarray(query_vec, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vector has dim {q.shape[1]}, index has {self.dim}")
        spec = self.vector_spec
        with self._lock:
            if self._vectors.kind == "flat" or not spec.rerank:
                return self._vectors.search(q, k, spec.nprobe)
            candidates = self._vectors.search(q, k * spec.rerank, spec.nprobe)
            with self._txn(write=False):
                sql = "SELECT id, vector FROM chunks WHERE id IN ({})"
                ids, vecs = self._id_vectors(self._rows_by_id(sql, [cid for cid, _ in candidates]))
        scores = vecs @ q[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def bm25_search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Top-k chunks by BM25 over the analyzer's tokens; chunks sharing no token with the query are
        left out."""
        with self._lock:
            if not self.readonly and self._bm25_gen != self.gen:  # stale after our own writes
                self._sync()
            return self._bm25.search(self.analyzer.query(query, self._bm25.languages()), k)

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Hold this Store's in-memory state across several reads (no `refresh()` from another
        thread in between), so chunk ids from one call are still valid in the next (MMR)."""
        with self._lock:
            yield

    def hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        """Full metadata, same order; chunks deleted since the search are dropped."""
        sql = (
            'SELECT c.id, c.doc_id, d.path, d.title, c.page, c.start, c."end", c.text '
            "FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({})"
        )
        with self._lock, self._txn(write=False):
            rows = {r[0]: r for r in self._rows_by_id(sql, [cid for cid, _ in scored])}
        return [Hit(*rows[cid], score=score) for cid, score in scored if cid in rows]

    def vectors(self, chunk_ids: list[int]) -> np.ndarray:
        """Vectors of chunks this Store can return from a search, shape (len, dim), same order (MMR).

        Read from the in-memory FAISS, i.e. the same state the ids came from: a chunk that an
        ingest in another process replaced meanwhile still has its vector here until `refresh()`.
        An IVF index gives the decoding of its codes: close to the vectors, good enough for MMR.
        """
        with self._lock:
            if not chunk_ids:
                return np.empty((0, self.dim), dtype=np.float32)
            return self._vectors.reconstruct_batch(np.asarray(chunk_ids, dtype=np.int64))

    def stats(self) -> dict:
        with self._lock, self._txn(write=False):
            n_docs = self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            n_chunks = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
            by_status = dict(self._db.execute("SELECT status, COUNT(*) FROM documents GROUP BY status"))
            gen = self._db_gen()
        size = 0
        for f in self.index_dir.rglob("*"):
            with contextlib.suppress(OSError):  # a writer may remove old snapshots meanwhile
                size += f.stat().st_size if f.is_file() else 0
        return {
            "index_dir": str(self.index_dir),
            "documents": n_docs,
            "chunks": n_chunks,
            "by_status": by_status,
            "disk_bytes": size,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
            "generation": gen,
            "snapshot_generation": self._manifest().get("generation"),
            "bm25_generation": self._bm25_gen,
            "bm25_segments": len(self._bm25.segments),
            "analyzer": self.analyzer.name,
            "languages": dict(sorted(self._bm25.languages().items(), key=lambda kv: -kv[1])),
            "vector_index": self._vectors.kind,
            "vector_nlist": self._vectors.nlist,
            "vector_bytes_per_vector": self._vectors.bytes_per_vector(),
        }

    def verify(self) -> None:
        """Raise StoreError unless FAISS ids == SQLite chunk ids == BM25 ids, vectors are equal and
        every document's n_chunks is right. Compares the in-memory state with SQLite's newest."""
        with self._lock:
            self._sync()
            with self._txn(write=False):
                ids = self._chunk_ids()
                faiss_ids = np.sort(self._faiss_ids())
                if self._db_gen() != self.gen:
                    raise StoreError("index changed during verify(); run it again")
                if not np.array_equal(faiss_ids, ids):
                    raise StoreError(f"FAISS has {len(faiss_ids)} ids, SQLite {len(ids)}: not the same set")
                if not np.array_equal(self._bm25.alive_ids(), ids):
                    raise StoreError("BM25 does not cover exactly the SQLite chunks")
                for part_ids, vecs in self._all_vectors():  # IVF holds codes: compare with their decoding
                    stored = self._vectors.reconstruct_batch(part_ids)
                    same = (stored == self._vectors.stored_form(vecs)).all(axis=1)
                    if not same.all():
                        cid = part_ids[np.argmin(same)]
                        raise StoreError(f"FAISS vector of chunk {cid} differs from SQLite")
                bad = self._db.execute(
                    "SELECT d.id FROM documents d LEFT JOIN chunks c ON c.doc_id = d.id "
                    "GROUP BY d.id HAVING COUNT(c.id) != d.n_chunks"
                ).fetchall()
                if bad:
                    raise StoreError(f"documents with a wrong n_chunks: {[b[0] for b in bad]}")

    def close(self) -> None:
        """A merge still running is dropped (its segments are only ever added by a commit)."""
        with self._lock:
            self._closed = True
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
