"""Retrieval evaluation on BEIR data and on SQuAD paragraphs (the reader's is rag.eval_reader).

The retrieval metrics follow trec_eval conventions exactly (linear gains, log2 discount, ties broken
by doc id descending; checked against pytrec_eval in tests) so our numbers are comparable to
published BEIR tables. The answer metrics are the official SQuAD v1.1 ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rag.config import Settings
from rag.embed import get_embedder
from rag.ingest.job import ProgressEvent, ingest
from rag.reader_data import Squad, load_squad
from rag.retrieve import Retriever
from rag.store import Store

Qrels = dict[str, dict[str, int]]  # query id -> doc id -> graded relevance
Run = dict[str, dict[str, float]]  # query id -> doc id -> score (higher is better)

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def ranked(scores: dict[str, float]) -> list[str]:
    """Doc ids best first; ties by doc id descending, as trec_eval does."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def ndcg_at_k(ranking: list[str], rels: dict[str, int], k: int = 10) -> float:
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: list[str], rels: dict[str, int], k: int = 100) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: list[str], rels: dict[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant doc within the top k (0 if none)."""
    for i, d in enumerate(ranking[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over every judged query; a query missing from run scores 0."""
    if not qrels:
        raise ValueError("no judged queries to evaluate")
    totals = dict.fromkeys(METRICS, 0.0)
    for qid, rels in qrels.items():
        ranking = ranked(run.get(qid, {}))
        totals["ndcg@10"] += ndcg_at_k(ranking, rels, 10)
        totals["recall@100"] += recall_at_k(ranking, rels, 100)
        totals["mrr@10"] += mrr_at_k(ranking, rels, 10)
    return {m: v / len(qrels) for m, v in totals.items()}


@dataclass
class BeirData:
    corpus: dict[str, tuple[str, str]]  # doc id -> (title, text)
    queries: dict[str, str]  # only the queries judged in the split
    qrels: Qrels


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"BEIR file not found: {path}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_qrels(path: Path) -> Qrels:
    """BEIR qrels TSV: header `query-id corpus-id score`, then one judgement per line."""
    if not path.is_file():
        raise FileNotFoundError(f"BEIR qrels not found: {path}")
    qrels: Qrels = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected 3 tab-separated fields, got {len(parts)}")
        qid, did, score = parts
        qrels.setdefault(qid, {})[did] = int(score)
    return qrels


SPLIT_PREFERENCE = ("test", "dev", "train")  # BEIR datasets often ship only some of these


def pick_split(root: Path, split: str | None = None) -> str:
    """`split` if root/qrels has it, else (split None) the first of test, dev, train that it has.

    Public copies of BEIR sets are often trimmed (the shared SciFact has only train qrels), so a
    fixed default would fail; a wrong explicit split is an error that lists the splits there are.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"BEIR folder not found: {root}")
    available = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
    listed = ", ".join(available) or "none"
    if split is None:
        split = next((s for s in SPLIT_PREFERENCE if s in available), None)
        if split is None:
            raise FileNotFoundError(
                f"BEIR qrels not found: {root / 'qrels'} has none of {', '.join(SPLIT_PREFERENCE)} "
                f"(available splits: {listed})"
            )
    elif split not in available:
        raise FileNotFoundError(
            f"BEIR qrels not found: {root / 'qrels' / f'{split}.tsv'} (available splits: {listed})"
        )
    return split


def load_beir(root: Path, split: str, limit_queries: int | None = None) -> BeirData:
    """Read corpus.jsonl, queries.jsonl and qrels/<split>.tsv; keep judged queries (first N if limited)."""
    qrels = read_qrels(root / "qrels" / f"{split}.tsv")
    try:
        rows = _read_jsonl(root / "corpus.jsonl")
        corpus = {str(r["_id"]): (r.get("title") or "", r.get("text") or "") for r in rows}
        all_queries = {str(r["_id"]): r["text"] for r in _read_jsonl(root / "queries.jsonl")}
    except (KeyError, TypeError, AttributeError) as exc:  # a row that is not {"_id", "text", ...}
        raise ValueError(f"{root}: malformed BEIR row (missing or bad field {exc})") from None
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise ValueError(f"{len(missing)} judged queries are missing from queries.jsonl (e.g. {missing[0]})")
    qids = sorted(qrels, key=lambda q: (len(q), q))[:limit_queries]
    return BeirData(corpus, {q: all_queries[q] for q in qids}, {q: qrels[q] for q in qids})


# ------------------------------------------------------------------------------------ BEIR runner
# The corpus goes through the real pipeline (files -> loader -> chunker -> embedder -> Store) so the
# numbers measure what users get. One Markdown file per BEIR doc: "# title" becomes the document
# title and stays part of the indexed text, as titles do in real documents.

EVAL_MODES = ("dense", "bm25", "hybrid")
EVAL_DEPTH = 300  # chunks per query: enough for 100 distinct documents at ~2 chunks per abstract


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rag"


def _corpus_key(root: Path) -> str:
    digest = hashlib.sha256((root / "corpus.jsonl").read_bytes()).hexdigest()[:12]
    return f"{root.resolve().name}-{digest}"


def _file_stem(doc_id: str) -> str:
    """Doc ids become file names; anything unsafe in a name (or hidden, like ".5") is hashed instead."""
    return (
        doc_id
        if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", doc_id)
        else hashlib.sha1(doc_id.encode()).hexdigest()
    )


def write_corpus_files(corpus: dict[str, tuple[str, str]], folder: Path) -> dict[str, str]:
    """One `<id>.md` per doc (rewritten only if changed, so re-ingest is a no-op); returns stem -> id."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = {}
    for doc_id, (title, text) in corpus.items():
        stem = _file_stem(doc_id)
        stems[stem] = doc_id
        content = f"# {title}\n\n{text}\n" if title else f"{text}\n"
        path = folder / f"{stem}.md"
        if not path.is_file() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
    return stems


def doc_run(
    retriever: Retriever,
    data: BeirData,
    stems: dict[str, str],
    mode: str,
    query_vecs: np.ndarray,
    show_progress: bool = False,
) -> Run:
    """Rank chunks, then score each BEIR doc by its best chunk (max over chunks)."""
    run: Run = {}
    queries = tqdm(data.queries.items(), desc=f"{mode:>6} queries", disable=not show_progress)
    for (qid, query), vec in zip(queries, query_vecs, strict=True):
        scores: dict[str, float] = {}
        for hit in retriever.store.hits(retriever.rank(query, EVAL_DEPTH, mode, query_vec=vec)):
            doc_id = stems.get(Path(hit.path).stem)
            if doc_id is not None and hit.score > scores.get(doc_id, float("-inf")):
                scores[doc_id] = hit.score
        run[qid] = {d: scores[d] for d in ranked(scores)[:100]}
    return run


def run_beir(
    root: Path,
    split: str | None,
    settings: Settings,
    *,
    index_dir: Path | None = None,
    limit_queries: int | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    show_progress: bool = False,
) -> dict:
    """Ingest a BEIR corpus (incrementally) and score dense, bm25 and hybrid retrieval on one split.

    split None picks one (see pick_split); the result says which under "split".
    """
    split = pick_split(root, split)
    data = load_beir(root, split, limit_queries)
    key = _corpus_key(root)
    docs_dir = cache_dir() / "beir" / key / "docs"
    if index_dir is None:
        model = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.embedding_model)[-40:]
        s = settings
        chunking = f"{s.chunk_chars}c{s.chunk_overlap_chars}-{s.chunk_tokens}-{s.chunk_overlap}"
        index_dir = cache_dir() / "beir" / key / f"index-{model}-{chunking}"
    stems = write_corpus_files(data.corpus, docs_dir)
    settings = settings.model_copy(update={"index_dir": index_dir})
    report = ingest([docs_dir], settings, prune=True, on_progress=on_progress)

    store = Store(index_dir, embedding_model=settings.embedding_model, readonly=True)
    embedder = get_embedder(settings.embedding_model, settings.device)
    retriever = Retriever(store, embedder)
    query_vecs = embedder.encode(list(data.queries.values()))
    result: dict = {
        mode: evaluate(doc_run(retriever, data, stems, mode, query_vecs, show_progress), data.qrels)
        for mode in EVAL_MODES
    }
    stats = store.stats()
    store.close()
    result |= {
        "split": split,
        "queries": len(data.queries),
        "documents": len(data.corpus),
        "chunks": stats.get("chunks"),
        "index": str(index_dir),
        "ingest": report.to_dict(),
    }
    return result


# ------------------------------------------------------------------------------------ SQuAD paragraphs
# Paragraph retrieval: every paragraph of a SQuAD-format file (SQuAD, XQuAD in any language) is one
# .txt file ingested through the normal pipeline; each question should find its own paragraph.

SQUAD_DEPTH = 100  # chunks per query: paragraphs are one or two chunks, so well over 10 paragraphs


def squad_corpus(squad: Squad) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(file stem -> paragraph text, [(question, stem of its paragraph)])."""
    docs = {
        f"a{a:04d}-p{p:04d}": text for a, paras in enumerate(squad.contexts) for p, text in enumerate(paras)
    }
    queries = [(q.question, f"a{q.article:04d}-p{q.paragraph:04d}") for q in squad.questions]
    return docs, queries


def doc_ranking(retriever: Retriever, query: str, mode: str, vec: np.ndarray, depth: int) -> list[str]:
    """File stems in the order of their best chunk."""
    hits = retriever.store.hits(retriever.rank(query, depth, mode, query_vec=vec))
    return list(dict.fromkeys(Path(h.path).stem for h in hits))


def rank_of(ranking: list[str], gold: str) -> int | None:
    """1-based rank of `gold`, None when it was not retrieved."""
    return ranking.index(gold) + 1 if gold in ranking else None


def hit_metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    """hit@1, hit@5 and mrr@10 of one gold item per query."""
    if not ranks:
        raise ValueError("no queries to evaluate")
    n = len(ranks)
    return {
        "hit@1": sum(r == 1 for r in ranks) / n,
        "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
        "mrr@10": sum(1.0 / r for r in ranks if r is not None and r <= 10) / n,
    }


def fusion_shares(ranks: dict[str, list[int | None]]) -> dict[str, float]:
    """Share of queries where hybrid put the gold below / above the better of dense and BM25."""

    def pos(r: int | None) -> float:
        return math.inf if r is None else r

    triples = list(zip(ranks["dense"], ranks["bm25"], ranks["hybrid"], strict=True))
    below = sum(pos(h) > min(pos(d), pos(b)) for d, b, h in triples)
    above = sum(pos(h) < min(pos(d), pos(b)) for d, b, h in triples)
    return {"fusion_below_best": below / len(triples), "fusion_above_best": above / len(triples)}


def run_squad(
    path: Path,
    settings: Settings,
    *,
    index_dir: Path | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    show_progress: bool = False,
) -> dict:
    """Ingest every paragraph of a SQuAD-format file into an index (a temporary one unless
    `index_dir`) and score each mode by the rank of each question's own paragraph."""
    squad = load_squad(path)
    docs, queries = squad_corpus(squad)
    with tempfile.TemporaryDirectory(prefix="rag-squad-") as tmp:
        docs_dir = Path(tmp) / "docs" if index_dir is None else Path(f"{index_dir}-docs")
        docs_dir.mkdir(parents=True, exist_ok=True)
        for stem, text in docs.items():
            file = docs_dir / f"{stem}.txt"
            if not file.is_file() or file.read_text(encoding="utf-8") != text:
                file.write_text(text, encoding="utf-8")
        settings = settings.model_copy(update={"index_dir": index_dir or Path(tmp) / "index"})
        report = ingest([docs_dir], settings, prune=True, on_progress=on_progress)
        with Store(settings.index_dir, embedding_model=settings.embedding_model, readonly=True) as store:
            embedder = get_embedder(settings.embedding_model, settings.device)
            retriever = Retriever(store, embedder)
            vecs = embedder.encode([q for q, _ in queries])
            ranks: dict[str, list[int | None]] = {mode: [] for mode in EVAL_MODES}
            for mode in EVAL_MODES:
                bar = tqdm(queries, desc=f"{mode:>6} queries", disable=not show_progress)
                for (query, gold), vec in zip(bar, vecs, strict=True):
                    ranks[mode].append(rank_of(doc_ranking(retriever, query, mode, vec, SQUAD_DEPTH), gold))
            chunks = store.stats()["chunks"]
    return {
        **{mode: hit_metrics(ranks[mode]) for mode in EVAL_MODES},
        **fusion_shares(ranks),
        "queries": len(queries),
        "paragraphs": len(docs),
        "chunks": chunks,
        "squad": str(path),
        "index": str(index_dir) if index_dir else None,
        "ingest": report.to_dict(),
    }
