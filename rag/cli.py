"""`rag` command line: a thin layer over the library; the REST API calls the same functions."""

from __future__ import annotations

import typer

from bench.cli import app as bench_app
from rag.llm.cli import app as llm_app

app = typer.Typer(help="Self-hosted RAG: ingest folders, search them, answer with our own LLM.", no_args_is_help=True)
app.add_typer(llm_app, name="train", help="Train the decoder LLM: tokenizer, pretraining, SFT, DPO.")
app.add_typer(bench_app, name="bench", help="Benchmarks (speed and memory, printed as ratios).")

if __name__ == "__main__":
    app()
