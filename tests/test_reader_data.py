"""Reader SFT data from SQuAD: real SQuAD-format files, a real tokenizer, the real prompt builder."""

from __future__ import annotations

import gzip
import inspect
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from app.api import AskRequest
from rag import answer
from rag.cli import app
from rag.llm.align import SFT_KEYS, prompt_tokens, read_jsonl
from rag.llm.checkpoint import save_checkpoint
from rag.llm.model import GPT, ModelConfig
from rag.llm.tokenizer import Tokenizer
from rag.prompt import ABSTAIN, build_prompt, source_header
from rag.reader_data import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SOURCES,
    ExampleBuilder,
    SquadQuestion,
    load_squad,
    select_questions,
    write_reader_data,
)
from rag.squad import contains_answer, mentions_answer
from tests.test_answer import train_tokenizer

LORDS = ["Percy", "Edmund", "Oswald", "Curio", "Lucio", "Belarius", "Cornwall", "Gonzalo"]
FILLER = "the walls were of grey stone and the gate looked to the sea while the guards kept the town"


def tower(a: int, p: int, k: int) -> str:
    return f"Tower{a}{p}{k}"


def year(a: int, p: int, k: int) -> int:
    return 1500 + 100 * a + 10 * p + k


def lord(a: int, p: int, k: int) -> str:
    return LORDS[(a + p + k) % len(LORDS)]


def paragraph(a: int, p: int, words: int) -> str:
    facts = [f"In {year(a, p, k)} lord {lord(a, p, k)} built {tower(a, p, k)}." for k in range(3)]
    vocab = FILLER.split()
    filler = " ".join(vocab[(i + a + p) % len(vocab)] for i in range(words))
    return f"{facts[0]} {filler}. {facts[1]} By the river the people worked. {facts[2]}"


def squad_json(n_articles: int = 5, n_paragraphs: int = 5, words: int = 30) -> dict:
    """SQuAD v1.1 JSON: each question asks for one tower, named once in one paragraph."""
    data = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(n_paragraphs):
            context = paragraph(a, p, words)
            qas = [
                {
                    "id": f"q{a}-{p}-{k}",
                    "question": f"Which tower did lord {lord(a, p, k)} build in {year(a, p, k)}?",
                    "answers": [{"text": tower(a, p, k), "answer_start": context.index(tower(a, p, k))}],
                }
                for k in range(3)
            ]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"Castle_of_A%C3%A9{a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def write(path: Path, obj: dict) -> Path:
    text = json.dumps(obj)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def save_tiny_model(out: Path, tok: Tokenizer, **config) -> Path:
    """A real checkpoint of the tiny preset (block 256, d_model 64), random weights, seeded."""
    torch.manual_seed(0)
    cfg = {**ModelConfig.preset("tiny").to_dict(), "vocab_size": tok.vocab_size, **config}
    save_checkpoint(out, GPT(ModelConfig(**cfg)), tok)
    return out


@pytest.fixture(scope="module")
def tok(shared_data: Path) -> Tokenizer:
    return train_tokenizer(shared_data)


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("squad") / "train.json.gz", squad_json())


def build(squad_file: Path, tok: Tokenizer, limit: int | None = None, **kw):
    builder = ExampleBuilder(load_squad(squad_file), tok, **kw)
    return list(builder(limit)), builder.stats


def test_load_plain_and_gzip(squad_file: Path, tmp_path: Path) -> None:
    plain = load_squad(write(tmp_path / "train.json", squad_json()))
    zipped = load_squad(squad_file)
    assert plain == zipped
    assert zipped.titles[1] == "Castle of Aé1"  # percent-decoded, underscores as spaces
    assert len(zipped.questions) == 5 * 5 * 3 and len(zipped.contexts[0]) == 5
    q = zipped.questions[4]  # article 0, paragraph 1, question 1
    assert (q.id, q.article, q.paragraph, q.answers) == ("q0-1-1", 0, 1, ("Tower011",))
    assert zipped.contexts[0][1][: q.answer_end].endswith("Tower011")


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="SQuAD file not found"):
        load_squad(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a SQuAD JSON file"):
        load_squad(tmp_path / "bad.json")
    (tmp_path / "bad.json.gz").write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match="not a SQuAD JSON file"):
        load_squad(tmp_path / "bad.json.gz")
    write(tmp_path / "shape.json", {"data": [{"title": "x", "paragraphs": [{"qas": []}]}]})
    with pytest.raises(ValueError, match="not SQuAD v1.1.*'context'"):
        load_squad(tmp_path / "shape.json")
    qa = {"id": 1, "question": None, "answers": []}
    write(tmp_path / "types.json", {"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [qa]}]}]})
    with pytest.raises(ValueError, match="not SQuAD v1.1.*not a string"):
        load_squad(tmp_path / "types.json")
    write(tmp_path / "empty.json", {"data": []})
    with pytest.raises(ValueError, match="no questions"):
        load_squad(tmp_path / "empty.json")


def test_rows_follow_the_prompt_format_and_are_deterministic(squad_file: Path, tok: Tokenizer) -> None:
    squad = load_squad(squad_file)
    by_id = {q.id: q for q in squad.questions}
    rows, stats = build(squad_file, tok, max_tokens=1024, seed=3)
    again, _ = build(squad_file, tok, max_tokens=1024, seed=3)
    other, _ = build(squad_file, tok, max_tokens=1024, seed=4)
    assert [r.to_row() for r in rows] == [r.to_row() for r in again]
    assert [r.to_row() for r in rows] != [r.to_row() for r in other]
    assert stats.rows == len(rows) == 75 and not stats.skipped and 0 < stats.abstain < 25
    # each row draws 1..DEFAULT_SOURCES sources, all shown (1024 tokens hold five paragraphs)
    assert set(stats.sources) == set(range(1, DEFAULT_SOURCES + 1)) and stats.fewer_sources == 0

    for ex in rows:
        q = by_id[ex.id]
        assert ex.to_row().keys() == {"prompt_ids", "answer", "id", "gold"}
        assert len(ex.prompt.ids) <= 1024 and len(ex.prompt.sources) == ex.drawn
        # the ids are exactly what the shared prompt builder makes of the sources shown
        assert build_prompt(tok, q.question, ex.prompt.sources, 1024).ids == ex.prompt.ids
        decoded = tok.decode(ex.prompt.ids, skip_special=False)
        for s in ex.prompt.sources:
            assert source_header(s.n, s.title, 1) + s.text in decoded
            assert s.text == squad.contexts[s.doc_id][s.chunk_id]
        # hard negatives: the gold's article first; its 4 other paragraphs fill all but a 5th source
        same = sum(s.doc_id == q.article for s in ex.prompt.sources)
        assert same == min(ex.drawn, 4 if ex.gold is None else 5)
        if ex.gold is None:
            assert ex.target == ABSTAIN
            assert not any(mentions_answer(s.text, q.answers) for s in ex.prompt.sources)
        else:
            gold = ex.prompt.sources[ex.gold - 1]
            assert (gold.doc_id, gold.chunk_id) == (q.article, q.paragraph)
            assert ex.target == f"{q.answers[0]} [{ex.gold}]" and q.answers[0] in gold.text
            others = [s for s in ex.prompt.sources if s is not gold]
            assert not any(contains_answer(s.text, q.answers) for s in others)  # unique towers


def test_sources_per_row_and_gold_position_are_drawn(squad_file: Path, tok: Tokenizer) -> None:
    """1..3 sources uniformly (~25 rows each), the gold uniformly among them: over all rows [1]
    holds it in (1 + 1/2 + 1/3) / 3 = 61% of rows, [3] in 1/9."""
    rows, stats = build(squad_file, tok, sources=3, abstain=0.0, max_tokens=1024, seed=0)
    shown = Counter(len(ex.prompt.sources) for ex in rows)
    assert shown == stats.sources and set(shown) == {1, 2, 3} and min(shown.values()) >= 15, shown
    counts = Counter(ex.gold for ex in rows)
    assert counts == stats.gold_positions and sum(counts.values()) == 75
    assert counts[1] > counts[2] > counts[3] > 0, counts
    full = Counter(ex.gold for ex in rows if len(ex.prompt.sources) == 3)
    assert set(full) == {1, 2, 3}, full  # with three sources shown, any may be the gold


def test_tight_budget_never_cuts_the_gold_answer(tmp_path: Path, tok: Tokenizer) -> None:
    obj = squad_json(n_articles=3, n_paragraphs=4)
    huge = "and the tide came in " * 150 + "so lord Percy built TowerHuge."
    obj["data"][0]["paragraphs"].append(
        {
            "context": huge,
            "qas": [
                {
                    "id": "huge",
                    "question": "Which tower?",
                    "answers": [{"text": "TowerHuge", "answer_start": 0}],
                },
                {"id": "none", "question": "Which?", "answers": []},
                {"id": "lost", "question": "Which?", "answers": [{"text": "TowerLost", "answer_start": 3}]},
            ],
        }
    )
    path = write(tmp_path / "tight.json", obj)
    squad = load_squad(path)
    by_id = {q.id: q for q in squad.questions}
    rows, stats = build(path, tok, sources=3, abstain=0.0, max_tokens=420, seed=1)
    assert stats.skipped == {"gold_does_not_fit": 1, "no_answer": 1, "answer_not_in_context": 1}
    assert stats.rows == len(rows) == 36 and stats.fewer_sources > 0
    for ex in rows:
        q = by_id[ex.id]
        gold = ex.prompt.sources[ex.gold - 1]
        assert len(ex.prompt.ids) <= 420 and gold.end >= q.answer_end and q.answers[0] in gold.text
    # the last source may be cut, the gold then moves in front of it: it is never the cut one
    last = [ex.prompt.sources[-1] for ex in rows]
    assert any(s.end < len(squad.contexts[s.doc_id][s.chunk_id]) for s in last)
    assert set(stats.gold_positions) >= {1, 2}


def test_abstention_share_and_its_skip_reason(tmp_path: Path, tok: Tokenizer) -> None:
    obj = squad_json(n_articles=2, n_paragraphs=3)
    river = obj["data"][0]["paragraphs"][0]
    river["qas"].append(
        {"id": "river", "question": "Where did the people work?", "answers": [{"text": "By the river"}]}
    )
    path = write(tmp_path / "river.json", obj)
    rows, stats = build(path, tok, sources=3, abstain=1.0, max_tokens=1024)
    # "by the river" is in every paragraph: no source would make "not in the documents" true
    assert stats.skipped == {"no_source_without_answer": 1}
    assert stats.abstain == stats.rows == len(rows) == 18 and not stats.gold_positions
    assert all(ex.target == ABSTAIN and ex.gold is None for ex in rows)
    # only 2 other paragraphs in the article: a third source comes from the other article
    for ex in rows:
        assert [s.doc_id for s in ex.prompt.sources].count(int(ex.id[1])) == min(ex.drawn, 2)
    assert any(len(ex.prompt.sources) == 3 for ex in rows)
    rows, stats = build(path, tok, sources=3, abstain=0.0, max_tokens=1024)
    assert stats.abstain == 0 and stats.rows == 19 and not stats.skipped
    with pytest.raises(ValueError, match="abstain"):
        ExampleBuilder(load_squad(path), tok, abstain=1.5)
    with pytest.raises(ValueError, match="sources"):
        ExampleBuilder(load_squad(path), tok, sources=0)


def test_mentions_answer_catches_inflected_answers() -> None:
    """SQuAD normalization glues "Warsaw's" into "warsaws": contains_answer misses it, the leakage
    check must not; nor plurals, nor a number glued to a dash that is not ASCII punctuation."""
    for text, gold in [
        ("from among Warsaw's 60 museums", "Warsaw"),
        ("defined using probabilistic Turing\nmachines; also", "Turing machine"),
        ("the Panthers 24–10 to earn", "24"),
        ("WARSAW, the capital", "warsaw"),
        ("two boxes", "box"),
    ]:
        assert mentions_answer(text, ["unrelated", gold]), (text, gold)
    assert not contains_answer("from among Warsaw's 60 museums", ["Warsaw"])
    assert not contains_answer("probabilistic Turing machines", ["Turing machine"])
    for text, gold in [("Warsawa", "Warsaw"), ("NewWarsaw", "Warsaw"), ("machinery", "machine"), ("x", "")]:
        assert not mentions_answer(text, [gold]), (text, gold)
    assert mentions_answer("costs US$5 now", ["$5"])  # a gold starting with punctuation


def test_abstention_rows_leave_out_inflected_answers(tmp_path: Path, tok: Tokenizer) -> None:
    contexts = [
        "The capital of Poland is Warsaw, on the Vistula.",
        "From among Warsaw's 60 museums the national one is the largest.",
        "A Turing machine reads and writes symbols on a tape.",
        "Classes are defined using probabilistic Turing machines.",
        "The river floods in spring and the fields turn green.",
    ]
    qas = [
        ("warsaw", 0, "What is the capital of Poland?", "Warsaw"),
        ("turing", 2, "What reads a tape?", "Turing machine"),
    ]
    paragraphs = [{"context": c, "qas": []} for c in contexts]
    for qid, p, question, gold in qas:
        qa = {
            "id": qid,
            "question": question,
            "answers": [{"text": gold, "answer_start": contexts[p].index(gold)}],
        }
        paragraphs[p]["qas"].append(qa)
    path = write(tmp_path / "leak.json", {"data": [{"title": "Poland", "paragraphs": paragraphs}]})
    seen: dict[str, set[int]] = {"warsaw": set(), "turing": set()}
    for seed in range(10):
        for ex in build(path, tok, sources=4, abstain=1.0, max_tokens=1024, seed=seed)[0]:
            seen[ex.id] |= {s.chunk_id for s in ex.prompt.sources}
    # every paragraph but the gold and its inflected mention is used; those two never are
    assert seen == {"warsaw": {2, 3, 4}, "turing": {0, 1, 4}}


def test_defaults_match_serving() -> None:
    """Rows show up to as many sources as `rag ask` / POST /v1/ask retrieve by default, in prompts
    as long as the default model serves (1024-token context minus rag.answer's answer room)."""
    assert inspect.signature(answer.ask).parameters["k"].default == DEFAULT_SOURCES
    assert inspect.signature(answer.ask_stream).parameters["k"].default == DEFAULT_SOURCES
    assert AskRequest.model_fields["k"].default == DEFAULT_SOURCES
    ask_k = next(p for p in get_command(app).commands["ask"].params if p.name == "k")
    assert ask_k.default == DEFAULT_SOURCES
    assert ModelConfig().block_size - answer.DEFAULT_MAX_NEW_TOKENS == DEFAULT_MAX_TOKENS


def test_limit_is_a_nested_seeded_sample(squad_file: Path, tok: Tokenizer) -> None:
    small, large = select_questions(75, 10, seed=0), select_questions(75, 30, seed=0)
    assert len(small) == 10 and set(small) <= set(large) and small == sorted(small)
    assert select_questions(75, 10, seed=1) != small and select_questions(75, 500, seed=0) == list(range(75))
    assert len({i // 15 for i in large}) == 5  # spread over all five articles
    rows10, _ = build(squad_file, tok, limit=10, max_tokens=1024)
    rows30, _ = build(squad_file, tok, limit=30, max_tokens=1024)
    by_id = {ex.id: ex.to_row() for ex in rows30}
    assert all(by_id[ex.id] == ex.to_row() for ex in rows10)  # a question's row does not depend on limit


def reader_data(*args) -> object:
    return CliRunner().invoke(app, ["train", "reader-data", *map(str, args)])


def test_cli_writes_rows_that_sft_reads(squad_file: Path, tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    out = tmp_path / "rows" / "reader.jsonl"
    args = ["--squad", squad_file, "--out", out, "--limit", "20"]
    result = reader_data(*args, "--tokenizer", tmp_path, "--max-tokens", "300")
    assert result.exit_code == 0, result.output
    assert "20 rows from 20 questions" in result.output and "prompts of at most 300 tokens" in result.output
    rows = read_jsonl(out, SFT_KEYS)
    assert len(rows) == 20 and all(len(prompt_tokens(tok, r)) <= 300 for r in rows)
    built, _ = build(squad_file, tok, limit=20, max_tokens=300)
    assert listed(rows) == [ex.to_row() for ex in built]

    bad = reader_data("--squad", tmp_path / "nope.json", *args[2:], "--tokenizer", tmp_path)
    assert bad.exit_code == 1 and "SQuAD file not found" in bad.output and "Traceback" not in bad.output
    with pytest.raises(ValueError, match="no rows built"):
        write_reader_data(squad_file, tok, tmp_path / "none.jsonl", max_tokens=20)
    assert not (tmp_path / "none.jsonl").exists()


def listed(rows: list[dict]) -> list[dict]:
    """read_jsonl rows with their prompt_ids (int32 arrays) as lists, to compare with written rows."""
    return [{**r, "prompt_ids": r["prompt_ids"].tolist()} for r in rows]


def test_cli_sizes_prompts_for_a_model(squad_file: Path, tok: Tokenizer, tmp_path: Path) -> None:
    """--model: the checkpoint's tokenizer and its context (256) minus the answer room."""
    model = save_tiny_model(tmp_path / "model", tok)
    out = tmp_path / "rows.jsonl"
    args = ["--squad", squad_file, "--out", out, "--limit", "20"]
    result = reader_data(*args, "--model", model, "--max-new-tokens", "56")
    assert result.exit_code == 0, result.output
    assert "prompts of at most 200 tokens" in result.output
    assert listed(read_jsonl(out, SFT_KEYS)) == [
        ex.to_row() for ex in build(squad_file, tok, limit=20, max_tokens=200)[0]
    ]
    result = reader_data(*args, "--model", model)  # the reader's own answer room: 96
    assert result.exit_code == 0 and "prompts of at most 160 tokens" in result.output, result.output

    for extra, message in [
        ([], "give --model DIR"),
        (["--model", model, "--tokenizer", model], "--model sets the tokenizer"),
        (["--model", model, "--max-tokens", "300"], "--model sets the tokenizer"),
        (["--tokenizer", model, "--max-new-tokens", "8"], "--max-new-tokens needs --model"),
        (["--model", tmp_path / "none"], "no reader model at"),
        (["--model", model, "--max-new-tokens", "256"], "max_new_tokens must be in"),
    ]:
        bad = reader_data(*args, *extra)
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output, bad.output


def test_cli_help_shows_every_option() -> None:
    for command in (["train", "reader-data"], ["eval", "reader"]):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "--sources" in result.output and "each" in result.output and "[default: 5]" in result.output


def test_shared_dev_file(shared_data: Path, tok: Tokenizer) -> None:
    path = shared_data / "squad" / "dev-v1.1-part-a.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    squad = load_squad(path)
    assert len(squad.questions) == 8123 and isinstance(squad.questions[0], SquadQuestion)
    assert squad.questions[0].answers == ("Denver Broncos",)  # three identical gold answers, deduplicated
    builder = ExampleBuilder(squad, tok)
    rows = list(builder(limit=100))
    assert builder.stats.questions == 100 and builder.stats.rows + sum(builder.stats.skipped.values()) == 100
    assert "answer_not_in_context" not in builder.stats.skipped and len(rows) >= 90
    assert len({ex.prompt.sources[0].title for ex in rows}) > 10  # the sample covers many articles
    # the reviewer's reproducer: 4 of 400 abstention rows named their answer ("Warsaw's", "24–10")
    abstain = list(ExampleBuilder(squad, tok, abstain=1.0)(limit=400))
    assert len(abstain) >= 390 and all(ex.gold is None for ex in abstain)
    assert not any(mentions_answer(s.text, ex.answers) for ex in abstain for s in ex.prompt.sources)
