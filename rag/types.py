"""Plain data passed between ingest, store, retrieval and answering."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Page:
    """Text of one page (PDF) or of the whole file (other formats: page 1)."""

    number: int
    text: str


@dataclass
class Document:
    path: str
    title: str
    pages: list[Page] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """A span of one page: `page.text[start:end] == text` (offsets are per page)."""

    page: int
    start: int
    end: int
    text: str


@dataclass
class Hit:
    """One retrieval result, enough to cite: document, page and character span."""

    chunk_id: int
    doc_id: int
    path: str
    title: str
    page: int
    start: int
    end: int
    text: str
    score: float

    def to_dict(self) -> dict:
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "path": self.path,
            "title": self.title,
            "page": self.page,
            "start": self.start,
            "end": self.end,
            "score": self.score,
            "text": self.text,
        }
