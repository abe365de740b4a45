"""`rag` command line: a thin layer over the library; the REST API calls the same functions.

Every command takes `--index DIR` and `--json`. With `--json`, stdout carries exactly one JSON
value (progress goes to stderr or is hidden) so scripts can pipe it; user errors exit with code 1
and a one-line message, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.cli import app as bench_app
from rag.answer import DEFAULT_MAX_NEW_TOKENS, Answer, Reader, ReaderUnavailable, ask_stream, drain
from rag.config import Settings, get_settings
from rag.embed import get_embedder
from rag.eval import pick_split, run_beir, run_squad
from rag.eval_reader import evaluate_reader, evaluate_reader_open, save_reader_calibration
from rag.fallback import search_only
from rag.ingest.chunker import chunking_id
from rag.ingest.job import IngestReport, ProgressEvent, ingest
from rag.llm.cli import app as llm_app
from rag.reader_data import DEFAULT_ABSTAIN, DEFAULT_BATCH_SIZE, DEFAULT_SOURCES
from rag.retrieve import Retriever
from rag.store import Store, StoreError


class UserError(Exception):
    """Bad input detected by the CLI itself (e.g. an unknown document)."""


# What bad input, a missing file or a missing index raise; anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, StoreError, OSError, ValueError)
err_console = Console(stderr=True)


def report_error(exc: BaseException) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


class Rag(typer.Typer):
    """The `rag` app: a user error that escapes any command (`rag train ...` and `rag bench ...`
    included) is one line on stderr and exit code 1, never a Python traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except USER_ERRORS as exc:
            report_error(exc)
            raise SystemExit(1) from None


app = Rag(help="Self-hosted RAG: ingest folders, search them, answer with our own LLM.", no_args_is_help=True)
app.add_typer(llm_app, name="train", help="Train the LLM: tokenizer, pretraining, SFT, DPO, reward, PPO.")
app.add_typer(bench_app, name="bench", help="Benchmarks (speed and memory, printed as ratios).")
eval_app = typer.Typer(no_args_is_help=True)
app.add_typer(eval_app, name="eval", help="Evaluate retrieval and reader quality on public benchmarks.")
index_app = typer.Typer(no_args_is_help=True)
app.add_typer(index_app, name="index", help="Extra stores built over an ingested index (kNN-LM datastore).")

console = Console()

IndexOpt = Annotated[
    Path | None, typer.Option("--index", help="Index folder (default: RAG_INDEX_DIR or ./index).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON value on stdout instead of tables.")]


def user_errors(fn: Callable) -> Callable:
    """Turn expected failures (bad path, missing index, model mismatch) into a message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            report_error(exc)
            raise typer.Exit(1) from None

    return wrapper


def settings_for(index: Path | None) -> Settings:
    """The settings, with `--index` (made absolute, as Settings makes RAG_INDEX_DIR) if given."""
    settings = get_settings()
    return settings if index is None else settings.model_copy(update={"index_dir": index.absolute()})


def open_store(settings: Settings, readonly: bool = True, check_model: bool = True) -> Store:
    """Open an existing index; a missing one is an error (search must not create an empty index).

    Without check_model, `docs`/`stats`/`delete` work on an index built with any model.
    """
    model = settings.embedding_model if check_model else None
    return Store(settings.index_dir, embedding_model=model, readonly=readonly, create=False)


def read_store(index: Path | None, read: Callable[[Store], Any]) -> Any:
    """Listing needs no embedder, so it works on an index built with any model."""
    with open_store(settings_for(index), check_model=False) as store:
        return read(store)


def emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False, indent=2))


@contextmanager
def ingest_progress(enabled: bool) -> Iterator[Callable | None]:
    """A rich progress bar (files, chunks, chunks/s) fed by ingest's ProgressEvent callback."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files  {task.fields[chunks]} chunks  {task.fields[rate]:.1f} chunks/s"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[current]}", style="dim"),
        console=err_console,
    )
    task = progress.add_task("ingest", total=None, chunks=0, rate=0.0, current="")
    start: float | None = None  # chunks/s counts from the first file, not from the model load

    def on_progress(ev: ProgressEvent) -> None:
        nonlocal start
        if ev.stage:
            progress.update(task, current=f"{ev.stage}…")
            return
        start = start or time.perf_counter()
        rate = ev.chunks_done / max(time.perf_counter() - start, 1e-9)
        current = Path(ev.current_path).name if ev.current_path else ""
        if ev.file_chunks_total and ev.file_chunks_done < ev.file_chunks_total:  # a file in the making
            current += f" ({ev.file_chunks_done}/{ev.file_chunks_total} chunks)"
        progress.update(
            task,
            completed=ev.files_done,
            total=ev.files_total,
            chunks=ev.chunks_done,
            rate=rate,
            current=current,
        )

    with progress:
        yield on_progress


def run_ingest(paths: list[Path], settings: Settings, prune: bool, show_progress: bool) -> IngestReport:
    missing = [p for p in paths if not os.path.lexists(p)]  # a symlink loop is reported by ingest
    if missing:
        raise UserError(f"path not found: {', '.join(map(str, missing))}")
    with ingest_progress(show_progress) as on_progress:
        return ingest(paths, settings, prune=prune, on_progress=on_progress)


CHUNKING = "chunking"  # index setting: how its chunks were cut (chunking_id)


def chunking_note(settings: Settings, rebuild: bool) -> tuple[str | None, bool]:
    """Before an ingest: (a note when indexed files keep chunks cut under other settings, whether
    this run chunks every file the current way). --rebuild makes it so by forgetting content hashes.
    A BM25 analyzer change needs none of this: the store migrates BM25 by itself."""
    try:
        store = open_store(settings, readonly=False, check_model=False)
    except StoreError:
        return None, True  # a new index
    with store:
        if rebuild or not store.documents():
            store.forget_hashes()
            return None, True
        was, now = store.setting(CHUNKING), chunking_id(settings)
    if was == now:
        return None, True
    return (
        f"files indexed before keep their chunks ({was or 'from before chunk sizes in characters'}; "
        f"now: {now}); run `rag ingest --rebuild` to cut them again"
    ), False


@app.command("ingest")
@user_errors
def ingest_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to ingest (recursively).")],
    prune: Annotated[bool, typer.Option("--prune", help="Delete indexed documents missing on disk.")] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Chunk and embed every file again, changed or not.")
    ] = False,
    index: IndexOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add new or changed files to the index; unchanged files are skipped by content hash."""
    settings = settings_for(index)
    note, uniform = chunking_note(settings, rebuild)
    report = run_ingest(paths, settings, prune, show_progress=not as_json)
    if uniform:
        with open_store(settings, readonly=False, check_model=False) as store:
            store.set_setting(CHUNKING, chunking_id(settings))
    if as_json:
        return emit_json(report.to_dict() | {"note": note})
    if note:
        err_console.print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
    summary = (
        f"[green]{report.ingested}[/] ingested, {report.unchanged} unchanged, {report.chunks} chunks, "
        f"{len(report.skipped)} skipped"
    )
    if prune:
        summary += f", {report.deleted} deleted"
    console.print(f"{summary} in {report.seconds:.1f}s")
    if report.skipped:
        root, paths = relative_paths([path for path, _ in report.skipped])
        title = f"Skipped files in {escape(root)}" if root else "Skipped files"
        table = Table(title=title, title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for path, (_, reason) in zip(paths, report.skipped, strict=True):
            table.add_row(escape(path), escape(reason))
        console.print(table)


@app.command("search")
@user_errors
def search_cmd(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="hybrid (default), dense or bm25.")] = "hybrid",
    mmr: Annotated[
        float | None, typer.Option("--mmr", min=0.0, max=1.0, help="MMR lambda: lower = more diverse.")
    ] = None,
    index: IndexOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the chunks most relevant to QUERY."""
    settings = settings_for(index)
    with open_store(settings) as store:
        embedder = get_embedder(settings.embedding_model, settings.device)
        hits = Retriever(store, embedder).search(query, k, mode, mmr)
    if as_json:
        return emit_json([h.to_dict() for h in hits])
    print_passages([h.to_dict() for h in hits])


def print_passages(passages: list[dict]) -> None:
    """Ranked passages (search hits, or an answer's sources with their score) as `rag search` shows them."""
    if not passages:
        console.print("No results.")
    for rank, p in enumerate(passages, start=1):
        console.print(
            f"[bold]{rank}.[/] [cyan]{escape(p['title'])}[/] [dim]{escape(p['path'])} p.{p['page']} "
            f"\\[{p['start']}:{p['end']}] "
            f"score {p['score']:.4f}[/]",
            highlight=False,
        )
        console.print(" ".join(p["text"].split())[:400], highlight=False, markup=False)
        console.print()


def print_citations(answer: Answer) -> None:
    """The citations under a streamed answer: where each [n] points and whether its source backs it."""
    if answer.finish_reason == "no_sources":
        console.print("[dim]No sources retrieved (is the index empty?); the model was not asked.[/]")
        return
    if answer.finish_reason == "length":
        console.print("[yellow]The answer was cut at --max-new-tokens.[/]")
    if not answer.citations:
        console.print("[dim]No citations.[/]")
        return
    table = Table("n", "sentence", "document", "page", "span", "supported")
    for c in answer.citations:
        if c.source is None:
            table.add_row(str(c.n), escape(c.sentence), "[red]no such source[/]", "", "", "[red]invalid[/]")
            continue
        s = c.source
        table.add_row(
            str(c.n),
            escape(c.sentence),
            escape(f"{s.title} ({Path(s.path).name})" if s.path else s.title),
            str(s.page),
            f"{s.start}-{s.end}",
            "[green]yes[/]" if c.supported else "[yellow]no[/]",
        )
    console.print(table)


def print_reading(answer: Answer) -> None:
    """What the reader read (each source's document, page and the character span read; sources cut
    to fit the model are marked), where a grounded answer was quoted from, and its evidence."""
    if not answer.sources:
        return
    table = Table("n", "document", "page", "read", title="Sources read", title_justify="left")
    for s in answer.sources:
        cut = " [yellow](cut to fit)[/]" if s.n in answer.cut_sources else ""
        name = escape(f"{s.title} ({Path(s.path).name})" if s.path else s.title)
        table.add_row(str(s.n), name, str(s.page), f"chars {s.start}-{s.end}{cut}")
    console.print(table)
    if answer.quote:
        q = answer.quote
        console.print(f"[dim]quoted from \\[{q['n']}], page {q['page']}, chars {q['start']}-{q['end']}[/]")
    for e in answer.evidence:
        where = f"\\[{e['n']}] chars {e['start']}-{e['end']} ({e['weight']:.0%})"
        console.print(f"[dim]evidence {where}: {escape(e['text'])}[/]", highlight=False)


@app.command("ask")
@user_errors
def ask_cmd(
    question: Annotated[str, typer.Argument(help="The question to answer from the indexed documents.")],
    k: Annotated[int, typer.Option("-k", "--k", "--top-k", min=1, help="Chunks to retrieve as sources.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="hybrid (default), dense or bm25.")] = "hybrid",
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help=f"Longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS}, or half a small context).",
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Reader checkpoint folder (default: RAG_MODEL_DIR or ./models/reader)."),
    ] = None,
    index: IndexOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Answer QUESTION with our own LLM from the top-k retrieved chunks, with numbered citations."""
    settings = settings_for(index)
    # the model first: a missing one is the likeliest case and costs nothing to find
    try:
        reader = Reader.load(model or settings.model_dir, settings.device, max_new_tokens=max_new_tokens)
    except ReaderUnavailable as exc:  # the passages instead, as the API and the web UI give them
        return search_instead(question, settings, str(exc), k, mode, as_json)
    with open_store(settings) as store:
        retriever = Retriever(store, get_embedder(settings.embedding_model, settings.device))
        answer_stream = ask_stream(question, retriever, reader, k=k, mode=mode)
        answer = drain(answer_stream, None if as_json else lambda piece: typer.echo(piece, nl=False))
    if as_json:
        return emit_json(answer.to_dict())
    typer.echo()
    print_citations(answer)
    print_reading(answer)
    t = answer.timings
    console.print(
        f"[dim]retrieve {t['retrieve_ms']:.0f} ms, generate {t['generate_ms']:.0f} ms, "
        f"{t['new_tokens']:.0f} tokens[/]",
        highlight=False,
    )


def search_instead(question: str, settings: Settings, reason: str, k: int, mode: str, as_json: bool) -> None:
    """`rag ask` without a reader: the matching passages, and why there is no answer."""
    with open_store(settings) as store:
        retriever = Retriever(store, get_embedder(settings.embedding_model, settings.device))
        result = search_only(question, retriever, reason, k=k, mode=mode)
    if as_json:
        return emit_json(result)
    err_console.print(
        f"[yellow]No answer:[/] {escape(reason)}\nThe passages that match the question:",
        highlight=False,
        soft_wrap=True,
    )
    print_passages(result["sources"])


@app.command("docs")
@user_errors
def docs_cmd(index: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """List indexed documents with their status, chunk count and error."""
    docs = read_store(index, Store.documents)
    if as_json:
        return emit_json([d.to_dict() for d in docs])
    if not docs:
        return console.print("The index is empty.")
    root, paths = relative_paths([d.path for d in docs])
    table = Table("id", "status", "chunks", title=f"Documents in {escape(root)}" if root else None)
    table.add_column("path", overflow="fold", ratio=3)  # whole, wrapped: never cut to the same "…"
    table.add_column("title", overflow="ellipsis", ratio=2)
    table.add_column("error", overflow="fold", ratio=2)
    for d, path in zip(docs, paths, strict=True):
        cells = [str(d.id), d.status, str(d.n_chunks), path, d.title, d.error or ""]
        table.add_row(*map(escape, cells), style="red" if d.error else None)
    console.print(table)


def relative_paths(paths: list[str]) -> tuple[str, list[str]]:
    """(their common folder, each path relative to it): a narrow terminal then shows the part that
    tells documents apart instead of the same long prefix."""
    try:
        root = os.path.commonpath(paths)
    except ValueError:  # relative and absolute paths mixed
        return "", paths
    if root in paths:  # one document, or one path the folder of the others
        root = os.path.dirname(root)
    if root in ("", os.sep):
        return "", paths
    return root, [os.path.relpath(p, root) for p in paths]


@app.command("delete")
@user_errors
def delete_cmd(
    doc: Annotated[str, typer.Argument(help="Document id or path (as listed by `rag docs`).")],
    index: IndexOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove one document from the index (SQLite, FAISS and BM25)."""
    with open_store(settings_for(index), readonly=False, check_model=False) as store:
        record = store.find_document(doc)
        if record is None:
            raise UserError(f"no document {doc!r} in the index; see `rag docs`")
        store.delete_document(record.id)
    if as_json:
        return emit_json({"deleted": {"id": record.id, "path": record.path}})
    console.print(f"Deleted document {record.id}: {escape(record.path)}", highlight=False)


@app.command("stats")
@user_errors
def stats_cmd(index: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """Counts, index size and embedding model of the index."""
    stats = read_store(index, Store.stats)
    if as_json:
        return emit_json(stats)
    table = Table("stat", "value", show_header=False)
    for key, value in stats.items():
        table.add_row(key, escape(json.dumps(value) if isinstance(value, dict) else str(value)))
    console.print(table)


@app.command("serve")
@user_errors
def serve_cmd(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 127.0.0.1 = this machine only.")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="API port.")] = 8000,
    index: IndexOpt = None,
    ui: Annotated[
        bool, typer.Option("--ui", help="Also start the web UI (Streamlit), once the API is up.")
    ] = False,
    ui_host: Annotated[
        str | None,
        typer.Option("--ui-host", help="Where the UI listens (default: RAG_UI_HOST or 127.0.0.1)."),
    ] = None,
    ui_port: Annotated[int, typer.Option("--ui-port", min=1, max=65535, help="Web UI port.")] = 8501,
) -> None:
    """Serve the REST API (uvicorn) over the index until Ctrl-C; OpenAPI docs at /docs."""
    from app.serve import serve

    settings = settings_for(index)
    serve(settings, host, port, ui=(ui_host or settings.ui_host, ui_port) if ui else None)


@eval_app.command("retrieval")
@user_errors
def eval_retrieval_cmd(
    beir: Annotated[
        Path | None, typer.Option("--beir", help="BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/).")
    ] = None,
    squad: Annotated[
        Path | None,
        typer.Option("--squad", help="SQuAD-format JSON (SQuAD, XQuAD): find each question's paragraph."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Qrels split: qrels/SPLIT.tsv (default: test, else dev, else train)."),
    ] = None,
    limit_queries: Annotated[
        int | None, typer.Option("--limit-queries", min=1, help="Evaluate only the first N queries.")
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option(
            "--index",
            help="Index folder (default: BEIR a cache folder keyed by corpus, SQuAD a temporary one).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Dense, bm25 and hybrid retrieval on a BEIR dataset (nDCG@10, Recall@100, MRR@10) or on the
    paragraphs of a SQuAD-format file (hit@1, hit@5, MRR@10, and how often fusion lost)."""
    show = not as_json
    if (beir is None) == (squad is None):
        raise UserError("give one of --beir DIR or --squad FILE")
    if squad is not None:
        return print_squad_eval(squad, index, show)
    assert beir is not None
    picked = "" if split else " (picked: first of test, dev, train in qrels/)"
    split = pick_split(beir, split)  # before the progress bar, so a bad split is one clean line
    with ingest_progress(show) as on_progress:
        result = run_beir(
            beir,
            split,
            get_settings(),
            index_dir=index,
            limit_queries=limit_queries,
            on_progress=on_progress,
            show_progress=show,
        )
    if as_json:
        return emit_json(result)
    table = Table(
        "mode",
        "nDCG@10",
        "Recall@100",
        "MRR@10",
        title=f"{beir.name} / {split}: {result['queries']} queries, {result['documents']} docs",
    )
    for mode in ("dense", "bm25", "hybrid"):
        m = result[mode]
        table.add_row(mode, f"{m['ndcg@10']:.4f}", f"{m['recall@100']:.4f}", f"{m['mrr@10']:.4f}")
    console.print(table)
    console.print(f"split: {split}{picked}\nindex: {result['index']}", highlight=False)


def print_squad_eval(squad: Path, index: Path | None, show: bool) -> None:
    with ingest_progress(show) as on_progress:
        result = run_squad(
            squad, get_settings(), index_dir=index, on_progress=on_progress, show_progress=show
        )
    if not show:
        return emit_json(result)
    title = f"{squad.name}: {result['queries']} questions, {result['paragraphs']} paragraphs"
    table = Table("mode", "hit@1", "hit@5", "MRR@10", title=title)
    for mode in ("dense", "bm25", "hybrid"):
        m = result[mode]
        table.add_row(mode, f"{m['hit@1']:.4f}", f"{m['hit@5']:.4f}", f"{m['mrr@10']:.4f}")
    console.print(table)
    console.print(
        f"hybrid put the gold paragraph below the better single mode for {result['fusion_below_best']:.1%} "
        f"of the questions, above it for {result['fusion_above_best']:.1%}; {result['chunks']} chunks",
        highlight=False,
    )


def print_reader_metrics(title: str, result: dict) -> None:
    """The reader's metrics next to the baseline's, one row each."""
    table = Table("metric", "model", "baseline", title=title)
    for metric, value in result["model"].items():
        base = result["baseline"][metric]
        table.add_row(metric, *("n/a" if v is None else f"{v:.4f}" for v in (value, base)))
    console.print(table)


@eval_app.command("reader")
@user_errors
def eval_reader_cmd(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Reader checkpoint (default: RAG_MODEL_DIR or models/reader)."),
    ] = None,
    squad: Annotated[
        Path | None,
        typer.Option(
            "--squad", help="SQuAD v1.1 JSON (default: squad/dev-v1.1-part-a.json of the shared data)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="A seeded sample of N questions.")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the prompts (distractors, order, sample).")
    ] = 0,
    sources: Annotated[
        int,
        typer.Option(
            "--sources", min=1, help="Most sources per prompt (each draws 1 to this), as in training."
        ),
    ] = DEFAULT_SOURCES,
    abstain: Annotated[
        float, typer.Option("--abstain", min=0.0, max=1.0, help="Share of questions asked without the gold.")
    ] = DEFAULT_ABSTAIN,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Answer room (default: the reader's); the prompt budget is the rest.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Prompts decoded together.")
    ] = DEFAULT_BATCH_SIZE,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: RAG_DEVICE, else cpu).")
    ] = None,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="Write every example's outputs and scores (JSONL).")
    ] = None,
    grounded: Annotated[
        bool,
        typer.Option(
            "--grounded/--free",
            help="Warm-started reader: answer with a span of one source (default) or decode freely.",
        ),
    ] = True,
    calibrate: Annotated[
        int | None,
        typer.Option(
            "--calibrate",
            min=1,
            help="Warm-started reader: first choose the abstention margin on N other questions of the file.",
        ),
    ] = None,
    save_calibration: Annotated[
        bool,
        typer.Option(
            "--save-calibration",
            help="Write the margin chosen by --calibrate next to the model (reader.json).",
        ),
    ] = False,
    margin: Annotated[
        float | None,
        typer.Option(
            "--margin", help="Warm-started reader: abstain below this margin (default: calibrated)."
        ),
    ] = None,
    starts: Annotated[
        int | None,
        typer.Option(
            "--starts", min=1, help="Warm-started reader: span starts tried per source (default: saved or 1)."
        ),
    ] = None,
    open_mode: Annotated[
        bool,
        typer.Option(
            "--open",
            help="Ingest every paragraph of the file into a temporary index and answer over the real "
            "retriever's top-k (adds retrieval_hit@k).",
        ),
    ] = False,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=20, help="With --open: chunks retrieved.")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="With --open: hybrid, dense or bm25.")] = "hybrid",
    unanswerable: Annotated[
        float,
        typer.Option(
            "--unanswerable",
            min=0.0,
            max=1.0,
            help="With --open: share of questions asked with their gold paragraph taken out (abstain).",
        ),
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """EM, F1, citation precision and abstention of the reader on SQuAD, next to a word-overlap baseline."""
    from rag.config import shared_data_dir

    settings = get_settings()
    squad = squad or shared_data_dir() / "squad" / "dev-v1.1-part-a.json"
    model = model or settings.model_dir
    if open_mode:
        result = evaluate_reader_open(
            model,
            squad,
            settings,
            limit=limit,
            seed=seed,
            k=k,
            mode=mode,
            unanswerable=unanswerable,
            device=device or settings.device,
            grounded=grounded,
            abstain_margin=margin,
            predictions=predictions,
            show_progress=True,
        )
        if as_json:
            return emit_json(result)
        print_reader_metrics(f"{squad.name}, open ({mode}, k={k})", result)
        console.print(
            f"{result['examples']} questions ({result['unanswerable']} without their paragraph); "
            f"retrieval_hit@{k} {result[f'retrieval_hit@{k}']:.4f}; latency {result['latency']}",
            highlight=False,
        )
        return None
    result = evaluate_reader(
        model,
        squad,
        limit=limit,
        seed=seed,
        sources=sources,
        abstain=abstain,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device or settings.device,
        predictions=predictions,
        show_progress=True,  # stderr: stdout stays one JSON value
        grounded=grounded,
        calibrate=calibrate,
        abstain_margin=margin,
        starts=starts,
    )
    if save_calibration:
        if result.get("calibrated_on") is None:
            raise typer.BadParameter("--save-calibration needs --calibrate N and a warm-started reader")
        save_reader_calibration(model, result)
    if as_json:
        return emit_json(result)
    build = result["build"]
    title = f"{squad.name}: {result['examples']} examples from {build['questions']} questions"
    print_reader_metrics(title, result)
    console.print(
        f"{result['answerable']} answerable, {result['abstain']} abstention rows; skipped questions: "
        f"{build['skipped'] or 'none'}; prompts of at most {result['max_tokens']} tokens, seed {seed}; "
        f"{result['cut_at_max_new_tokens']} answers cut at --max-new-tokens; "
        "baseline: the source sentence with the most question words, cited\n"
        f"sources per prompt {build['sources']}, gold source number {build['gold_positions']}; model by "
        "gold source number: "
        + "; ".join(
            f"{n}: EM {at['em']:.4f}, gold cited {at['gold_citation_rate']:.4f} ({at['rows']} rows)"
            for n, at in result["model_by_gold_position"].items()
        ),
        highlight=False,
    )
    if "latency" in result:
        console.print(
            f"abstention margin {result['abstain_margin']:.3f}"
            + (
                f" (calibrated on {result['calibrated_on']} other questions)"
                if result["calibrated_on"]
                else ""
            )
            + f"; SQuAD 2.0-style score {result['abstention_score']:.4f}; answer latency {result['latency']}",
            highlight=False,
        )


PAIR_METRICS = (
    "f1",
    "em",
    "citation_precision",
    "gold_citation_rate",
    "citation_support",
    "invalid_citation_rate",
)


@eval_app.command("pairs")
@user_errors
def eval_pairs_cmd(
    pairs: Annotated[Path, typer.Option("--pairs", help="Held-out pairs from `rag train pairs`.")],
    models: Annotated[
        list[Path] | None,
        typer.Option("--model", help="Policy checkpoint (repeatable: SFT, DPO, PPO side by side)."),
    ] = None,
    reward: Annotated[
        Path | None, typer.Option("--reward", help="A `rag train reward` folder: pairwise accuracy per kind.")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="The SFT model: each policy's implicit-reward (DPO) pair accuracy."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="The first N pairs.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer room.")] = 32,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Prompts decoded together.")
    ] = DEFAULT_BATCH_SIZE,
    as_json: JsonOpt = False,
) -> None:
    """Policies' greedy answers to the pairs' prompts (F1, citation precision and support) and a
    reward model's pairwise accuracy: the measures of the citation preference task (issue 12)."""
    from rag.preference_data import (
        evaluate_baseline,
        evaluate_policy,
        implicit_reward_accuracy,
        preference_margins,
        read_pairs,
        reward_accuracy,
    )

    if not models and reward is None:
        raise ValueError("give --model (a policy, repeatable) and/or --reward (a reward model)")
    held_out = read_pairs(pairs, limit)
    result: dict[str, Any] = {"pairs": str(pairs), "examples": len(held_out)}
    if reward is not None:
        result["reward_accuracy"] = reward_accuracy(reward, held_out)
    result["policies"] = {
        str(m): evaluate_policy(m, held_out, max_new_tokens=max_new_tokens, batch_size=batch_size)
        for m in models or []
    }
    if reference is not None:
        reference_margins = preference_margins(reference, held_out)
        for m in models or []:
            result["policies"][str(m)]["implicit_reward_accuracy"] = implicit_reward_accuracy(
                preference_margins(m, held_out), reference_margins
            )
    result["policies"]["word-overlap baseline"] = evaluate_baseline(held_out)
    if as_json:
        return emit_json(result)
    if reward is not None:
        accuracy = ", ".join(f"{k} {v:.3f}" for k, v in result["reward_accuracy"].items())
        console.print(f"reward model {reward}: pairwise accuracy {accuracy}", highlight=False)
    policies = result["policies"]
    table = Table("metric", *(Path(n).name for n in policies), title=f"{len(held_out)} prompts of {pairs}")
    for k in PAIR_METRICS + ("implicit_reward_accuracy",) * (reference is not None):
        table.add_row(k, *("n/a" if m.get(k) is None else f"{m[k]:.3f}" for m in policies.values()))
    console.print(table)
    return None


KnnModel = Annotated[
    Path, typer.Option("--model", help="LM checkpoint folder whose hidden states are the keys.")
]


@index_app.command("knn")
@user_errors
def index_knn_cmd(model: KnnModel, index: IndexOpt = None) -> None:
    """Create or update the kNN-LM datastore <index>/knnlm for the index's current chunks."""
    from rag.llm.knnlm import update_index_datastore

    print(json.dumps(update_index_datastore(settings_for(index).index_dir, model), indent=2))


@eval_app.command("knnlm")
@user_errors
def eval_knnlm_cmd(
    model: KnnModel,
    index: IndexOpt = None,
    held_out: Annotated[
        float, typer.Option(help="Share of documents for validation and again for test.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the document split.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of held-out documents with and without a kNN-LM datastore of the other documents."""
    from rag.llm.knnlm import evaluate_knnlm

    report = evaluate_knnlm(settings_for(index).index_dir, model, seed=seed, held_out=held_out)
    if as_json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        console.print(f"{key:>24}  {value:.4g}" if isinstance(value, float) else f"{key:>24}  {value}")


if __name__ == "__main__":
    app()
