"""Segmented BM25: immutable segments, deletions as tombstones, global statistics, merges.

Why not one bm25s index: bm25s stores each document's score per term with idf and the average
length already multiplied in, so adding one document changes every stored score and means a
rebuild of the whole corpus (7 s and +374 MB at 100k chunks; a minute at 1M). Here each segment
keeps raw term frequencies and lengths, and a query combines them with statistics taken over all
segments at that moment (Lucene's design): an ingest of a few files adds one small segment,
deleting a document only marks its rows dead, and scores stay exactly those of one index rebuilt
over the live chunks (`tests/test_bm25.py` checks this against bm25s itself). Small segments are
merged into bigger ones (`merge_plan`, run in the background by the Store) so a query touches a
logarithmic number of them.

The formula is bm25s's default ("lucene", k1 1.5, b 0.75), so rankings are those bm25s gave:
    score(q, d) = sum over distinct terms t of q in d of
                  log(1 + (N - df_t + 0.5) / (df_t + 0.5)) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
with N, df_t and avgdl counted over live chunks of every segment.
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

K1, B = 1.5, 0.75  # bm25s's defaults
MERGE_FACTOR = 8  # this many segments of one size tier are merged into one (log-structured)
MIN_TIER_ROWS = 1024  # segments below this size share the lowest tier
MAX_DEAD_SHARE = 0.3  # a segment with more dead rows than this is rewritten without them
CACHE_POSTINGS = 20_000_000  # per segment: term scores kept for repeated terms (80 MB)
# the files of a segment's directory
IDS, LENGTHS, LANGS, TF = "ids.npy", "lengths.npy", "langs.npy", "tf.npz"
TERMS, LANGUAGES = "terms.json", "languages.json"


class Segment:
    """Rows of chunks that never change: ids, term frequencies (CSC: a query reads only the
    postings of its terms), lengths in tokens and languages. What changes is `alive` (rows not
    deleted since) and `df`, the document frequency of each term over the live rows."""

    def __init__(
        self,
        ids: np.ndarray,
        terms: list[str],
        tf: sp.csc_matrix,
        lengths: np.ndarray,
        langs: np.ndarray,
        languages: list[str],
        name: str | None = None,
    ):
        self.ids, self.terms, self.tf, self.lengths = ids, terms, tf, lengths
        self.langs, self.languages = langs, languages  # row -> index into languages ("" = unsure)
        self.name = name  # the directory it was published as; None while only in memory
        self.column = {t: i for i, t in enumerate(terms)}
        self.alive = np.ones(len(ids), dtype=bool)
        self.dead_rows = np.zeros(0, dtype=np.int64)
        self.df = np.diff(tf.indptr).astype(np.int64)
        self._scored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._scored_stats: object = None
        self._scored_postings = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def live(self) -> int:
        return len(self.ids) - len(self.dead_rows)

    def kill(self, ids: np.ndarray) -> None:
        """Mark rows of `ids` dead and take them out of `df` (a pass over the postings: O(nnz))."""
        hit = np.isin(self.ids, ids) & self.alive
        if not hit.any():
            return
        self.alive &= ~hit
        self.dead_rows = np.flatnonzero(~self.alive)
        live_postings = np.cumsum(self.alive[self.tf.indices], dtype=np.int64)
        ends = np.concatenate([[0], live_postings])[self.tf.indptr]
        self.df = np.diff(ends)

    def with_dead(self, dead: np.ndarray) -> Segment:
        """The same rows (data shared, not copied) with `dead` ids marked deleted."""
        other = Segment(self.ids, self.terms, self.tf, self.lengths, self.langs, self.languages, self.name)
        other.kill(dead)
        return other

    def term_scores(self, col: int, idf: float, avgdl: float, stats: object) -> tuple[np.ndarray, np.ndarray]:
        """(rows, idf * tf / (tf + k1 * (1 - b + b * |d| / avgdl))) over one term's postings. Kept
        while the global statistics are the same (`stats`: until the next write), so a repeated
        term costs what it costs bm25s, whose index stores exactly these numbers."""
        if stats is not self._scored_stats or self._scored_postings > CACHE_POSTINGS:
            self._scored, self._scored_stats, self._scored_postings = {}, stats, 0
        hit = self._scored.get(col)
        if hit is None:
            lo, hi = self.tf.indptr[col], self.tf.indptr[col + 1]
            rows, tf = self.tf.indices[lo:hi], self.tf.data[lo:hi]
            norm = np.float32(K1) * (np.float32(1 - B) + np.float32(B / avgdl) * self.lengths[rows])
            hit = rows, np.float32(idf) * tf / (tf + norm)
            self._scored[col] = hit
            self._scored_postings += len(rows)
        return hit

    def save(self, path: Path) -> None:
        path.mkdir(parents=True)
        np.save(path / IDS, self.ids)
        np.save(path / LENGTHS, self.lengths)
        np.save(path / LANGS, self.langs)
        sp.save_npz(path / TF, self.tf, compressed=False)
        (path / TERMS).write_text(json.dumps(self.terms, ensure_ascii=False))
        (path / LANGUAGES).write_text(json.dumps(self.languages))

    @classmethod
    def load(cls, path: Path) -> Segment:
        return cls(
            np.load(path / IDS),
            json.loads((path / TERMS).read_text()),
            sp.load_npz(path / TF).tocsc(),
            np.load(path / LENGTHS),
            np.load(path / LANGS),
            json.loads((path / LANGUAGES).read_text()),
            name=path.name,
        )


def build_segment(rows: Iterable[tuple[int, Sequence[str], str | None]]) -> Segment | None:
    """A segment of (chunk id, tokens, language) rows; None if there are none. Rows are built as
    compact arrays (not Python lists per chunk) so a million chunks fit in a few hundred MB."""
    vocab: dict[str, int] = {}
    languages: dict[str, int] = {}
    ids, lengths, langs = array("q"), array("f"), array("h")
    indptr, indices, counts = array("q", [0]), array("i"), array("f")
    for cid, tokens, lang in rows:
        tf = Counter(vocab.setdefault(t, len(vocab)) for t in tokens)
        indices.extend(tf.keys())
        counts.extend(tf.values())
        indptr.append(len(indices))
        ids.append(cid)
        lengths.append(len(tokens))
        langs.append(languages.setdefault(lang or "", len(languages)))
    if not ids:
        return None
    shape = (len(ids), len(vocab))
    tf = sp.csr_matrix((np.frombuffer(counts, np.float32), np.frombuffer(indices, np.int32), indptr), shape)
    return Segment(
        np.frombuffer(ids, np.int64).copy(),
        list(vocab),
        tf.tocsc(),
        np.frombuffer(lengths, np.float32).copy(),
        np.frombuffer(langs, np.int16).copy(),
        list(languages),
    )


def merge_segments(segments: Sequence[Segment]) -> Segment:
    """One segment holding the live rows of `segments` (dead rows are dropped here, for good)."""
    vocab: dict[str, int] = {}
    languages: dict[str, int] = {}
    blocks, ids, lengths, langs = [], [], [], []
    for seg in segments:
        columns = np.array([vocab.setdefault(t, len(vocab)) for t in seg.terms], dtype=np.int32)
        lang_map = np.array([languages.setdefault(lang, len(languages)) for lang in seg.languages], np.int16)
        keep = np.flatnonzero(seg.alive)
        rows = seg.tf.tocsr()[keep]
        blocks.append((rows.data, columns[rows.indices], rows.indptr, len(keep)))
        ids.append(seg.ids[keep])
        lengths.append(seg.lengths[keep])
        langs.append(lang_map[seg.langs[keep]])
    shape = (sum(b[3] for b in blocks), len(vocab))
    tf = sp.vstack([sp.csr_matrix(b[:3], shape=(b[3], shape[1])) for b in blocks], format="csr")
    return Segment(
        np.concatenate(ids),
        list(vocab),
        tf.tocsc(),
        np.concatenate(lengths),
        np.concatenate(langs),
        list(languages),
    )


class SegmentedBM25:
    """The segments of one state of the index. Not thread-safe: the Store holds its lock."""

    def __init__(self, segments: Sequence[Segment] = ()):
        self.segments = list(segments)
        self._changed()

    def _changed(self) -> None:
        """Forget what was derived from the live rows (recomputed on demand)."""
        self._alive_ids: np.ndarray | None = None
        self._languages: dict[str, int] | None = None
        self._live_rows_tokens: tuple[int, float] | None = None
        self._stats = object()  # identifies these statistics in the segments' score caches

    def alive_ids(self) -> np.ndarray:
        """Sorted ids of the live chunks."""
        if self._alive_ids is None:
            parts = [s.ids[s.alive] for s in self.segments]
            self._alive_ids = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return self._alive_ids

    def delete(self, ids: np.ndarray) -> None:
        if len(ids):
            for seg in self.segments:
                seg.kill(ids)
            self._changed()

    def add(self, segment: Segment | None) -> None:
        if segment is not None:
            self.segments.append(segment)
            self._changed()

    def dead_ids(self) -> np.ndarray:
        """Ids still in a segment but deleted: the tombstones a snapshot records."""
        parts = [s.ids[s.dead_rows] for s in self.segments]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def languages(self) -> dict[str, int]:
        """Live chunks per detected language (unsure ones left out): queries choose among them."""
        if self._languages is None:
            out: Counter[str] = Counter()
            for seg in self.segments:
                for code, n in enumerate(np.bincount(seg.langs[seg.alive], minlength=len(seg.languages))):
                    if seg.languages[code] and n:
                        out[seg.languages[code]] += int(n)
            self._languages = dict(out)
        return self._languages

    def _live_totals(self) -> tuple[int, float]:
        """(live rows, their tokens): N and N * avgdl of the formula."""
        if self._live_rows_tokens is None:
            rows = sum(s.live for s in self.segments)
            tokens = sum(float(s.lengths[s.alive].sum()) for s in self.segments)
            self._live_rows_tokens = (rows, tokens)
        return self._live_rows_tokens

    def search(self, tokens: Sequence[str], k: int) -> list[tuple[int, float]]:
        """Top-k (chunk id, score) for distinct query `tokens`; chunks matching none are left out.
        Ties go to the lower chunk id, as in one index whose rows are in id order."""
        n_live, n_tokens = self._live_totals()
        if n_live == 0 or k <= 0:
            return []
        avgdl = n_tokens / n_live
        idf = {}
        for t in dict.fromkeys(tokens):
            df = sum(int(s.df[s.column[t]]) for s in self.segments if t in s.column)
            if df:
                idf[t] = math.log(1 + (n_live - df + 0.5) / (df + 0.5))
        found: list[tuple[int, float]] = []
        for seg in self.segments:
            scores = self._segment_scores(seg, idf, avgdl, self._stats)
            if scores is None:
                continue
            scores[seg.dead_rows] = 0.0
            top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
            found.extend((int(seg.ids[i]), float(scores[i])) for i in top if scores[i] > 0)
        found.sort(key=lambda hit: (-hit[1], hit[0]))
        return found[:k]

    @staticmethod
    def _segment_scores(
        seg: Segment, idf: dict[str, float], avgdl: float, stats: object
    ) -> np.ndarray | None:
        scores = None
        for term, weight in idf.items():
            col = seg.column.get(term)
            if col is None:
                continue
            rows, term_scores = seg.term_scores(col, weight, avgdl, stats)
            if scores is None:
                scores = np.zeros(len(seg), dtype=np.float32)
            np.add.at(scores, rows, term_scores)
        return scores

    def merge_plan(self, published: bool = True) -> list[Segment]:
        """Segments worth merging now, [] if none: MERGE_FACTOR of one size tier (tier = the
        base-MERGE_FACTOR log of the live rows), smallest tier first, or one segment with no live
        row or (not tiny) whose dead rows exceed MAX_DEAD_SHARE. Each row is rewritten about log(N)
        times over an index's life.
        `published=False` leaves segments read from a snapshot alone: a reader merges only the ones
        it indexed itself, and takes the writer's merges from its next snapshot."""
        tiers: dict[int, list[Segment]] = {}
        for seg in self.segments:
            if seg.name is not None and not published:
                continue
            dead_share = (len(seg) - seg.live) / max(1, len(seg))
            if dead_share == 1 or (len(seg) >= MIN_TIER_ROWS and dead_share > MAX_DEAD_SHARE):
                return [seg]  # rewritten without its dead rows (a wholly dead one just goes)
            tier = int(math.log(max(seg.live, MIN_TIER_ROWS) / MIN_TIER_ROWS, MERGE_FACTOR))
            tiers.setdefault(tier, []).append(seg)
        for tier in sorted(tiers):
            if len(tiers[tier]) >= MERGE_FACTOR:
                return tiers[tier][:MERGE_FACTOR]
        return []

    def replace(self, inputs: Sequence[Segment], merged: Segment) -> bool:
        """Put `merged` in place of `inputs` if they are all still here (a snapshot load may have
        replaced them meanwhile). Rows deleted while the merge ran are marked dead in it."""
        if not all(any(s is seg for s in self.segments) for seg in inputs):
            return False
        dead = np.concatenate([seg.ids[seg.dead_rows] for seg in inputs])
        merged.kill(dead)
        first = min(self.segments.index(seg) for seg in inputs)
        self.segments = [s for s in self.segments if not any(s is seg for seg in inputs)]
        if len(merged):  # all rows dead: the segment just goes
            self.segments.insert(first, merged)
        self._changed()
        return True
