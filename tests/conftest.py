"""Shared fixtures: the public data folder and the real embedding model (loaded once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`RAG_SHARED_DATA` or `../shared/data`; tests needing it skip with a clear reason otherwise."""
    path = Path(os.environ.get("RAG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set RAG_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def embedder():
    """The real bundled all-MiniLM-L6-v2 on CPU, loaded once per session (a few seconds)."""
    from rag.embed import get_embedder

    return get_embedder()
