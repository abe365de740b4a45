"""A tiny real corpus and index shared by the API and UI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.config import Settings
from rag.ingest.job import ingest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs").mkdir()
    (root / "docs" / "zebra.md").write_text(
        "# Zebras\n\nZebras are African equines with distinctive black-and-white striped coats.\n"
    )
    (root / "docs" / "faiss.txt").write_text("FAISS is a library for similarity search of vectors.\n")
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("This file lies outside the allowed ingest roots.\n")
    ingest([root / "docs"], Settings(index_dir=root / "index"))
    return root
