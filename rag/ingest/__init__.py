"""Ingest: files -> Documents (loaders) -> Chunks (chunker); the ingest job wires them to the store."""

from rag.ingest.chunker import Chunker
from rag.ingest.loaders import SUPPORTED_SUFFIXES, SkipFile, load_document, read_text_file

__all__ = ["SUPPORTED_SUFFIXES", "Chunker", "SkipFile", "load_document", "read_text_file"]
