"""The `rag` CLI on a tiny real index: in-process with CliRunner, error paths as real subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag.cli import app

runner = CliRunner()
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
DOCS = {
    "volcano.md": "# Volcanoes\n\nMagma rises through the crust and erupts as lava; Mount Etna in Sicily "
    "is one of the most active volcanoes in the world.",
    "tea.txt": "Green tea is steamed or pan-fired soon after picking, so its leaves do not oxidise; "
    "black tea leaves are rolled and fully oxidised before drying.",
    "rust.html": "<html><head><title>Rust ownership</title></head><body><p>Every value in Rust has "
    "a single owner; when the owner goes out of scope the borrow checker lets the value be dropped."
    "</p></body></html>",
    "notes.md": "# [draft] Release notes\n\nVersion 2.1 adds [bold]offline mode[/bold] and fixes sync.",
}


def rag(*args: str):
    result = runner.invoke(app, [str(a) for a in args], env=ENV)
    assert "Traceback" not in result.output
    return result


def rag_json(*args: str):
    result = rag(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "empty.md").write_text("")
    (folder / "blob.txt").write_bytes(b"\x00\x01binary\x00")
    return folder


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("index")
    report = rag_json("ingest", corpus, "--index", index)
    assert report["ingested"] == len(DOCS) and report["chunks"] >= len(DOCS)
    assert report["unchanged"] == 0
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons == {"empty.md": "empty file", "blob.txt": "binary file (contains NUL bytes)"}
    return index


def test_reingest_is_incremental_and_shows_skipped_table(corpus, index):
    assert rag_json("ingest", corpus, "--index", index)["unchanged"] == len(DOCS)
    result = rag("ingest", corpus, "--index", index)
    assert result.exit_code == 0
    assert f"0 ingested, {len(DOCS)} unchanged" in result.stdout
    assert "Skipped files" in result.stdout and "binary file (contains NUL bytes)" in result.stdout


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
def test_search_json(index, mode):
    hits = rag_json("search", "which volcano is most active", "-k", "2", "--mode", mode, "--index", index)
    assert len(hits) == 2
    top = hits[0]
    assert Path(top["path"]).name == "volcano.md" and top["page"] == 1
    assert {"path", "page", "start", "end", "score", "text", "title"} <= top.keys()
    assert top["end"] - top["start"] == len(top["text"]) and "Etna" in top["text"]


def test_search_table_and_mmr(index):
    result = rag("search", "ownership and borrowing in Rust", "--index", index, "--mmr", "0.5")
    assert result.exit_code == 0
    assert "1. Rust ownership" in result.stdout and "rust.html p.1" in result.stdout


def test_brackets_in_text_are_printed_literally(index):
    out = rag("search", "release notes offline mode", "-k", "1", "--index", index).stdout
    assert "[draft] Release notes" in out and "[bold]offline mode[/bold]" in out
    assert "[draft] Release notes" in rag("docs", "--index", index).stdout


def test_docs_and_stats(index):
    docs = {Path(d["path"]).name: d for d in rag_json("docs", "--index", index)}
    assert sorted(docs) == sorted([*DOCS, "empty.md", "blob.txt"])  # skipped files are listed too
    assert all(docs[name]["n_chunks"] >= 1 and not docs[name]["error"] for name in DOCS)
    assert docs["blob.txt"]["n_chunks"] == 0 and "NUL bytes" in docs["blob.txt"]["error"]
    assert docs["blob.txt"]["status"] != docs["tea.txt"]["status"]
    table = rag("docs", "--index", index).stdout
    assert "Volcanoes" in table and "Rust ownership" in table and "empty file" in table
    stats = rag_json("stats", "--index", index)
    assert stats["documents"] == len(docs) and stats["chunks"] == sum(d["n_chunks"] for d in docs.values())
    assert "documents" in rag("stats", "--index", index).stdout


def test_delete_by_path_and_id(corpus, tmp_path):
    index = tmp_path / "index"
    rag_json("ingest", corpus, "--index", index)
    deleted = rag_json("delete", corpus / "tea.txt", "--index", index)["deleted"]
    assert Path(deleted["path"]).name == "tea.txt"
    rust = next(d for d in rag_json("docs", "--index", index) if d["path"].endswith("rust.html"))
    result = rag("delete", str(rust["id"]), "--index", index)
    assert result.exit_code == 0 and "rust.html" in result.stdout
    left = {Path(d["path"]).name for d in rag_json("docs", "--index", index)}
    assert left == set(DOCS) - {"tea.txt", "rust.html"} | {"empty.md", "blob.txt"}
    hits = rag_json("search", "green tea leaves oxidised", "--index", index)
    assert {Path(h["path"]).name for h in hits} == {"volcano.md", "notes.md"}
    missing = rag("delete", "no-such-doc.txt", "--index", index)
    assert missing.exit_code == 1 and "no document 'no-such-doc.txt'" in missing.stderr


def test_user_errors_exit_nonzero_without_traceback(tmp_path):
    result = rag("search", "anything", "--index", tmp_path / "nowhere")
    assert result.exit_code == 1 and "no index at" in result.stderr
    result = rag("ingest", tmp_path / "missing-folder", "--index", tmp_path / "i")
    assert result.exit_code == 1 and "path not found" in result.stderr
    assert rag("search", "x", "--mode", "sparse", "--index", tmp_path).exit_code == 1


def run_rag(*args, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rag.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_model_mismatch_and_missing_index_in_a_real_process(index, tmp_path):
    proc = run_rag("search", "lava", "--index", index, env={"RAG_EMBEDDING_MODEL": "all-MiniLM-L12-v2"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Error:" in proc.stderr
    assert "all-MiniLM-L12-v2" in proc.stderr
    proc = run_rag("stats", "--index", tmp_path / "nowhere", "--json")
    assert proc.returncode == 1 and proc.stdout == "" and "no index at" in proc.stderr


def write_beir(root: Path) -> None:
    (root / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": f"d{i}", "title": Path(name).stem.title(), "text": text}
        for i, (name, text) in enumerate(DOCS.items())
    ]
    corpus.append(
        {"_id": "d9", "title": "Bees", "text": "Honey bees dance to tell the hive where flowers are."}
    )
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    queries = {"q1": "where is Mount Etna", "q2": "how is black tea oxidised", "q3": "why do bees dance"}
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    )
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td1\t1\nq3\td9\t1\n")


def test_eval_retrieval_on_tiny_beir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the corpus files are written
    write_beir(tmp_path / "beir")
    args = ("eval", "retrieval", "--beir", tmp_path / "beir", "--index", tmp_path / "idx")
    result = rag_json(*args)  # no --split: the only qrels file is dev.tsv, so dev is picked
    assert result["split"] == "dev"
    for mode in ("dense", "bm25", "hybrid"):
        assert set(result[mode]) == {"ndcg@10", "recall@100", "mrr@10"}
        assert result[mode]["recall@100"] == 1.0  # every doc is retrieved from a 5-doc corpus
        assert result[mode]["mrr@10"] == pytest.approx(1.0)  # and these queries are easy
    n_docs = len(DOCS) + 1
    assert result["queries"] == 3 and result["documents"] == n_docs
    assert result["ingest"]["ingested"] == n_docs
    again = rag_json(*args, "--limit-queries", "2")
    assert again["queries"] == 2 and again["ingest"]["unchanged"] == n_docs
    table = rag(*args, "--split", "dev").stdout
    assert "hybrid" in table and "nDCG@10" in table and "beir / dev:" in table and "split: dev\n" in table
    bad = run_rag(*args, "--split", "test", env={"COLUMNS": "80"})  # a real terminal width
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("Error: BEIR qrels not found") and bad.stderr.count("\n") == 1  # one line
    assert "test.tsv (available splits: dev)" in bad.stderr
    assert len(list((tmp_path / "cache").glob("rag/beir/beir-*/docs/*.md"))) == n_docs


def test_overlap_not_below_chunk_size_is_a_settings_error():
    from pydantic import ValidationError

    from rag.config import Settings

    with pytest.raises(ValidationError, match="chunk_overlap"):
        Settings(chunk_tokens=50, chunk_overlap=50)


def bad_inputs(tmp: Path) -> list[list[str]]:
    """Each `rag` command with input a user gets wrong: a path that is not there, an unknown name."""
    nowhere, a_file = str(tmp / "nowhere"), str(tmp / "file.txt")
    Path(a_file).write_text("not an index")
    return [
        ["ingest", nowhere, "--index", nowhere],
        ["search", "x", "--index", nowhere],
        ["search", "x", "-k", "0"],
        ["search", "x", "--mode", "sparse", "--index", a_file],
        ["ask", "x", "--index", nowhere, "--model", nowhere],
        ["docs", "--index", a_file],
        ["delete", "5", "--index", nowhere],
        ["stats", "--index", nowhere],
        ["serve", "--port", "70000"],
        ["eval", "retrieval", "--beir", nowhere],
        ["eval", "retrieval", "--beir", a_file],
        ["eval", "reader", "--model", nowhere, "--squad", nowhere, "--limit", "1"],
        ["train", "tokenizer", "--corpus", nowhere],
        ["train", "lm", "--preset", "nope"],
        ["train", "sft", "--init", nowhere, "--data", nowhere],
        ["train", "reader-data", "--squad", nowhere, "--out", str(tmp / "o.jsonl")],
        ["bench", "ingest", "--folder", nowhere, "--files", "1"],
        ["bench", "llm", "--model", "nope"],
        ["bench", "api", "--index", nowhere],
    ]


def test_no_command_prints_a_traceback_for_bad_input(tmp_path, capfd):
    """The `rag` program as its entry point runs it: every command answers bad input with a usage
    message (exit 2) or one `Error` line (exit 1) on stderr, never a Python traceback."""
    for argv in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as done:
            app(argv, prog_name="rag")
        out, err = capfd.readouterr()
        assert done.value.code in (1, 2), (argv, done.value.code, err[-2000:])
        assert "Traceback" not in err + out and err.strip(), (argv, err[-2000:])
        if done.value.code == 1:
            assert any(line.lower().startswith("error") for line in err.splitlines()), (argv, err)


def test_serve_on_a_port_in_use_is_one_line(tmp_path):
    """`rag serve` on a taken port: one line, exit 1, in a real process (nothing else starts)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_rag("serve", "--port", port, "--index", tmp_path, "--ui", env={"COLUMNS": "80"})
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1  # one line
    assert proc.stderr.startswith(f"Error: port {port} on 127.0.0.1 is already in use (another server?)")


def test_odd_entries_in_a_folder_are_skipped_rows_not_a_crash(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nA readable file about herons.")
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    Path(os.fsdecode(bytes(folder) + b"/caf\xe9.txt")).write_text("Latin-1 name")
    os.mkfifo(tmp_path / "pipe.txt")
    args = ("ingest", folder, tmp_path / "pipe.txt", "--index", tmp_path / "index")
    report = rag_json(*args)
    assert report["ingested"] == 1
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons == {
        "a": "symlink loop",
        "b": "symlink loop",
        "caf\\xe9.txt": "file name is not valid UTF-8: rename it",
        "pipe.txt": "not a regular file",
    }
    table = rag(*args)
    assert table.exit_code == 0 and "symlink loop" in table.stdout and "caf\\xe9.txt" in table.stdout


def test_docs_tell_paths_apart_on_an_80_column_terminal(index, corpus):
    result = runner.invoke(app, ["docs", "--index", str(index)], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert f"Documents in {corpus}" in " ".join(result.stdout.split())  # the common folder, once
    for name in [*DOCS, "empty.md", "blob.txt"]:
        assert f" {name} " in result.stdout  # each relative path whole, not cut to the same prefix


def test_missing_index_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = rag("stats", "--index", "index")
    assert result.exit_code == 1 and f"no index at {tmp_path / 'index'} " in result.stderr


def test_ask_without_a_reader_gives_the_passages(index, tmp_path):
    missing = tmp_path / "no-reader"
    found = rag_json("ask", "which volcano is most active", "--index", index, "--model", missing, "-k", "2")
    assert found["answer"] is None and found["finish_reason"] == "reader_unavailable"
    assert found["reader_unavailable"].startswith(f"no reader model at {missing}")
    assert [s["n"] for s in found["sources"]] == [1, 2] and found["sources"][0]["path"].endswith("volcano.md")
    result = rag("ask", "which volcano is most active", "--index", index, "--model", missing, "-k", "1")
    assert result.exit_code == 0 and "1. Volcanoes" in result.stdout and "Etna" in result.stdout
    assert result.stderr.startswith(f"No answer: no reader model at {missing}")
