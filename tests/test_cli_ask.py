"""`rag ask` through the real CLI (typer's runner): a tmp index and a tmp checkpoint of the tiny
reader trained in test_answer, so the answers and their citations are known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag.cli import app
from rag.llm.checkpoint import save_checkpoint
from rag.prompt import ABSTAIN
from rag.retrieve import open_retriever
from tests.test_answer import ANSWER_KEYS, K, build_index, expected_answers, train_reader, train_tokenizer

runner = CliRunner()
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data: Path) -> tuple[Path, Path, dict[str, str]]:
    """(index dir, checkpoint dir, question -> the answer the model gives)."""
    root = tmp_path_factory.mktemp("ask")
    retriever = open_retriever(build_index(root))
    reader = train_reader(train_tokenizer(shared_data), retriever)
    save_checkpoint(root / "model", reader.model, reader.tokenizer)
    return root / "index", root / "model", expected_answers(retriever)


def rag_ask(question: str, index: Path, model: Path, *args: str):
    argv = ["ask", question, "--index", str(index), "--model", str(model), "-k", str(K), *args]
    result = runner.invoke(app, argv, env=ENV)
    assert "Traceback" not in result.output
    return result


def test_json_is_the_answer_dict(setup) -> None:
    index, model, expected = setup
    question = "Kde sídlí prezident republiky?"
    result = rag_ask(question, index, model, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)  # stdout holds the JSON only: no streamed pieces
    assert list(d) == ANSWER_KEYS
    assert (d["question"], d["answer"], d["abstained"], d["finish_reason"]) == (
        question,
        expected[question],
        False,
        "stop",
    )
    (c,) = d["citations"]
    assert c["valid"] and c["supported"] and c["sentence"] == "V Pražském hradu"
    assert Path(c["source"]["path"]).name == "hrad.txt" and c["source"] == d["sources"][c["n"] - 1]
    # at most K: a Czech query is BM25 alone (the embedder cannot read it), which may match fewer chunks
    assert 1 <= len(d["sources"]) <= K and set(d["timings"]) >= {"retrieve_ms", "generate_ms"}


def test_streamed_answer_then_citation_table(setup) -> None:
    index, model, expected = setup
    question = "Which rivers flow through Paris and Berlin?"
    result = rag_ask(question, index, model, "--max-new-tokens", "32")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == expected[question]
    table = "\n".join(lines[1:])
    for needle in ("supported", "The Seine", "and the Spree", "paris.txt", "berlin.txt", "yes", "retrieve"):
        assert needle in table
    assert "invalid" not in table

    result = rag_ask("How many moons does Jupiter have?", index, model)
    assert result.exit_code == 0 and result.stdout.splitlines()[:2] == [ABSTAIN, "No citations."]


def test_errors_are_one_line(setup, tmp_path) -> None:
    index, model, _ = setup
    missing = tmp_path / "no-model"  # no reader: the passages instead, and why (see test_cli.py)
    result = rag_ask("What is the capital of France?", index, missing, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["reader_unavailable"] == (
        f"no reader model at {missing}: train one with `make reader` / see docs/user-guide.md"
    )

    result = rag_ask("What is the capital of France?", tmp_path / "no-index", model)
    assert result.exit_code == 1 and "no index at" in result.stderr
    result = rag_ask("What is the capital of France?", index, model, "--max-new-tokens", "600")
    assert result.exit_code == 1 and "max_new_tokens must be in [1, 511]" in result.stderr
    result = rag_ask("What is the capital of France?", index, model, "--mode", "sparse")
    assert result.exit_code == 1 and "unknown mode" in result.stderr
    result = rag_ask("   ", index, model)
    assert result.exit_code == 1 and "empty" in result.stderr


def test_empty_index_abstains_without_the_model(setup, tmp_path) -> None:
    _, model, _ = setup
    (tmp_path / "empty").mkdir()
    assert (
        runner.invoke(app, ["ingest", str(tmp_path / "empty"), "--index", str(tmp_path / "i")]).exit_code == 0
    )
    result = rag_ask("What is the capital of France?", tmp_path / "i", model)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [
        ABSTAIN,
        "No sources retrieved (is the index empty?); the model was not asked.",
    ]
    d = json.loads(rag_ask("What is the capital of France?", tmp_path / "i", model, "--json").stdout)
    assert (d["answer"], d["abstained"], d["finish_reason"], d["sources"]) == (
        ABSTAIN,
        True,
        "no_sources",
        [],
    )
