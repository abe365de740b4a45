"""Reader evaluation: official SQuAD metrics on hand-computed cases, citation metrics on hand-made
outputs, the overlap baseline, and `rag eval reader` end to end on a tiny reader trained (real SFT)
on the rows `rag train reader-data` builds for the same questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag.cli import app
from rag.config import get_settings
from rag.eval_reader import overlap_baseline, score_reader_output, summarize_reader
from rag.llm.align import SFT_KEYS, read_jsonl, train_sft
from rag.llm.train import TrainConfig
from rag.prompt import ABSTAIN, Prompt, Source
from rag.reader_data import ReaderExample
from rag.squad import answer_text, contains_answer, exact_match, f1_score, normalize_answer
from tests.llm.test_data import one_thread  # noqa: F401  (autouse: tiny models train 5x faster)
from tests.test_reader_data import reader_data, save_tiny_model, squad_json, train_tokenizer, write


def test_normalize_answer_is_the_official_one() -> None:
    assert normalize_answer("  The Denver   Broncos! ") == "denver broncos"
    assert normalize_answer("A tale of an apple") == "tale of apple"
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # articles as whole words only
    assert normalize_answer("U.S.A. (1776)") == "usa 1776"
    assert normalize_answer("Don't-stop") == "dontstop"  # punctuation removed, not turned into spaces
    assert normalize_answer("the") == ""


def test_exact_match_and_f1_hand_computed() -> None:
    assert exact_match("the Denver Broncos.", ["Carolina", "Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    # pred {broncos, of, denver} vs gold {denver, broncos}: P 2/3, R 1, F1 0.8
    assert f1_score("Broncos of Denver", ["Denver Broncos"]) == pytest.approx(0.8)
    # max over golds: vs "Denver Broncos" P 1, R 1/2 -> 2/3; vs "Broncos" 0
    assert f1_score("Denver", ["Denver Broncos", "Broncos"]) == pytest.approx(2 / 3)
    # repeated tokens count once per match: common {red: 1, blue: 1} -> P 2/3, R 2/3
    assert f1_score("red red blue", ["red blue green"]) == pytest.approx(2 / 3)
    assert f1_score("", ["x"]) == 0.0 and f1_score("the", ["a"]) == 0.0  # official: 0 without overlap
    assert exact_match("The", ["an"]) == 1.0  # both normalize to ""
    for golds in ([], "Denver"):
        with pytest.raises(ValueError, match="non-empty list"):
            f1_score("Denver", golds)


def test_contains_answer_matches_whole_words() -> None:
    assert contains_answer("The Art of War, 5th c. BC", ["art of war"])
    assert not contains_answer("the party was long", ["art"])
    assert contains_answer("born in 1776.", ["x", "1776"])
    assert not contains_answer("the the the", ["The"])  # a gold that normalizes to nothing


def source(n: int, text: str) -> Source:
    return Source(n=n, title="Super Bowl 50", page=1, start=0, end=len(text), text=text)


SOURCES = [
    source(1, "The Denver Broncos defeated the Carolina Panthers 24–10."),
    source(2, "The game was played at Levi's Stadium in Santa Clara."),
    source(3, "Fans of the Denver Broncos celebrated in the streets."),
]


def example(gold: int | None, sources: list[Source] = SOURCES) -> ReaderExample:
    prompt = Prompt(ids=[0], sources=sources, question="Who won?")
    target = ABSTAIN if gold is None else f"Denver Broncos [{gold}]"
    return ReaderExample("q", "Who won?", ("Denver Broncos", "Broncos"), prompt, gold, target, len(sources))


def test_citation_and_abstention_metrics_hand_computed() -> None:
    no_answer = example(None, SOURCES[1:2])  # an abstention row: no source holds the answer
    rows = [
        score_reader_output("Denver Broncos [1]", example(1)),  # right, gold cited
        score_reader_output("the Denver Broncos [3]", example(1)),  # right, precise, not the gold
        score_reader_output("Carolina Panthers [2][7]", example(1)),  # wrong; [7] points at nothing
        score_reader_output(ABSTAIN, example(1)),  # a false abstention
        score_reader_output(f" {ABSTAIN.upper()} ", no_answer),  # a right abstention
        score_reader_output("Santa Clara [1]", no_answer),  # answered: imprecise citation
    ]
    assert [r["citations"] for r in rows] == [1, 1, 2, 0, 0, 1] and [r["invalid"] for r in rows] == [
        0,
        0,
        1,
        0,
        0,
        0,
    ]
    assert [r["abstained"] for r in rows] == [False, False, False, True, True, False]
    assert summarize_reader(rows) == pytest.approx(
        {
            "em": 2 / 4,
            "f1": 2 / 4,
            "citation_precision": 2 / 4,  # valid citations whose source holds an answer
            "gold_citation_rate": 1 / 4,
            "invalid_citation_rate": 1 / 5,
            "abstention_accuracy": 1 / 2,
            "false_abstention_rate": 1 / 4,
        }
    )
    assert answer_text("Denver  Broncos [1, 2] and [3]") == "Denver Broncos and"
    assert set(summarize_reader(rows[4:5]).values()) == {None, 1.0}  # nothing to count: None, not 0


def test_overlap_baseline_cites_the_best_matching_sentence() -> None:
    sources = [
        source(1, "Santa Clara is in California. It has a stadium."),
        source(2, "The stadium hosted Super Bowl 50 [4]. The Broncos won Super Bowl 50 in Santa Clara!"),
    ]
    assert overlap_baseline("Who won Super Bowl 50 in Santa Clara?", sources) == (
        "The Broncos won Super Bowl 50 in Santa Clara! [2]"
    )
    # ties go to the first sentence; a marker in the source text never becomes a citation
    assert overlap_baseline("Which stadium?", sources) == "It has a stadium. [1]"
    assert overlap_baseline("What hosted Super Bowl?", sources[1:]) == "The stadium hosted Super Bowl 50. [2]"
    assert overlap_baseline("Who won?", []) == ABSTAIN


QUESTIONS, NEW_TOKENS, ABSTAIN_SHARE = 8, 24, 0.3  # 24 tokens hold ABSTAIN and "Tower012 [2]"


@pytest.fixture(scope="module")
def trained(shared_data: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(reader, squad, rows): a tiny GPT fine-tuned by rag.llm.align.train_sft until it knows the
    rows `rag train reader-data --model` built for 8 questions; the eval asks it the same ones, so
    a right pipeline scores full marks (training and evaluation prompts must agree to the token)."""
    root = tmp_path_factory.mktemp("reader")
    init = save_tiny_model(root / "init", train_tokenizer(shared_data))
    squad = write(root / "dev.json", squad_json(words=2))  # short paragraphs: 1-2 sources fit
    rows = root / "rows.jsonl"
    args = ["--model", init, "--max-new-tokens", NEW_TOKENS, "--limit", QUESTIONS, "--abstain", ABSTAIN_SHARE]
    result = reader_data("--squad", squad, "--out", rows, *args)
    assert result.exit_code == 0, result.output
    # val_data: the same rows, so none is held out and every question is trained
    cfg = TrainConfig(data_dir=str(rows), val_data=str(rows), init_from=str(init),
                      out_dir=str(root / "reader"), batch_size=QUESTIONS, lr=1e-2, min_lr=1e-3,
                      warmup_steps=5, max_steps=100,
                      eval_interval=100, eval_iters=1, progress=False, device="cpu")  # fmt: skip
    assert train_sft(cfg).train_loss < 0.05
    return root / "reader", squad, rows


def eval_reader(*args) -> object:
    return CliRunner().invoke(app, ["eval", "reader", *map(str, args)], env={"COLUMNS": "200"})


def test_eval_reader_cli_end_to_end(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    reader, squad, rows = trained
    preds = tmp_path / "out" / "preds.jsonl"  # its folder is made
    args = ["--model", reader, "--squad", squad, "--limit", QUESTIONS, "--max-new-tokens", NEW_TOKENS]
    result = eval_reader(*args, "--abstain", ABSTAIN_SHARE, "--predictions", preds, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["examples"] == QUESTIONS == report["answerable"] + report["abstain"]
    assert report["abstain"] > 0 and report["build"]["gold_positions"].keys() >= {"1", "2"}
    assert report["max_tokens"] == 256 - NEW_TOKENS and report["seed"] == 0 and report["sources"] == 5
    # the trained reader answers every question it was trained on: the right span, the right source
    assert report["model"] == {
        "em": 1.0,
        "f1": 1.0,
        "citation_precision": 1.0,
        "gold_citation_rate": 1.0,
        "invalid_citation_rate": 0.0,
        "abstention_accuracy": 1.0,
        "false_abstention_rate": 0.0,
    }
    assert {n: at["em"] for n, at in report["model_by_gold_position"].items()} == {"1": 1.0, "2": 1.0}
    # the baseline finds "In <year> lord <name> built <tower>." (3 question words, others share 2):
    # right source always; F1 of a 6-word sentence holding the 1-word answer = 2 * (1/6) / (1 + 1/6)
    base = report["baseline"]
    assert base["gold_citation_rate"] == 1.0 and base["em"] == 0.0 and base["f1"] == pytest.approx(2 / 7)
    assert base["citation_precision"] == pytest.approx(report["answerable"] / QUESTIONS)  # abstain: imprecise
    assert base["abstention_accuracy"] == 0.0 and base["invalid_citation_rate"] == 0.0
    # one prediction line per example, for exactly the questions of the training rows
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert {line["id"] for line in lines} == {row["id"] for row in read_jsonl(rows, SFT_KEYS)}
    assert {"id", "question", "answers", "model", "baseline"} <= lines[0].keys()
    assert summarize_reader([line["model"] for line in lines]) == report["model"]
    assert [line["model"]["output"] for line in lines] == [
        row["answer"] for row in read_jsonl(rows, SFT_KEYS)
    ]

    table = eval_reader(*args, "--abstain", ABSTAIN_SHARE)
    assert table.exit_code == 0 and "citation_precision" in table.output and "baseline" in table.output
    assert "gold source number {1: " in table.output and "1: EM 1.0000" in table.output


def test_eval_reader_errors_and_device(trained: tuple[Path, Path, Path], tmp_path: Path, monkeypatch) -> None:
    reader, squad, _ = trained
    missing = eval_reader("--model", tmp_path / "none", "--squad", squad)
    assert (
        missing.exit_code == 1
        and "no reader model at" in missing.output
        and "Traceback" not in missing.output
    )
    # a bad --predictions path fails first: before the model (here missing too) is even looked at
    bad = eval_reader("--model", tmp_path / "none", "--squad", squad, "--predictions", tmp_path)
    assert bad.exit_code == 1 and "Is a directory" in bad.output and "no reader model" not in bad.output
    # the device comes from RAG_DEVICE, as for `rag ask`
    monkeypatch.setenv("RAG_DEVICE", "cpu:0")
    get_settings.cache_clear()
    try:
        result = eval_reader("--model", reader, "--squad", squad, "--limit", 2, "--json")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["device"] == "cpu:0"
