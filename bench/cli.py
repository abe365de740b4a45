"""`rag bench ...` commands; each benchmark lives in its own module of this package."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


# ---- ingest / search / memory (foundation benchmarks) -------------------------------------------


def _show(title: str, result: dict, as_json: bool) -> None:
    """One JSON value on stdout, or one table per list of rows plus the scalar fields."""
    import json

    from rich.console import Console
    from rich.table import Table

    if as_json:
        print(json.dumps(result, indent=1))
        return
    console = Console()
    console.print(f"[bold]{title}[/bold]")
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            table = Table(title=key)
            for col in value[0]:
                table.add_column(col)
            for row in value:
                table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
            console.print(table)
        else:
            console.print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")


@app.command("memory")
def memory_cmd(
    files: int = typer.Option(10_000, min=0, help="Small text files (one short paragraph each); 0 skips."),
    pages: int = typer.Option(1_000, min=0, help="Pages of the generated PDF; 0 skips."),
    baseline: bool = typer.Option(True, help="Also measure embedding the same chunks without ingest."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON value instead of tables."),
) -> None:
    """Peak RSS of ingest (in a subprocess) at 1/10 and full corpus size vs RSS after model load."""
    from rich.console import Console

    from bench.memory import run

    with Console(stderr=True).status(f"ingesting {files} files and a {pages}-page PDF in subprocesses"):
        rows = run(files, pages, baseline)
    _show("Peak memory of ingest", {"runs": rows}, as_json)


# ---- language model (decoding speed, length extrapolation, scaling) -----------------------------


def _run_lm_bench(title: str, as_json: bool, threads: int, fn, **kwargs) -> None:
    """Run fn with few torch threads (spinning OpenMP workers make timings noisier on a shared CPU),
    progress on stderr, bad input as one line and exit 1, then print the result."""
    import torch
    from rich.console import Console

    torch.set_num_threads(threads)
    console = Console(stderr=True, quiet=as_json)
    try:
        result = fn(progress=console.print, **kwargs)
    except ValueError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    _show(title, result, as_json)


THREADS_HELP = "torch threads (the CPU is shared; 1 keeps timings steady)."
JSON_HELP = "Print one JSON value instead of tables."


@app.command("llm")
def llm_cmd(
    model: str = typer.Option("default", help="ModelConfig preset to time (default or tiny)."),
    new_tokens: int = typer.Option(8, min=1, help="Timed decode steps per measurement (median)."),
    threads: int = typer.Option(1, min=1, help=THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """KV-cache speedup, sliding window vs full attention, on CUDA train MFU and compiled decode."""
    from bench.llm import run_llm_bench

    _run_lm_bench(
        "Language model: decoding speed", as_json, threads, run_llm_bench, model=model, new_tokens=new_tokens
    )


@app.command("extrapolation")
def extrapolation_cmd(
    tokens: int = typer.Option(250_000, min=10_000, help="Training tokens per model."),
    threads: int = typer.Option(1, min=1, help=THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Perplexity at 256/512/1024 tokens of small models trained at 256, one per position scheme."""
    from bench.llm import run_extrapolation

    _run_lm_bench(
        "Length extrapolation: perplexity, trained at 256 tokens",
        as_json,
        threads,
        run_extrapolation,
        tokens=tokens,
    )


@app.command("scaling")
def scaling_cmd(
    tokens: int = typer.Option(
        600_000, min=10_000, help="Training tokens per model, the same for all (without --data)."
    ),
    data: bool = typer.Option(
        False, "--data", help="Grid over sizes x token budgets; fit L(N, D) = E + A/N^alpha + B/D^beta."
    ),
    budgets: str | None = typer.Option(
        None, help="With --data: token budgets, comma-separated (default 200000,400000,800000,1600000)."
    ),
    plot: str | None = typer.Option(
        None, help="Where to save the PNG (default docs/img/scaling.png, with --data scaling-data.png)."
    ),
    threads: int = typer.Option(1, min=1, help=THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train 5 model sizes on the same tokens and fit loss = a * N^-alpha + c (plot saved as PNG);
    with --data, 4 sizes x 4 token budgets, the Chinchilla fit and the compute-optimal frontier."""
    from bench.scaling import run_data_scaling, run_scaling

    if not data:
        _run_lm_bench(
            "Scaling: val loss vs non-embedding parameters",
            as_json,
            threads,
            run_scaling,
            plot_path=plot or "docs/img/scaling.png",
            tokens=tokens,
        )
        return
    grid = {}
    if budgets is not None:
        try:
            grid["budgets"] = tuple(int(b.replace("_", "")) for b in budgets.split(",") if b.strip())
        except ValueError:
            typer.echo(f"Error: --budgets wants comma-separated integers, got {budgets!r}", err=True)
            raise typer.Exit(1) from None
    _run_lm_bench(
        "Scaling with data: L(N, D) over a grid of sizes and token budgets",
        as_json,
        threads,
        run_data_scaling,
        plot_path=plot or "docs/img/scaling-data.png",
        **grid,
    )


@app.command("ingest")
def ingest_cmd(
    files: int = typer.Option(200, min=1, help="Generated text files (Gutenberg prose)."),
    words: int = typer.Option(400, min=10, help="Words per generated file."),
    rounds: int = typer.Option(2, min=1, help="Rounds of (embed-only, ingest), order alternating."),
    folder: Path | None = typer.Option(None, help="Ingest this folder instead of generated files."),
    profile: bool = typer.Option(False, help="Also run ingest once under cProfile; list the top functions."),
    threads: int = typer.Option(2, min=1, help="Torch threads."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON value instead of tables."),
) -> None:
    """Ingest chunks/s vs the bare embedder's chunks/s on the same chunks (target ratio >= 0.9)."""
    from bench.ingest import run

    result = run(files, words, rounds, folder, profile, threads)
    _show("Ingest throughput vs embedder", result, as_json)


@app.command("search")
def search_cmd(
    chunks: int = typer.Option(100_000, min=1, help="Chunks in the benchmark index (built once, cached)."),
    queries: int = typer.Option(200, min=1, help="Timed queries (SQuAD dev questions)."),
    k: int = typer.Option(5, min=1, help="Results per query."),
    threads: int = typer.Option(1, min=1, help="Torch and FAISS threads (2 is slower for one query)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON value instead of tables."),
) -> None:
    """Dense / BM25 / hybrid latency p50/p95 vs a raw FAISS search on the same index."""
    from bench.search import run

    _show("Search latency", run(chunks, queries, k, threads=threads), as_json)


@app.command("scale")
def scale_cmd(
    chunks: int = typer.Option(1_000_000, min=300, help="Chunks of the large index (built once, cached)."),
    base_chunks: int = typer.Option(100_000, min=300, help="Chunks of the base index (built once, cached)."),
    queries: int = typer.Option(200, min=1, help="Timed queries (SQuAD) and recall queries (mixture)."),
    clusters: int = typer.Option(256, min=1, help="Clusters of the Gaussian-mixture stand-in vectors."),
    threads: int = typer.Option(1, min=1, help="Torch and FAISS threads."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON value instead of tables."),
) -> None:
    """Flat vs approximate vector index at base and N chunks: recall@10, hybrid p50/p95, build
    time, RSS, bytes per vector; time to add 10 files at N. Vectors are a stated stand-in."""
    from bench.scale import run

    result = run(chunks, base_chunks, queries, clusters=clusters, threads=threads)
    _show("Index at scale: flat vs approximate", result, as_json)


@app.command("answer")
def answer_cmd(
    model: Path | None = typer.Option(
        None, help="Reader checkpoint (default: RAG_MODEL_DIR or models/reader)."
    ),
    questions: int = typer.Option(40, min=2, help="SQuAD dev questions timed (each with and without cache)."),
    k: int = typer.Option(5, min=1, max=20, help="Sources retrieved per answer."),
    threads: int = typer.Option(2, min=1, help="Torch threads (answers use both cores)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """p50/p95 of one cited answer over k sources (retrieve, prefill, decode, cite), KV cache vs none."""
    from bench.answer import run

    _run_lm_bench("Answer latency", as_json, threads, run, model_dir=model, questions=questions, k=k)


@app.command("api")
def api_cmd(
    index: Path | None = typer.Option(None, help="Serve this index (default: a generated one of --chunks)."),
    model: Path | None = typer.Option(None, help="Reader checkpoint (default: RAG_MODEL_DIR)."),
    chunks: int = typer.Option(10_000, min=100, help="Chunks of the generated index."),
    search_clients: int = typer.Option(16, min=1, help="Clients searching at once."),
    searches: int = typer.Option(100, min=5, help="Searches per client."),
    answer_clients: int = typer.Option(4, min=1, help="Clients asking for answers at once."),
    answers: int = typer.Option(10, min=1, help="Answers per client."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Load on a real server: errors, p50/p95 and throughput of searches and answers, peak RSS."""
    from rich.console import Console

    from bench.api import run

    console = Console(stderr=True, quiet=as_json)
    result = run(
        index, model, chunks, search_clients, searches, answer_clients, answers, progress=console.print
    )
    _show("API under load", result, as_json)


@app.command("embed")
def embed_cmd(
    passages: int = typer.Option(192, min=1, help="Gutenberg passages, embedded in batches (ingest path)."),
    words: int = typer.Option(120, min=10, help="Words per passage."),
    queries: int = typer.Option(192, min=1, help="SQuAD dev questions, embedded one at a time (query path)."),
    rounds: int = typer.Option(2, min=1, help="Rounds over all backends, order alternating."),
    threads: int = typer.Option(1, min=1, help="Torch and ONNX Runtime threads."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON value instead of tables."),
) -> None:
    """Embedding texts/s: sentence-transformers vs ONNX Runtime variants (plain, fused, int8) on the
    same texts, ratios to torch in the same run and each variant's minimum cosine to torch."""
    from bench.embed import run

    _show(
        "Embedding throughput: torch vs ONNX Runtime", run(passages, words, queries, rounds, threads), as_json
    )
