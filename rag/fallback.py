"""Search instead of an answer when no reader model can answer: the passages that match the
question, in the shape of an answer (`answer` is null), with the reason.

`rag ask` and `POST /v1/ask` return this rather than an error, so a fresh install without a
trained reader still finds things, and a front end shows the passages with the same code that
shows an answer's sources.
"""

from __future__ import annotations

import dataclasses
import time

from rag.answer import hit_to_source
from rag.retrieve import Retriever

FINISH_REASON = "reader_unavailable"


def search_only(
    question: str, retriever: Retriever, reason: str, *, k: int = 5, mode: str = "hybrid"
) -> dict:
    """The top-k passages for `question` as an answer's `sources` (numbered from 1, each with its
    retrieval `score`), `answer: None`, and `reader_unavailable`: why no reader answered."""
    question = question.strip()
    start = time.perf_counter()
    hits = retriever.search(question, k, mode)  # bad input (empty question, unknown mode) raises here
    retrieve_ms = round((time.perf_counter() - start) * 1000, 3)
    sources = [
        {**dataclasses.replace(hit_to_source(hit), n=n).to_dict(), "score": hit.score}
        for n, hit in enumerate(hits, start=1)
    ]
    return {
        "question": question,
        "answer": None,
        "abstained": False,
        "citations": [],
        "sources": sources,
        "finish_reason": FINISH_REASON,
        "reader_unavailable": reason,
        "timings": {"retrieve_ms": retrieve_ms},
    }
