"""Realistic benchmark inputs built from the public shared data (never committed, cached under .bench/).

Gutenberg prose gives texts with real word and sentence statistics (chunking, BM25 postings and
tokenization cost all depend on them); SQuAD dev questions give real user-like queries.
"""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

from rag.config import shared_data_dir

BENCH_DIR = Path(".bench")  # git-ignored cache of generated corpora and indexes
DONE = ".complete"  # marker written last: a folder without it was interrupted and is rebuilt


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: set RAG_SHARED_DATA to the shared data folder")
    return path


def gutenberg_paragraphs(min_words: int = 20) -> Iterator[str]:
    """Paragraphs of the Gutenberg corpus, whitespace collapsed; headings and short lines dropped."""
    path = _require(shared_data_dir() / "lm" / "gutenberg-en.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line.strip())
                continue
            if para and sum(len(p.split()) for p in para) >= min_words:
                yield " ".join(para)
            para = []


def passages(n: int, words: int) -> list[str]:
    """`n` passages of about `words` words (whole paragraphs joined, long ones cut at `words`).

    The corpus is cycled if `n * words` exceeds it (11.8 M words), so large n repeat texts.
    """
    out: list[str] = []
    buf: list[str] = []
    for para in _cycled_paragraphs():
        buf.extend(para.split())
        while len(buf) >= words:
            out.append(" ".join(buf[:words]))
            buf = buf[words:]
            if len(out) == n:
                return out
        if len(buf) > words // 2:  # start the next passage at a paragraph start
            out.append(" ".join(buf))
            buf = []
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the paragraph stream is infinite")


def _cycled_paragraphs() -> Iterator[str]:
    while True:
        yield from gutenberg_paragraphs()


def squad_questions(n: int) -> list[str]:
    """The first `n` SQuAD v1.1 dev questions: natural-language queries, stop words included."""
    path = _require(shared_data_dir() / "squad" / "dev-v1.1-part-a.json")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    qs = (qa["question"] for art in data for p in art["paragraphs"] for qa in p["qas"])
    return list(itertools.islice(qs, n))


def cached_dir(folder: Path) -> bool:
    """True if `folder` was fully generated before; otherwise it is wiped for a fresh build."""
    if (folder / DONE).exists():
        return True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return False


def text_folder(folder: Path, n_files: int, words: int) -> Path:
    """`n_files` .txt files of one `words`-word passage each (cached)."""
    if not cached_dir(folder):
        for i, text in enumerate(passages(n_files, words)):
            (folder / f"doc{i:06d}.txt").write_text(text + "\n", encoding="utf-8")
        (folder / DONE).touch()
    return folder


def pdf_file(path: Path, n_pages: int, words_per_page: int) -> Path:
    """A PDF of `n_pages` pages of prose (reportlab), cached next to a completion marker."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    marker = path.with_suffix(".complete")
    if marker.exists() and path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf = canvas.Canvas(str(path), pagesize=A4)
    _, height = A4
    for text in passages(n_pages, words_per_page):
        obj = pdf.beginText(50, height - 60)
        obj.setFont("Helvetica", 10)
        for line in textwrap.wrap(text, 100):
            obj.textLine(line)
        pdf.drawText(obj)
        pdf.showPage()
    pdf.save()
    marker.touch()
    return path
