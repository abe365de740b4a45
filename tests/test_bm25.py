"""Segmented BM25 (rag/bm25.py): scores equal one index rebuilt over the live chunks, whatever the
segments, tombstones and merges; bm25s itself is the reference for one index."""

from __future__ import annotations

import json
import shutil

import bm25s
import numpy as np
import pytest

from rag.bm25 import MERGE_FACTOR, Segment, SegmentedBM25, build_segment, merge_segments
from rag.store import MANIFEST_NAME, SEGMENTS_DIR, FileMeta, Store
from rag.types import Chunk

WORDS = [f"w{i}" for i in range(300)]


def corpus(n: int, seed: int = 0) -> list[list[str]]:
    """Documents of 5-60 Zipf-distributed words: common words in most, rare ones in few."""
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, len(WORDS) + 1)
    weights /= weights.sum()
    return [list(rng.choice(WORDS, size=rng.integers(5, 60), p=weights)) for _ in range(n)]


def segment(docs: list[list[str]], first_id: int = 1) -> Segment:
    seg = build_segment((first_id + i, doc, "en") for i, doc in enumerate(docs))
    assert seg is not None
    return seg


QUERIES = [["w0"], ["w3", "w50"], ["w7", "w120", "w299"], ["w1", "w2", "w3", "w4"], ["w200"], ["nothing"]]


def all_scores(index: SegmentedBM25, n: int) -> list[list[tuple[int, float]]]:
    return [index.search(q, n) for q in QUERIES]


def assert_same(got: list[list[tuple[int, float]]], want: list[list[tuple[int, float]]]) -> None:
    for g, w in zip(got, want, strict=True):
        assert [cid for cid, _ in g] == [cid for cid, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-5)


def test_one_segment_scores_equal_bm25s():
    docs = corpus(200)
    ours = SegmentedBM25([segment(docs)])
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for d in docs for w in d))}
    ref = bm25s.BM25()
    ref.index(([[vocab[w] for w in d] for d in docs], vocab), create_empty_token=False, show_progress=False)
    for query in QUERIES:
        ids = [vocab[w] for w in query if w in vocab]
        want = ref.get_scores_from_ids(ids) if ids else np.zeros(len(docs))
        got = np.zeros(len(docs))
        for cid, score in ours.search(query, len(docs)):
            got[cid - 1] = score
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_segments_with_tombstones_score_like_one_rebuilt_index():
    """Global N, df and avgdl: a term's idf counts every segment's live rows, not its own."""
    docs = corpus(300, seed=1)
    parts = SegmentedBM25([segment(docs[:200], 1), segment(docs[200:280], 201), segment(docs[280:], 281)])
    dead = np.array([3, 17, 150, 205, 206, 290])
    parts.delete(dead)
    alive = [(i + 1, d) for i, d in enumerate(docs) if i + 1 not in set(dead)]
    rebuilt = SegmentedBM25([build_segment((cid, d, "en") for cid, d in alive)])
    assert_same(all_scores(parts, 300), all_scores(rebuilt, 300))
    np.testing.assert_array_equal(parts.alive_ids(), rebuilt.alive_ids())
    np.testing.assert_array_equal(parts.dead_ids(), dead)
    # the idf of a term depends on every segment: the small segment alone would rank otherwise
    alone = SegmentedBM25([segment(docs[280:], 281)])
    assert [s for _, s in alone.search(["w0"], 5)] != [s for _, s in parts.search(["w0"], 5)][:5]


def test_merge_keeps_scores_and_drops_dead_rows():
    docs = corpus(240, seed=2)
    segs = [segment(docs[i : i + 30], i + 1) for i in range(0, 240, 30)]
    index = SegmentedBM25(segs)
    index.delete(np.array([2, 31, 100, 239]))
    assert index.merge_plan() == segs[:MERGE_FACTOR]  # one tier of MERGE_FACTOR small segments
    merged = merge_segments(index.merge_plan())
    index.delete(np.array([5, 60]))  # deleted while the merge ran: still dead after the swap
    assert index.replace(segs[:MERGE_FACTOR], merged)
    assert len(index.segments) == 1 and len(merged) == 240 - 4 and merged.live == 240 - 6
    dead = {2, 5, 31, 60, 100, 239}
    rebuilt = SegmentedBM25(
        [build_segment((i + 1, d, "en") for i, d in enumerate(docs) if i + 1 not in dead)]
    )
    assert_same(all_scores(index, 240), all_scores(rebuilt, 240))
    assert index.merge_plan() == []
    assert not index.replace(segs[:MERGE_FACTOR], merged)  # inputs gone: nothing swapped twice


def test_segment_survives_save_and_load(tmp_path):
    docs = corpus(50, seed=3)
    langs = ["en", "ru", None] * 17
    seg = build_segment((i + 10, d, lang) for i, (d, lang) in enumerate(zip(docs, langs[:50], strict=True)))
    seg.save(tmp_path / "seg")
    loaded = Segment.load(tmp_path / "seg")
    assert loaded.name == "seg"
    a, b = SegmentedBM25([seg]), SegmentedBM25([loaded])
    assert_same(all_scores(a, 50), all_scores(b, 50))
    assert a.languages() == b.languages() == {"en": 17, "ru": 17}


DIM = 8


def put_docs(store: Store, docs: list[list[str]], prefix: str) -> None:
    rng = np.random.default_rng(len(prefix))
    for i, doc in enumerate(docs):
        text = " ".join(doc)
        vec = rng.normal(size=(1, DIM)).astype(np.float32)
        store.put_document(
            f"/{prefix}/{i}",
            title=str(i),
            meta=FileMeta(f"{prefix}{i}", len(text), 0.0),
            batches=[([Chunk(1, 0, len(text), text)], vec / np.linalg.norm(vec))],
        )


@pytest.mark.parametrize("query", ["w0", "w3 w50", "w7 w120 w299", "w200"])
def test_store_ingest_adds_segments_merges_and_matches_a_rebuild(tmp_path, query):
    """Each ingest + save adds one small segment and leaves the others alone; after MERGE_FACTOR
    of them a background merge runs; search equals a Store that indexed everything at once."""
    docs = corpus(160, seed=4)
    index = tmp_path / "index"
    with Store(index, "test-model", DIM) as store:
        put_docs(store, docs[:80], "base")
        store.save()
        base = store._bm25.segments[0]
        for batch in range(MERGE_FACTOR - 2):  # small ingests: one new segment each
            put_docs(store, docs[80 + 10 * batch : 90 + 10 * batch], f"add{batch}")
            store.save()
            assert store._bm25.segments[0] is base and len(store._bm25.segments) == batch + 2
        put_docs(store, docs[140:], "last")  # the MERGE_FACTOR-th segment of the lowest tier
        store.delete_document(store.find_document("/base/3").id)
        store.wait_for_merges()
        assert len(store._bm25.segments) == 1  # MERGE_FACTOR segments of the lowest tier merged
        store.save()
        got = store.bm25_search(query, 20)
        store.verify()
    with Store(index, readonly=True) as reader:  # loads the merged snapshot
        assert len(reader._bm25.segments) == 1 and reader._bm25.segments[0].name
        assert reader.bm25_search(query, 20) == got
    for snap in index.glob("bm25-*"):  # without snapshots, one index built from SQLite at once
        shutil.rmtree(snap)
    shutil.rmtree(index / SEGMENTS_DIR)
    with Store(index, readonly=True) as rebuilt:
        want = rebuilt.bm25_search(query, 20)
    assert [c for c, _ in got] == [c for c, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-6)


def test_unreferenced_segments_are_removed(tmp_path):
    docs = corpus(30, seed=5)
    with Store(tmp_path / "index", "test-model", DIM) as store:
        for i in range(4):
            put_docs(store, docs[i * 5 : i * 5 + 5], f"b{i}")
            store.save()
        store._bm25 = SegmentedBM25([merge_segments(store._bm25.segments)])  # as a merge would
        store._merges += 1
        store.save()
        put_docs(store, docs[25:], "last")
        store.save()
        on_disk = {p.name for p in (tmp_path / "index" / SEGMENTS_DIR).iterdir()}
        # the two newest snapshots: the merged segment + the last one; the 4 small ones are gone
        assert on_disk == {seg.name for seg in store._bm25.segments} and len(on_disk) == 2


def test_index_from_before_segments_is_migrated(tmp_path):
    """An index whose BM25 snapshot is a bm25s directory (no segment list): a reader indexes the
    chunks from SQLite in memory, a writer opening it saves the segmented snapshot."""
    docs = corpus(20, seed=6)
    index = tmp_path / "index"
    with Store(index, "test-model", DIM) as store:
        put_docs(store, docs, "d")
        store.save()
        want = store.bm25_search("w0 w5", 10)
    manifest = json.loads((index / MANIFEST_NAME).read_text())
    for snap in index.glob("bm25-*"):  # what the bm25s-based Store left: no segments.json
        shutil.rmtree(snap)
    shutil.rmtree(index / SEGMENTS_DIR)
    old = index / "bm25-000000000020-c30ce3c4"
    old.mkdir()
    (old / "params.index.json").write_text("{}")
    del manifest["bm25_segments"]
    manifest["bm25"] = old.name
    (index / MANIFEST_NAME).write_text(json.dumps(manifest))
    with Store(index, readonly=True) as reader:
        assert reader.bm25_search("w0 w5", 10) == want
        assert not any(seg.name for seg in reader._bm25.segments)  # built in memory, nothing written
    with Store(index, "test-model", DIM) as writer:
        assert writer.bm25_search("w0 w5", 10) == want
    manifest = json.loads((index / MANIFEST_NAME).read_text())
    assert manifest["bm25_segments"] == 1 and (index / manifest["bm25"] / "segments.json").is_file()


def test_readers_merge_only_what_they_indexed_themselves():
    """A reader takes the writer's merges from its snapshots; merging the writer's segments too
    would double the work in the serving process."""
    published = [segment(corpus(10, seed=i), 100 * i + 1) for i in range(MERGE_FACTOR)]
    for i, seg in enumerate(published):
        seg.name = f"seg-{i}"
    index = SegmentedBM25(published)
    assert index.merge_plan() == published and index.merge_plan(published=False) == []
    own = [segment(corpus(10, seed=50 + i), 10_000 + 100 * i) for i in range(MERGE_FACTOR)]
    index = SegmentedBM25(published[:3] + own)
    assert index.merge_plan(published=False) == own


def test_a_segment_with_no_live_row_goes():
    keep, gone = segment(corpus(10, seed=1), 1), segment(corpus(5, seed=2), 100)
    index = SegmentedBM25([keep, gone])
    index.delete(gone.ids)
    assert index.merge_plan() == [gone]
    assert index.replace([gone], merge_segments([gone])) and index.segments == [keep]
