"""Retrieval: RRF and MMR by hand, then every mode on a small real index (real model, FAISS, BM25)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag.config import Settings
from rag.embed import get_embedder
from rag.ingest.job import ingest
from rag.retrieve import CHUNK_RAMP, QUERY_RAMP, Retriever, dense_weight, fuse, mmr, open_retriever
from rag.store import Store

DOCS = {
    "sourdough.md": "# Sourdough bread\n\nA sourdough starter is a culture of wild yeast and lactic acid "
    "bacteria. Feed the starter with flour and water, let the dough rise overnight, then bake the loaf "
    "in a hot Dutch oven so the crust turns dark and crisp.",
    "jupiter.txt": "Jupiter has ninety-five known moons. The four largest, Io, Europa, Ganymede and "
    "Callisto, were discovered by Galileo Galilei in 1610. Europa hides a salty ocean under its ice.",
    "asyncio.md": "# Python asyncio\n\nThe asyncio event loop runs coroutines concurrently. Use "
    "`async def` to define a coroutine and `await` to suspend it until a future completes; "
    "asyncio.gather runs many coroutines at once.",
    "glaciers.txt": "Glaciers form where snow accumulates faster than it melts. Under its own weight the "
    "snow compacts into dense ice that flows slowly downhill, carving U-shaped valleys.",
    "hrad.txt": "Pražský hrad je největší souvislý hradní komplex na světě. Stojí na Hradčanech nad "
    "řekou Vltavou a sídlí v něm prezident republiky.",
    "kyiv.txt": "Київ — столиця України, одне з найстаріших міст Східної Європи. Місто стоїть на "
    "берегах Дніпра, а Софійський собор внесено до списку світової спадщини.",
    "baikal.txt": "Байкал — самое глубокое озеро на планете: его глубина достигает 1642 метров. "
    "В озере содержится около двадцати процентов мировых запасов пресной воды.",
    # the case: a Russian query over Czech, Ukrainian and Russian texts on nearby topics
    "zakony-ru.txt": "Законы масштабирования описывают, как ошибка языковой модели уменьшается с ростом "
    "числа параметров, объёма обучающих данных и вычислительного бюджета.",
    "zakony-uk.txt": "Бджільництво в Україні має давню історію: пасічники доглядають вулики, годують "
    "бджолині сім'ї взимку та збирають мед наприкінці літа.",
    "zakony-cs.txt": "Plzeňské pivo se vaří z chmele, ječného sladu a měkké vody již od roku 1842; "
    "pivovar dnes ročně vyrobí přes milion hektolitrů.",
}
# Near-duplicates about glaciers, so MMR has something to remove.
DUPLICATE = DOCS["glaciers.txt"]
DOCS["glaciers-copy-1.txt"] = DUPLICATE + " Copy one."
DOCS["glaciers-copy-2.txt"] = DUPLICATE + " Copy two."


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> tuple[Settings, Path]:
    corpus = tmp_path_factory.mktemp("corpus")
    for name, text in DOCS.items():
        (corpus / name).write_text(text, encoding="utf-8")
    settings = Settings(index_dir=tmp_path_factory.mktemp("index"))
    report = ingest([corpus], settings)
    assert report.ingested == len(DOCS) and not report.skipped
    return settings, corpus


@pytest.fixture(scope="module")
def retriever(index) -> Retriever:
    settings, _ = index
    return open_retriever(settings)


def test_fusion_rule_by_hand():
    dense = [(1, 0.9), (2, 0.8), (3, 0.1)]
    bm25 = [(3, 12.0), (1, 5.0)]
    fused = dict(fuse(dense, bm25, [1.0, 1.0, 1.0], k=10))
    assert fused == pytest.approx({1: 1 / 11 + 1 / 12, 2: 1 / 12, 3: 1 / 13 + 1 / 11})
    # per-chunk dense weights: chunk 1's dense vote counts half
    assert dict(fuse(dense, bm25, [0.5, 1.0, 1.0], k=10))[1] == pytest.approx(0.5 / 11 + 1 / 12)
    # dense weight 0 (a query or chunks the model cannot read): exactly the BM25 ranking
    assert fuse(dense, bm25, [0.0, 0.0, 0.0], k=10) == [(3, 1 / 11), (1, 1 / 12), (2, 0.0)]
    assert fuse(dense, bm25, [1.0] * 3, k=10, bm25_weight=3.0)[0] == (3, pytest.approx(1 / 13 + 3 / 11))
    # ties go to the lexical hit, then to the lower id
    assert [c for c, _ in fuse([(5, 0.9)], [(6, 3.0)], [1.0], k=60)] == [6, 5]
    assert [c for c, _ in fuse([(5, 0.9), (4, 0.8)], [], [0.0, 0.0], k=60)] == [5, 4]  # dense rank
    assert [c for c, _ in fuse([], [(9, 1.0), (8, 1.0)], [], k=60)] == [9, 8]
    with pytest.raises(ValueError, match="weights"):
        fuse(dense, bm25, [1.0])


@pytest.mark.parametrize("ramp", [QUERY_RAMP, CHUNK_RAMP, (0.2, 0.3)])
def test_dense_weight_ramps_with_coverage(ramp):
    low, high = ramp
    w = dense_weight(np.array([0.0, low, (low + high) / 2, high, 1.0]), ramp)
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_embedder_coverage_tells_languages_it_reads(retriever):
    en, de, cs, ru, uk, digits = retriever.embedder.coverage(
        [
            "The river carries old stones past quiet towns while engineers measure the flow.",
            "Der Fluss trägt alte Steine an stillen Städten vorbei, während Ingenieure messen.",
            "Řeka nese staré kameny kolem tichých měst, zatímco inženýři měří průtok.",
            "Река несёт старые камни мимо тихих городов, пока инженеры измеряют течение.",
            "Річка несе старе каміння повз тихі міста, поки інженери вимірюють течію.",
            "1642 — 2024",
        ]
    )
    readable, unreadable = max(QUERY_RAMP[1], CHUNK_RAMP[1]), min(QUERY_RAMP[0], CHUNK_RAMP[0])
    assert en > readable and max(de, cs, ru, uk) < unreadable and digits == 1.0


def test_mmr_by_hand():
    a = np.array([1.0, 0.0, 0.0])
    a_dup = np.array([0.99, 0.141, 0.0])
    b = np.array([0.0, 1.0, 0.0])
    vecs = np.stack([a, a_dup / np.linalg.norm(a_dup), b]).astype(np.float32)
    cands = [(10, 3.0), (11, 2.9), (12, 2.0)]
    assert mmr(cands, vecs, k=2, lam=1.0) == cands[:2]  # pure relevance
    assert mmr(cands, vecs, k=2, lam=0.5) == [cands[0], cands[2]]  # the near-duplicate is skipped
    assert mmr(cands, vecs, k=5, lam=0.5) == [cands[0], cands[2], cands[1]]
    assert mmr([], vecs[:0], k=3, lam=0.5) == []
    with pytest.raises(ValueError, match="mmr_lambda"):
        mmr(cands, vecs, k=2, lam=1.5)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("how do I bake sourdough bread with a starter", "sourdough.md"),
        ("moons of Jupiter discovered by Galileo", "jupiter.txt"),
        ("await a coroutine in the asyncio event loop", "asyncio.md"),
    ],
)
def test_every_mode_finds_the_right_document(retriever, mode, query, expected):
    hits = retriever.search(query, k=3, mode=mode)
    assert Path(hits[0].path).name == expected
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_hits_cite_exact_spans(retriever, index):
    _, corpus = index
    hits = retriever.search("Galileo Europa ocean", k=4)
    assert len(hits) == 4
    for h in hits:
        source = (corpus / Path(h.path).name).read_text(encoding="utf-8")
        assert h.page == 1 and source[h.start : h.end] == h.text
    assert hits[0].title == "jupiter" and hits[0].doc_id > 0
    assert retriever.search("asyncio", k=1, mode="bm25")[0].title == "Python asyncio"


@pytest.mark.parametrize("mode", ["bm25", "hybrid"])
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # other inflections than in the documents: found through each language's stems
        ("Kde sídlí prezidenta republiky?", "hrad.txt"),  # Czech (Snowball)
        ("největší hradní komplex", "hrad.txt"),
        ("Z čeho se vaří plzeňská piva?", "zakony-cs.txt"),
        ("столиця України", "kyiv.txt"),  # Ukrainian (5-letter prefixes)
        ("Коли пасічник збирає мед з вуликів?", "zakony-uk.txt"),
        ("самое глубокое озеро", "baikal.txt"),  # Russian (Snowball)
        ("Законы масштабирования языковых моделей", "zakony-ru.txt"),
        ("закон масштабирования", "zakony-ru.txt"),
    ],
)
def test_russian_czech_and_ukrainian_queries_find_their_own_document_first(retriever, mode, query, expected):
    assert Path(retriever.search(query, k=3, mode=mode)[0].path).name == expected


def test_hybrid_fuses_dense_and_bm25_by_coverage(retriever):
    query = "ice flows downhill in valleys"
    vec = retriever.embedder.encode_query(query)
    dense = retriever.store.dense_search(vec, retriever.depth)
    bm25 = retriever.store.bm25_search(query, retriever.depth)
    query_w = dense_weight(retriever.embedder.coverage([query]))[0]
    chunk_w = dense_weight(retriever.chunk_coverage([cid for cid, _ in dense]), CHUNK_RAMP)
    expected = fuse(dense, bm25, list(query_w * chunk_w), k=retriever.rrf_k)[:5]
    hits = retriever.search(query, k=5, mode="hybrid")
    assert [(h.chunk_id, h.score) for h in hits] == [(c, pytest.approx(s)) for c, s in expected]
    # English query, English chunks: full weight; the Cyrillic chunks' dense votes do not count
    by_chunk = dict(zip([cid for cid, _ in dense], chunk_w, strict=True))
    paths = {h.chunk_id: Path(h.path).name for h in retriever.store.hits(dense)}
    assert query_w == 1.0 and by_chunk[next(c for c, p in paths.items() if p == "glaciers.txt")] == 1.0
    assert by_chunk[next(c for c, p in paths.items() if p == "baikal.txt")] == 0.0


def test_russian_query_is_not_embedded_and_hybrid_is_bm25(retriever):
    query = "Законы масштабирования"
    before = retriever.embedder.n_texts
    assert retriever.rank(query, 5, "hybrid") == [
        (cid, pytest.approx(1 / (retriever.rrf_k + r)))
        for r, (cid, _) in enumerate(retriever.rank(query, 5, "bm25"), 1)
    ]
    assert retriever.embedder.n_texts == before


def test_mmr_removes_near_duplicates(retriever):
    query = "how glaciers form from snow and carve valleys"
    plain = retriever.search(query, k=3, mode="dense")
    assert all(h.text.startswith(DUPLICATE[:40]) for h in plain)  # three near-identical chunks
    diverse = retriever.search(query, k=3, mode="dense", mmr_lambda=0.3)
    assert diverse[0].chunk_id == plain[0].chunk_id  # the most relevant chunk always comes first
    assert sum(h.text.startswith(DUPLICATE[:40]) for h in diverse) == 1


def test_bad_arguments(retriever):
    with pytest.raises(ValueError, match="unknown mode"):
        retriever.search("bread", mode="sparse")
    with pytest.raises(ValueError, match="empty"):
        retriever.search("   ")
    with pytest.raises(ValueError, match="k must be"):
        retriever.search("bread", k=0)


def test_retriever_with_explicit_store(index):
    settings, _ = index
    store = Store(settings.index_dir, embedding_model=settings.embedding_model, readonly=True)
    hits = Retriever(store, get_embedder(settings.embedding_model), rrf_k=1, depth=3).search("bread", k=2)
    assert len(hits) == 2 and Path(hits[0].path).name == "sourdough.md"
    store.close()
