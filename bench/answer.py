"""`rag bench answer`: latency of one cited answer over k retrieved sources, with and without the KV cache.

An index of SQuAD dev paragraphs (the shared data; built once under .bench/answer-index) answers
dev questions through the real pipeline: hybrid retrieval of k chunks, one prompt per source,
prefill, grounded decoding, citation check. Each question is answered twice, with the KV cache
(the engine's default) and without it (every answer step recomputes the whole sequence), in
alternating order so drift on a shared machine hits both; the ratio of their medians is what the
cache buys. Parts are reported as p50 / p95 over the questions.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rag.answer import Reader, hit_to_source
from rag.citations import parse_citations
from rag.config import Settings, get_settings, shared_data_dir
from rag.embed import get_embedder
from rag.eval import squad_corpus
from rag.ingest.job import ingest
from rag.reader_data import load_squad, select_questions
from rag.retrieve import Retriever
from rag.store import Store

INDEX_DIR = Path(".bench") / "answer-index"
PARAGRAPHS = 600  # a realistic few-hundred-document corpus; questions come from these paragraphs


def build_index(settings: Settings, squad_path: Path, paragraphs: int) -> tuple[Path, list[str]]:
    """Ingest the first `paragraphs` dev paragraphs (once; incremental afterwards); their questions."""
    squad = load_squad(squad_path)
    docs, queries = squad_corpus(squad)
    keep = dict(list(docs.items())[:paragraphs])
    folder = INDEX_DIR.with_name("answer-docs")
    folder.mkdir(parents=True, exist_ok=True)
    for stem, text in keep.items():
        path = folder / f"{stem}.txt"
        if not path.is_file():
            path.write_text(text, encoding="utf-8")
    ingest([folder], settings.model_copy(update={"index_dir": INDEX_DIR}), prune=True)
    return INDEX_DIR, [q for q, stem in queries if stem in keep]


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
    }


def run(
    model_dir: Path | None = None,
    questions: int = 40,
    k: int = 5,
    paragraphs: int = PARAGRAPHS,
    progress=print,
) -> dict:
    settings = get_settings()
    model_dir = model_dir or settings.model_dir
    reader = Reader.load(model_dir)
    if reader.source_reader is None:
        raise ValueError(
            f"{model_dir} is not a warm-started (copy-head) reader; this benchmark times that path"
        )
    progress(f"building the index of {paragraphs} SQuAD dev paragraphs (once)")
    index_dir, all_questions = build_index(
        settings, shared_data_dir() / "squad" / "dev-v1.1-part-a.json", paragraphs
    )
    picked = [all_questions[i] for i in select_questions(len(all_questions), questions, seed=0)]
    parts: dict[str, dict[str, list[float]]] = {"cache": {}, "no_cache": {}}
    with Store(index_dir, embedding_model=settings.embedding_model, readonly=True) as store:
        retriever = Retriever(store, get_embedder(settings.embedding_model, settings.device))
        retriever.search(picked[0], k)  # warm-up: model load, first BM25 / FAISS touch
        reader.answer_sources(picked[0], [hit_to_source(h) for h in retriever.search(picked[0], k)])
        for i, question in enumerate(picked):
            order = ("cache", "no_cache") if i % 2 == 0 else ("no_cache", "cache")
            for kind in order:
                t0 = time.perf_counter()
                hits = retriever.search(question, k)
                t1 = time.perf_counter()
                prompts = reader.source_prompts(question, [hit_to_source(h) for h in hits])
                timings: dict[str, float] = {}
                reads = reader.source_reader.read(prompts, use_cache=kind == "cache", timings=timings)
                best = reader.choose(reads)
                t2 = time.perf_counter()
                text = "" if best is None else f"{reader.tokenizer.decode(best.token_ids)} [{best.row + 1}]"
                parse_citations(text, [p.source for p in prompts])
                t3 = time.perf_counter()
                row = {
                    "retrieve_ms": (t1 - t0) * 1000,
                    "prefill_ms": timings["prefill_ms"],
                    "decode_ms": timings["decode_ms"],
                    "cite_ms": (t3 - t2) * 1000,
                    "total_ms": (t3 - t0) * 1000,
                }
                for key, value in row.items():
                    parts[kind].setdefault(key, []).append(value)
            if (i + 1) % 10 == 0:
                progress(f"{i + 1}/{len(picked)} questions")
    summary = {kind: {key: _percentiles(v) for key, v in values.items()} for kind, values in parts.items()}
    return {
        "model": str(model_dir),
        "questions": len(picked),
        "k": k,
        "paragraphs": paragraphs,
        **summary,
        "cache_speedup_p50": round(
            summary["no_cache"]["total_ms"]["p50"] / summary["cache"]["total_ms"]["p50"], 2
        ),
        "decode_speedup_p50": round(
            summary["no_cache"]["decode_ms"]["p50"] / max(summary["cache"]["decode_ms"]["p50"], 1e-3), 2
        ),
    }
