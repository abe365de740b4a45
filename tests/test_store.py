"""The store alone (random unit vectors, dim 8): round trip, id agreement, deletes, repair, mismatch."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from rag.analysis import ANALYZER, Analyzer
from rag.store import (
    ANALYZER_FILE,
    DB_NAME,
    FAISS_NAME,
    MANIFEST_NAME,
    TMP_PREFIX,
    FileMeta,
    ModelMismatch,
    Store,
    StoreError,
)
from rag.types import Chunk
from rag.vectors import VectorSpec

DIM = 8
RNG = np.random.default_rng(0)


def unit(n: int) -> np.ndarray:
    v = RNG.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def put(store: Store, path: str, *texts: str, page: int = 1):
    chunks, start = [], 0
    for t in texts:
        chunks.append(Chunk(page, start, start + len(t), t))
        start += len(t) + 1
    vecs = unit(len(chunks))
    meta = FileMeta(f"sha-{path}", 1, 1.0)
    rec = store.put_document(path, title=Path(path).stem, meta=meta, batches=[(chunks, vecs)])
    return rec, vecs


def sqlite_ids(index_dir: Path) -> list[int]:
    with sqlite3.connect(index_dir / DB_NAME) as db:
        return [r[0] for r in db.execute("SELECT id FROM chunks ORDER BY id")]


def faiss_ids(store: Store) -> list[int]:
    return sorted(store._faiss_ids().tolist())  # after the deferred removals


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "index", "test-model", DIM)
    yield s
    s.close()


def test_round_trip(tmp_path, store):
    a, va = put(store, "/docs/a.txt", "alpha apples", "alpha bananas")
    b, vb = put(store, "/docs/b.txt", "unique zebra stripes", page=3)
    assert (a.status, a.n_chunks, b.n_chunks) == ("indexed", 2, 1)
    store.save()
    store.close()

    with Store(tmp_path / "index", readonly=True) as ro:
        assert (ro.embedding_model, ro.dim) == ("test-model", DIM)
        assert [d.path for d in ro.documents()] == ["/docs/a.txt", "/docs/b.txt"]
        assert ro.find_document("/docs/b.txt").id == ro.find_document(b.id).id == b.id
        assert ro.find_document("/nope") is None and ro.find_document(12345) is None
        top = ro.dense_search(vb[0], k=2)
        assert top[0][1] == pytest.approx(1.0, abs=1e-5)
        [hit] = ro.hits(top[:1])
        assert (hit.doc_id, hit.path, hit.title, hit.page, hit.text) == (
            b.id,
            "/docs/b.txt",
            "b",
            3,
            "unique zebra stripes",
        )
        assert (hit.start, hit.end) == (0, len(hit.text))
        assert [h.path for h in ro.hits(ro.bm25_search("zebra", k=5))] == ["/docs/b.txt"]
        alpha = ro.hits(ro.bm25_search("alpha", k=5))
        assert {h.text for h in alpha} == {"alpha apples", "alpha bananas"}
        np.testing.assert_array_equal(ro.vectors([h.chunk_id for h in alpha]), np.stack([
            va[0] if h.text == "alpha apples" else va[1] for h in alpha]))  # fmt: skip
        stats = ro.stats()
        assert (stats["documents"], stats["chunks"], stats["by_status"]) == (2, 3, {"indexed": 2})
        assert stats["disk_bytes"] > 0 and stats["generation"] == stats["snapshot_generation"]
        ro.verify()
        with pytest.raises(StoreError, match="readonly"):
            ro.delete_document(a.id)
        with pytest.raises(KeyError):
            ro.vectors([999999])


def test_faiss_ids_equal_sqlite_ids_after_add_replace_delete(tmp_path, store):
    a, _ = put(store, "/a", "one", "two")
    b, _ = put(store, "/b", "three")
    assert faiss_ids(store) == sqlite_ids(store.index_dir)
    old = sqlite_ids(store.index_dir)
    a2, _ = put(store, "/a", "one again", "two again", "three again")  # replace
    assert a2.id == a.id and a2.n_chunks == 3
    new = sqlite_ids(store.index_dir)
    assert faiss_ids(store) == new and not set(new) & (set(old) - {old[2]})  # ids are never reused
    store.delete_document(b.id)
    assert faiss_ids(store) == sqlite_ids(store.index_dir) and len(sqlite_ids(store.index_dir)) == 3
    store.verify()
    store.close()
    with Store(tmp_path / "index", readonly=True) as ro:
        assert faiss_ids(ro) == sqlite_ids(ro.index_dir)
        ro.verify()


def test_delete_removes_from_sqlite_faiss_and_bm25(tmp_path, store):
    put(store, "/keep", "ordinary words here")
    gone, vecs = put(store, "/gone", "xylophone quartet")
    store.save()
    reader = Store(tmp_path / "index", readonly=True)  # another "process", opened before the delete
    assert store.bm25_search("xylophone", 5) and store.dense_search(vecs[0], 1)[0][1] > 0.999
    store.delete_document(gone.id)
    for s in (store, reader):
        s.refresh()
        assert s.find_document("/gone") is None
        assert s.bm25_search("xylophone", 5) == []
        assert all(score < 0.999 for _, score in s.dense_search(vecs[0], 5))
        s.verify()
    reader.close()
    with Store(tmp_path / "index", readonly=True) as ro:  # the snapshot on disk was rewritten too
        assert ro.bm25_search("xylophone", 5) == [] and ro.stats()["chunks"] == 1
    with pytest.raises(StoreError, match="no document with id"):
        store.delete_document(gone.id)


def test_model_mismatch_and_bad_opens(tmp_path, store):
    put(store, "/a", "text")
    with pytest.raises(ModelMismatch, match="test-model"):
        Store(tmp_path / "index", "other-model", DIM)
    with pytest.raises(ModelMismatch):
        Store(tmp_path / "index", "test-model", DIM * 2)
    with pytest.raises(StoreError, match="no index"):
        Store(tmp_path / "missing", readonly=True)
    with pytest.raises(StoreError, match="no index"):
        Store(tmp_path / "missing", readonly=False, create=False)
    assert not (tmp_path / "missing").exists()  # refusing to open must not leave an empty index
    with pytest.raises(StoreError, match="needs embedding_model"):
        Store(tmp_path / "fresh")
    with pytest.raises(ValueError, match="dim"):
        store.dense_search(np.ones(DIM + 1), 3)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "junk", readonly=True)


def snapshot_two(store: Store):
    """/a and /b, committed and snapshotted."""
    a, _ = put(store, "/a", "apple alpha")
    put(store, "/b", "apple beta")
    store.save()
    return a


def change_without_snapshot(store: Store, a) -> np.ndarray:
    """What a kill before the next snapshot leaves: /a deleted and /c added in SQLite only."""
    store.delete_document(a.id, persist=False)
    return put(store, "/c", "apple gamma")[1]


def test_reader_keeps_its_committed_state_until_refresh(tmp_path, store):
    a = snapshot_two(store)
    reader = Store(tmp_path / "index", readonly=True)
    vc = change_without_snapshot(store, a)
    assert len(reader.bm25_search("apple", 5)) == 2 and reader.dense_search(vc[0], 1)[0][1] < 0.999
    segments = list(reader._bm25.segments)
    reader.refresh()  # no snapshot of the change yet: /c indexed as a new segment, /a a tombstone
    assert reader.hits(reader.dense_search(vc[0], 1))[0].path == "/c"
    assert sorted(h.path for h in reader.hits(reader.bm25_search("apple", 5))) == ["/b", "/c"]
    assert reader._bm25.segments[: len(segments)] == segments  # the old segment was not rebuilt
    assert reader.stats()["bm25_generation"] == reader.stats()["generation"]
    store.save()
    reader.verify()
    reader.close()


def test_open_repairs_stale_or_broken_snapshots(tmp_path, store):
    """What a kill between a commit and the next snapshot leaves: SQLite ahead of the files."""
    change_without_snapshot(store, snapshot_two(store))
    snapshot_gen = store.stats()["snapshot_generation"]
    store.close()
    with Store(tmp_path / "index", readonly=True) as ro:  # readers repair in memory only
        ro.verify()
        assert ro.bm25_search("gamma", 5) and not ro.bm25_search("alpha", 5)
        assert ro.stats()["snapshot_generation"] == snapshot_gen
    index_dir = tmp_path / "index"
    (index_dir / FAISS_NAME).write_bytes(b"garbage")  # unreadable: rebuilt from SQLite vectors
    dead = index_dir / ".tmp-999999999-deadbeef-vectors.faiss"  # a killed writer's leftover
    dead.write_bytes(b"partial")
    with Store(index_dir, "test-model", DIM) as rw:  # a writer persists the repair
        rw.verify()
        assert rw.stats()["snapshot_generation"] == rw.stats()["generation"]
    assert not dead.exists()
    assert faiss.read_index(str(index_dir / FAISS_NAME)).ntotal == 2


def test_failed_write_changes_nothing(store):
    a, _ = put(store, "/a", "original text")

    def broken():
        yield [Chunk(1, 0, 3, "new")], unit(1)
        raise RuntimeError("embedder died")

    with pytest.raises(RuntimeError, match="embedder died"):
        store.put_document("/a", title="a", meta=FileMeta("x", 1, 1.0), batches=broken())
    with pytest.raises(StoreError, match="shape"):
        store.put_document(
            "/a", title="a", meta=FileMeta("x", 1, 1.0), batches=[([Chunk(1, 0, 1, "n")], unit(2))]
        )
    assert store.find_document("/a").sha256 == a.sha256
    assert [h.text for h in store.hits(store.bm25_search("original", 5))] == ["original text"]
    store.verify()


def test_skip_document_records_reason_and_drops_chunks(store):
    put(store, "/a", "was readable")
    rec = store.skip_document("/a", "encrypted PDF (password required)", FileMeta("s2", 5, 2.0))
    assert (rec.status, rec.error, rec.n_chunks) == ("skipped", "encrypted PDF (password required)", 0)
    gen = store.stats()["generation"]
    assert store.skip_document("/a", rec.error, FileMeta("s2", 5, 2.0)).id == rec.id
    assert store.stats()["generation"] == gen  # the same skip again writes nothing
    assert store.bm25_search("readable", 5) == [] and store.stats()["chunks"] == 0
    store.verify()


def test_multilingual_bm25_search(store):
    put(store, "/cs", "Praha je hlavní město České republiky")
    put(store, "/uk", "Київ є столицею України")
    put(store, "/en", "The capital of France is Paris")
    for query, path in [("hlavní MĚSTO", "/cs"), ("столицею", "/uk"), ("the capital", "/en")]:
        assert store.hits(store.bm25_search(query, 1))[0].path == path
    assert store.bm25_search("!!!", 3) == [] and store.bm25_search("unknownword", 3) == []


def test_bm25_analyzes_each_chunk_in_its_language(store):
    put(store, "/ru", "Исследование законов масштабирования нейронных сетей показывает, как растёт качество.")
    put(store, "/cs", "Zákony škálování neuronových sítí popisují, jak roste kvalita jazykových modelů.")
    put(store, "/en", "Scaling laws describe how the loss of a language model falls with its size.")
    # other inflections than in the text: only stemming finds them
    for query, path in [
        ("Законы масштабирования", "/ru"),
        ("zákonů škálování", "/cs"),
        ("scaled law", "/en"),
    ]:
        assert store.hits(store.bm25_search(query, 1))[0].path == path
    assert store.stats()["languages"] == {"ru": 1, "cs": 1, "en": 1}


def test_index_of_an_older_analyzer_is_migrated_without_reingest(tmp_path):
    index = tmp_path / "index"
    with Store(index, "test-model", DIM, analyzer=Analyzer(stemming=False)) as old:
        put(old, "/en", "The engineers were running the tests all night long.")
        old.save()
        assert old.bm25_search("runs", 1) == []  # plain words: no match
    snapshot = json.loads((index / MANIFEST_NAME).read_text())["bm25"]
    with Store(index, readonly=True) as reader:  # a reader rebuilds in memory, leaves the files alone
        assert reader.hits(reader.bm25_search("runs", 1))[0].path == "/en"
        assert json.loads((index / MANIFEST_NAME).read_text())["bm25"] == snapshot
    with Store(index, "test-model", DIM) as writer:  # a writer (rag ingest) saves the new snapshot
        manifest = json.loads((index / MANIFEST_NAME).read_text())
        assert manifest["analyzer"] == writer.analyzer.name == ANALYZER and manifest["bm25"] != snapshot
        assert (index / manifest["bm25"] / ANALYZER_FILE).read_text() == ANALYZER
        writer.verify()
    with Store(index, readonly=True) as reader:
        assert reader.hits(reader.bm25_search("run", 1))[0].path == "/en"
        assert all(seg.name for seg in reader._bm25.segments)  # loaded from the snapshot, not rebuilt


# A writer that replaces documents and snapshots in a loop: most of its time is spent in save(),
# so most kills land mid-snapshot (temp files, fsyncs, renames, manifest), the rest mid-commit.
WRITER = """
import sys, numpy as np
from rag.store import FileMeta, Store
from rag.types import Chunk
from rag.vectors import VectorSpec
spec = VectorSpec(auto_threshold=int(sys.argv[3]))
store, rng = Store(sys.argv[1], "test-model", 8, vectors=spec), np.random.default_rng(int(sys.argv[2]))
i = 10 * int(sys.argv[2])  # each round adds new documents: the index grows past 256 chunks
while True:
    vecs = rng.normal(size=(50, 8)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    chunks = [Chunk(1, 0, 9, f"doc{i} word{j} filler") for j in range(50)]
    store.put_document(f"/doc{i % 40}", title=str(i), meta=FileMeta(str(i)), batches=[(chunks, vecs)])
    store.save()
    i += 1
    print(i, flush=True)
"""


@pytest.mark.parametrize("threshold", [200_000, 256], ids=["flat", "flat-then-ivf"])
def test_kill9_during_snapshot_writes_leaves_a_loadable_index(tmp_path, threshold):
    """With threshold 256 the vector index switches to IVF-SQ8 (and is rebuilt as it grows) in
    some round's snapshot, so kills land in those rebuilds too."""
    index_dir = tmp_path / "index"
    rng = np.random.default_rng(1)
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(index_dir), str(round_), str(threshold)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3):  # a few documents committed and snapshotted
            assert proc.stdout.readline(), "writer died"
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Store(index_dir, readonly=True) as ro:  # whatever the kill interrupted
            ro.verify()
            n = ro.stats()["documents"]
            assert ro.stats()["chunks"] == 50 * n and n > 0
            newest = max(ro.documents(), key=lambda d: int(d.title))
            assert {h.doc_id for h in ro.hits(ro.bm25_search(f"doc{newest.title}", 100))} == {newest.id}
    with Store(index_dir, "test-model", DIM, vectors=VectorSpec(auto_threshold=threshold)) as rw:
        rw.verify()  # the next writer cleans up and re-snapshots
        assert rw.stats()["snapshot_generation"] == rw.stats()["generation"]
        assert rw.stats()["vector_index"] == ("flat" if threshold > 2000 else "ivf-sq8")
    assert not list(index_dir.glob(TMP_PREFIX + "*"))


def test_find_document_by_out_of_range_id_is_none(store):
    put(store, "/a", "text")
    assert store.find_document(2**63) is None
    assert store.find_document("9" * 30) is None  # digits: tried as id, then as path


def test_save_without_changes_rewrites_nothing(tmp_path, store):
    snapshot_two(store)
    files = [tmp_path / "index" / FAISS_NAME, tmp_path / "index" / "manifest.json"]
    before = [f.stat().st_mtime_ns for f in files]
    time.sleep(0.01)
    store.save()
    assert [f.stat().st_mtime_ns for f in files] == before
    put(store, "/c", "cherry")
    store.save()
    assert [f.stat().st_mtime_ns for f in files] != before


def test_pinned_holds_off_a_refresh_from_another_thread(tmp_path, store):
    """MMR ranks, then reads vectors of the ranked ids: a refresh in between could drop them."""
    import threading

    a = snapshot_two(store)
    reader = Store(tmp_path / "index", readonly=True)
    store.delete_document(a.id)
    refreshed = threading.Event()
    with reader.pinned():
        ids = [cid for cid, _ in reader.dense_search(unit(1)[0], 10)]
        worker = threading.Thread(target=lambda: (reader.refresh(), refreshed.set()))
        worker.start()
        assert not refreshed.wait(0.3)  # the refresh waits for the pinned reads
        assert reader.vectors(ids).shape == (len(ids), DIM)
    worker.join(10)
    assert refreshed.is_set()
    with pytest.raises(KeyError):
        reader.vectors(ids)  # after the refresh, /a's chunk is gone
    reader.close()
