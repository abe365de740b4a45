"""The ingest job with the real model, SQLite, FAISS and BM25; kill -9 and concurrent readers use
real `python -m rag.ingest.job` subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rag.config import Settings
from rag.ingest.job import SLOWDOWN_ENV, ProgressEvent, find_files, ingest, ingest_lock
from rag.store import DB_NAME, TMP_PREFIX, ModelMismatch, Store, StoreError

ROOT = Path(__file__).resolve().parents[2]


def write_corpus(folder: Path, n: int) -> list[Path]:
    """`n` one-chunk files; file i holds the unique word `uniq{i}w` and the shared word `shared`."""
    paths = []
    for i in range(n):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        body = f"File {i} is about topic uniq{i}w. Every file shares this shared sentence."
        if i % 3 == 2:
            path = sub / f"doc{i:02d}.html"
            path.write_text(f"<html><head><title>Doc {i}</title></head><body><p>{body}</p></body></html>")
        else:
            path = sub / f"doc{i:02d}.{'md' if i % 3 else 'txt'}"
            path.write_text(f"# Doc {i}\n\n{body}\n")
        paths.append(path)
    return paths


def settings_for(index_dir: Path, **kw) -> Settings:
    return Settings(index_dir=index_dir, **kw)


def state(index_dir: Path) -> tuple[list, list, np.ndarray]:
    """Everything an ingest decides (documents, chunks, vectors), independent of chunk ids."""
    with contextlib.closing(sqlite3.connect(index_dir / DB_NAME)) as db:
        docs = db.execute("SELECT path, title, sha256, status, error, n_chunks FROM documents ORDER BY path")
        docs = docs.fetchall()
        rows = db.execute(
            'SELECT d.path, c.page, c.start, c."end", c.text, c.vector FROM chunks c '
            "JOIN documents d ON d.id = c.doc_id ORDER BY d.path, c.page, c.start"
        ).fetchall()
    vecs = np.stack([np.frombuffer(r[-1], dtype="<f4") for r in rows]) if rows else np.zeros((0, 384))
    return docs, [r[:-1] for r in rows], vecs


def indexed_count(index_dir: Path) -> int:
    """Documents committed so far, read as a separate SQLite reader would."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{index_dir / DB_NAME}?mode=ro", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM documents WHERE status = 'indexed'").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def start_ingest(folder: Path, index_dir: Path, slowdown: float) -> subprocess.Popen:
    env = {**os.environ, SLOWDOWN_ENV: str(slowdown), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rag.ingest.job", str(folder), "--index", str(index_dir)]
    cmd += ["--batch-chunks", "2", "--snapshot-every", "0.15"]  # commits and snapshots come often
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    files = write_corpus(folder, 6)
    (folder / ".hidden.txt").write_text("hidden file")
    (folder / ".git").mkdir()
    (folder / ".git" / "config.txt").write_text("hidden dir")
    return folder, files


def test_find_files_sorted_recursive_without_hidden(tmp_path, corpus):
    folder, files = corpus
    found, missing = find_files([folder, files[0], tmp_path / "nope"])
    assert found == sorted(files) and missing == [(str(tmp_path / "nope"), "no such file or directory")]
    assert find_files([folder / ".hidden.txt"])[0] == [folder / ".hidden.txt"]  # given directly: taken


def test_reingest_unchanged_folder_embeds_nothing(tmp_path, corpus, embedder):
    folder, files = corpus
    settings = settings_for(tmp_path / "index")
    events: list[ProgressEvent] = []
    first = ingest([folder], settings, embedder=embedder, on_progress=events.append)
    assert (first.ingested, first.unchanged, first.skipped, first.deleted) == (6, 0, [], 0)
    assert first.chunks == 6 and first.seconds > 0
    assert events[-1].files_done == events[-1].files_total == 6 and events[-1].chunks_done == 6
    assert [e.files_done for e in events] == sorted(e.files_done for e in events)
    with Store(settings.index_dir, readonly=True) as store:
        store.verify()
        gen = store.stats()["generation"]
        [hit] = store.hits(store.bm25_search("uniq4w", 3))
        assert hit.path == str(files[4].resolve()) and "uniq4w" in hit.text
        assert hit.title == "Doc 4"

    n_texts, n_calls = embedder.n_texts, embedder.n_calls
    again = ingest([folder], settings, embedder=embedder)
    assert (again.ingested, again.unchanged, again.chunks) == (0, 6, 0)
    assert (embedder.n_texts, embedder.n_calls) == (n_texts, n_calls)  # not one text embedded
    with Store(settings.index_dir, readonly=True) as store:
        assert store.stats()["generation"] == gen  # and not one write
    assert again.to_dict().keys() == {"ingested", "unchanged", "skipped", "chunks", "deleted", "seconds"}


def test_changed_file_replaced_and_prune_stays_under_roots(tmp_path, corpus, embedder):
    folder, files = corpus
    other = tmp_path / "other"
    other_files = write_corpus(other, 2)
    settings = settings_for(tmp_path / "index")
    ingest([folder], settings, embedder=embedder)
    ingest([other], settings, embedder=embedder)
    files[1].write_text("# Doc 1\n\nRewritten: now about quokkas only.\n")
    files[2].unlink()
    other_files[0].unlink()  # gone too, but not under the root we prune
    n_texts = embedder.n_texts
    report = ingest([folder], settings, embedder=embedder, prune=True)
    assert (report.ingested, report.unchanged, report.deleted, report.chunks) == (1, 4, 1, 1)
    assert embedder.n_texts == n_texts + 1  # only the changed file was embedded
    with Store(settings.index_dir, readonly=True) as store:
        store.verify()
        assert store.find_document(str(files[2])) is None
        assert store.find_document(str(other_files[0])) is not None
        old_hits = store.hits(store.bm25_search("uniq1w", 5))  # old content of the changed file is gone
        assert [h.path for h in old_hits] == [str(other_files[1])]
        [hit] = store.hits(store.bm25_search("quokkas", 5))
        assert hit.path == str(files[1])
        assert store.hits(store.dense_search(embedder.encode_query("quokkas"), 1))[0].path == str(files[1])
        assert len(store.documents()) == 6 - 1 + 2


def test_bad_files_are_skipped_and_reported(tmp_path, corpus, embedder):
    folder, files = corpus
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 not text" * 50)
    (folder / "picture.png").write_bytes(b"\x89PNG....")
    (folder / "empty.md").write_text("")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    settings = settings_for(tmp_path / "index")
    report = ingest([folder, tmp_path / "missing.txt"], settings, embedder=embedder)
    assert report.ingested == 6
    reasons = dict(report.skipped)
    assert set(reasons) == {
        str(folder / n) for n in ("binary.txt", "picture.png", "empty.md", "broken.pdf")
    } | {str(tmp_path / "missing.txt")}
    assert (
        "unsupported" in reasons[str(folder / "picture.png")]
        and "binary" in reasons[str(folder / "binary.txt")]
    )
    with Store(settings.index_dir, readonly=True) as store:
        skipped = {d.path: d for d in store.documents() if d.status == "skipped"}
        assert set(skipped) == set(reasons) - {str(tmp_path / "missing.txt")}
        assert all(d.error == reasons[p] and d.n_chunks == 0 for p, d in skipped.items())
        assert store.stats()["by_status"] == {"indexed": 6, "skipped": 4}
    again = ingest([folder], settings, embedder=embedder)
    assert len(again.skipped) == 4 and again.unchanged == 6  # still reported on every run


def test_big_file_is_embedded_in_batches_in_one_document(tmp_path, embedder):
    words = " ".join(f"word{i}" for i in range(300))
    (tmp_path / "big.txt").write_text(words)
    settings = settings_for(tmp_path / "index", chunk_tokens=32, chunk_overlap=0)
    calls = embedder.n_calls
    report = ingest([tmp_path / "big.txt"], settings, embedder=embedder, batch_chunks=8)
    with Store(settings.index_dir, readonly=True) as store:
        [doc] = store.documents()
        assert doc.n_chunks == report.chunks > 16
        assert embedder.n_calls - calls == -(-doc.n_chunks // 8)  # ceil: one call per batch
        assert store.hits(store.bm25_search("word299", 1))[0].doc_id == doc.id
        store.verify()


def test_refuses_second_writer_and_other_model(tmp_path, corpus, embedder):
    folder, _ = corpus
    settings = settings_for(tmp_path / "index")
    with ingest_lock(settings.index_dir), pytest.raises(StoreError, match="another ingest"):
        ingest([folder], settings, embedder=embedder)
    Store(tmp_path / "other-index", "some-other-model", embedder.dim).close()
    with pytest.raises(ModelMismatch, match="some-other-model"):
        ingest([folder], settings_for(tmp_path / "other-index"), embedder=embedder)


def test_kill9_at_any_moment_then_rerun_equals_clean_ingest(tmp_path, embedder):
    folder = tmp_path / "docs"
    n = 48
    write_corpus(folder, n)
    index_dir = tmp_path / "index"
    committed = 0
    # Kill when some documents are committed, plus a small delay so kills also land inside
    # embedding calls, transactions and snapshot writes; each run resumes the previous one.
    for kill_at, delay in [(6, 0.0), (18, 0.11), (30, 0.047)]:
        proc = start_ingest(folder, index_dir, slowdown=0.06)
        deadline = time.monotonic() + 120
        while indexed_count(index_dir) < kill_at:
            assert proc.poll() is None, (
                f"ingest ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            )
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Store(index_dir, readonly=True) as store:  # loads, consistent, searchable
            store.verify()
            done = [d for d in store.documents() if d.status == "indexed"]
            assert kill_at <= len(done) < n and len(done) >= committed
            committed = len(done)
            word = f"uniq{int(Path(done[-1].path).stem[3:])}w"
            assert store.hits(store.bm25_search(word, 1))[0].path == done[-1].path
            assert store.dense_search(embedder.encode_query(word), 3)

    report = ingest([folder], settings_for(index_dir), embedder=embedder)
    assert (report.unchanged, report.ingested, report.skipped) == (committed, n - committed, [])
    assert not list(index_dir.glob(TMP_PREFIX + "*"))  # leftovers of killed writers are gone
    ingest([folder], settings_for(tmp_path / "clean"), embedder=embedder)
    docs, chunks, vecs = state(index_dir)
    clean_docs, clean_chunks, clean_vecs = state(tmp_path / "clean")
    assert docs == clean_docs and chunks == clean_chunks and len(docs) == n
    np.testing.assert_allclose(vecs, clean_vecs, atol=1e-4)  # other process, other batches
    with Store(index_dir, readonly=True) as store:
        store.verify()
        assert store.stats()["snapshot_generation"] == store.stats()["generation"]


def test_readers_keep_searching_committed_chunks_during_ingest(tmp_path, embedder):
    folder = tmp_path / "docs"
    n = 16
    write_corpus(folder, n)
    index_dir = tmp_path / "index"
    query = embedder.encode_query("shared sentence")
    proc = start_ingest(folder, index_dir, slowdown=0.15)
    reader, seen = None, set()
    try:
        while proc.poll() is None:
            if reader is None:
                with contextlib.suppress(StoreError):
                    reader = Store(index_dir, readonly=True)
                time.sleep(0.02)
                continue
            reader.refresh()
            dense = reader.dense_search(query, 100)
            lexical = reader.bm25_search("shared", 100)
            # one chunk per file, each with "shared": BM25 sees the same committed chunks as FAISS,
            # or (while refresh() puts off a rebuild) those of an earlier committed state
            assert {c for c, _ in lexical} <= {c for c, _ in dense}
            assert len(reader.hits(dense)) == len(dense)  # every id resolves to a committed chunk
            seen.add(len(dense))
            time.sleep(0.05)
    finally:
        proc.kill()
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert len({s for s in seen if 0 < s < n}) >= 2, f"no searches mid-ingest: {seen}"
    reader.refresh()
    assert len(reader.dense_search(query, 100)) == len(reader.bm25_search("shared", 100)) == n
    reader.verify()
    reader.close()


def test_fifo_is_skipped_not_hashed_forever(tmp_path, embedder):
    folder = tmp_path / "docs"
    write_corpus(folder, 2)
    os.mkfifo(folder / "pipe.txt")  # open() on it would block the whole ingest
    report = ingest([folder], settings_for(tmp_path / "index"), embedder=embedder)
    assert report.ingested == 2
    assert (str(folder / "pipe.txt"), "not a regular file") in report.skipped


def test_symlink_out_of_the_folder_is_refused(tmp_path, embedder):
    folder, outside = tmp_path / "docs", tmp_path / "outside"
    write_corpus(folder, 1)
    outside.mkdir()
    (outside / "secret.txt").write_text("The launch code is swordfish.")
    (folder / "notes.txt").symlink_to(outside / "secret.txt")
    (folder / "inside.txt").symlink_to(folder / "part0" / "doc00.txt")  # a link within the folder is fine
    files, refused = find_files([folder.resolve()])
    assert folder.resolve() / "inside.txt" in files
    assert [p for p, _ in refused] == [str(folder.resolve() / "notes.txt")]
    ingest([folder], settings_for(tmp_path / "index"), embedder=embedder)
    with Store(tmp_path / "index", readonly=True) as store:
        assert store.bm25_search("swordfish", 5) == []


def test_odd_entries_are_skipped_one_by_one_and_the_rest_is_ingested(tmp_path, embedder):
    """A symlink loop, a name that is not UTF-8, a broken link and an unreadable folder in a folder,
    and a FIFO and a loop given directly: each is reported with its reason, the good files go in."""
    folder = tmp_path / "docs"
    write_corpus(folder, 2)
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    latin1 = os.fsdecode(bytes(folder) + b"/caf\xe9.txt")  # not UTF-8: a surrogate in Python's str
    Path(latin1).write_text("A file named in Latin-1.")
    (folder / "gone.txt").symlink_to(folder / "never-there.txt")
    locked = folder / "locked"
    locked.mkdir()
    (locked / "inside.txt").write_text("unreachable")
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    locked.chmod(0)
    try:
        report = ingest(
            [folder, tmp_path / "pipe.txt", tmp_path / "loop"],
            settings_for(tmp_path / "i"),
            embedder=embedder,
        )
    finally:
        locked.chmod(0o755)
    reasons = dict(report.skipped)
    as_root = os.geteuid() == 0  # root reads any folder
    assert report.ingested == 2 + as_root, report.skipped
    assert reasons[str(folder / "a")] == reasons[str(folder / "b")] == "symlink loop"
    assert reasons[str(tmp_path / "loop")] == "symlink loop"
    assert reasons[str(folder) + "/caf\\xe9.txt"] == "file name is not valid UTF-8: rename it"
    assert reasons[str(folder / "gone.txt")].startswith("broken symlink")
    assert reasons[str(tmp_path / "pipe.txt")] == "not a regular file"
    if not as_root:
        assert reasons[str(locked)] == "cannot read folder: Permission denied"
    with Store(tmp_path / "i", readonly=True) as store:
        assert store.stats()["by_status"]["indexed"] == 2 + as_root


def test_progress_moves_inside_a_large_file(tmp_path, embedder):
    """Events while a large file is embedded count its chunks, before the file is done; the model
    load is announced when the job loads the model itself."""
    from rag.ingest.job import PROGRESS_CHUNKS

    (tmp_path / "big.txt").write_text(" ".join(f"word{i}" for i in range(2000)))
    settings = settings_for(tmp_path / "index", chunk_chars=0, chunk_tokens=32, chunk_overlap=0)
    events: list[ProgressEvent] = []
    report = ingest([tmp_path / "big.txt"], settings, on_progress=events.append)
    assert events[0].stage == "loading embedding model"
    inside = [e for e in events if e.files_done == 0 and e.file_chunks_done]
    assert len(inside) >= report.chunks // PROGRESS_CHUNKS >= 3
    assert [e.file_chunks_done for e in inside] == [e.chunks_done for e in inside]  # the only file
    assert inside[0].file_chunks_done == PROGRESS_CHUNKS and inside[-1].file_chunks_done == report.chunks
    assert all(e.file_chunks_total == report.chunks for e in inside)
    assert events[-1].files_done == 1 and events[-1].chunks_done == report.chunks
