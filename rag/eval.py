"""Retrieval evaluation: IR metrics (checked against pytrec_eval in tests) and BEIR-format data.

The metrics follow trec_eval conventions exactly (linear gains, log2 discount, ties broken by
doc id descending) so our numbers are comparable to published BEIR tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

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


def load_beir(root: Path, split: str, limit_queries: int | None = None) -> BeirData:
    """Read corpus.jsonl, queries.jsonl and qrels/<split>.tsv; keep judged queries (first N if limited)."""
    qrels = read_qrels(root / "qrels" / f"{split}.tsv")
    rows = _read_jsonl(root / "corpus.jsonl")
    corpus = {str(r["_id"]): (r.get("title") or "", r.get("text") or "") for r in rows}
    all_queries = {str(r["_id"]): r["text"] for r in _read_jsonl(root / "queries.jsonl")}
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise ValueError(f"{len(missing)} judged queries are missing from queries.jsonl (e.g. {missing[0]})")
    qids = sorted(qrels, key=lambda q: (len(q), q))[:limit_queries]
    return BeirData(corpus, {q: all_queries[q] for q in qids}, {q: qrels[q] for q in qids})
