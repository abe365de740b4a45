"""Citation preference pairs: a real SQuAD-format file made here, a real tokenizer, the real prompt
builder and citation check, and real (tiny, random) checkpoints for the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rag.citations import parse_citations
from rag.cli import app
from rag.eval_reader import score_reader_output
from rag.llm.align import DPO_KEYS, SFT_KEYS, read_jsonl, response_tokens
from rag.llm.checkpoint import load_checkpoint
from rag.llm.model import GPT, ModelConfig
from rag.llm.rlhf import ScalarHead, read_prompts, save_reward_model
from rag.llm.tokenizer import Tokenizer
from rag.preference_data import (
    KINDS,
    PairStats,
    build_pairs,
    chunk_squad,
    citation_scorer,
    preference_margins,
    read_pairs,
    sentence_chunks,
    summarize_policy,
    write_pairs,
)
from rag.reader_data import load_squad
from rag.squad import contains_answer, f1_score
from tests.test_answer import train_tokenizer
from tests.test_reader_data import save_tiny_model, squad_json, write

MAX_TOKENS = 200  # the tiny model's 256 positions minus answer room
CHUNK_WORDS = 20  # two chunks per fixture paragraph, the first with two answers


@pytest.fixture(scope="module")
def tok(shared_data: Path) -> Tokenizer:
    return train_tokenizer(shared_data)


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("squad") / "train.json", squad_json(n_articles=4, words=8))


@pytest.fixture(scope="module")
def pairs(squad_file: Path, tok: Tokenizer):
    return list(build_pairs(chunk_squad(load_squad(squad_file), CHUNK_WORDS), tok, max_tokens=MAX_TOKENS))


def test_sentence_chunks_keep_whole_sentences() -> None:
    text = "One two three. Four five six seven! Eight nine?  Ten eleven twelve thirteen fourteen."
    chunks = sentence_chunks(text, max_words=6)
    assert [text[s:e] for s, e in chunks] == [
        "One two three.",
        "Four five six seven! Eight nine?",
        "Ten eleven twelve thirteen fourteen.",
    ]
    assert sentence_chunks(text, max_words=100) == [(0, len(text))]
    assert sentence_chunks("a very long sentence without an end", 2) == [(0, 35)]


def test_chunk_squad_moves_each_question_to_the_chunk_with_its_answer(squad_file: Path) -> None:
    squad = load_squad(squad_file)
    chunked = chunk_squad(squad, CHUNK_WORDS)
    assert chunked.titles == squad.titles
    assert all(len(c) > len(p) for c, p in zip(chunked.contexts, squad.contexts, strict=True))
    assert [q.id for q in chunked.questions] == [q.id for q in squad.questions]
    for q in chunked.questions:
        chunk = chunked.contexts[q.article][q.paragraph]
        assert q.answer_end is not None and chunk[: q.answer_end].endswith(q.answers[0])


def test_pairs_prefer_the_gold_span_citing_its_source(pairs) -> None:
    """Chosen: a gold span citing the source that contains it. Rejected: the gold span citing a
    source without it, or another question's answer correctly cited (the citation check passes)
    but sharing no word with the gold."""
    assert len(pairs) >= 30
    assert {p.kind for p in pairs} == set(KINDS)
    for pair in pairs:
        ex = pair.example
        sources = ex.prompt.sources
        assert len(sources) >= 2 and [s.n for s in sources] == list(range(1, len(sources) + 1))
        assert pair.example.target == f"{ex.answers[0]} [{ex.gold}]"
        (chosen,) = parse_citations(ex.target, sources)
        assert chosen.supported and contains_answer(chosen.source.text, ex.answers)
        (rejected,) = parse_citations(pair.rejected, sources)
        assert rejected.valid
        if pair.kind == "wrong_source":
            assert rejected.sentence == ex.answers[0] and rejected.n != ex.gold
            assert not contains_answer(rejected.source.text, ex.answers)
        else:
            assert rejected.supported and f1_score(rejected.sentence, ex.answers) == 0.0
            assert (rejected.n == ex.gold) == (pair.kind == "same_source_span")


def test_pairs_are_deterministic_and_feed_every_trainer(
    squad_file: Path, tok: Tokenizer, pairs, tmp_path: Path
) -> None:
    first, again = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = write_pairs(squad_file, tok, first, chunk_words=CHUNK_WORDS, max_tokens=MAX_TOKENS)
    write_pairs(squad_file, tok, again, chunk_words=CHUNK_WORDS, max_tokens=MAX_TOKENS)
    assert first.read_bytes() == again.read_bytes()
    assert stats.pairs == len(pairs) == sum(stats.kinds.values()) == sum(stats.sources.values())
    assert stats.questions == stats.pairs + sum(stats.skipped.values())
    sft, dpo = read_jsonl(first, SFT_KEYS), read_jsonl(first, DPO_KEYS)
    assert [r["answer"] for r in sft] == [r["chosen"] for r in dpo] == [p.example.target for p in pairs]
    assert read_prompts(first, tok) == [p.example.prompt.ids for p in pairs]  # PPO's prompts
    assert all(len(ids) <= MAX_TOKENS for ids in read_prompts(first, tok))
    back = read_pairs(first)
    assert [(b.example, b.rejected, b.kind) for b in back] == [(p.example, p.rejected, p.kind) for p in pairs]
    sample = PairStats()
    few = list(
        build_pairs(
            chunk_squad(load_squad(squad_file), CHUNK_WORDS), tok, max_tokens=200, limit=20, stats=sample
        )
    )
    assert {p.example.id: p.rejected for p in few}.items() <= {
        p.example.id: p.rejected for p in pairs
    }.items()
    assert sample.questions == 20


def test_cli_writes_pairs(squad_file: Path, tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    out = tmp_path / "pairs.jsonl"
    args = ["train", "pairs", "--squad", squad_file, "--out", out, "--tokenizer", tmp_path / "tokenizer.json"]
    result = CliRunner().invoke(app, [*map(str, args), "--max-tokens", "200", "--chunk-words", "20"])
    assert result.exit_code == 0, result.output
    assert "pairs from 60 questions" in " ".join(result.output.split())
    assert len(read_pairs(out)) == len(out.read_text().splitlines())
    result = CliRunner().invoke(app, [*map(str, args[:6]), "--max-tokens", "200"])
    assert result.exit_code == 1 and "give --model DIR" in result.output


def test_policy_scores_separate_chosen_from_each_rejected_kind(pairs) -> None:
    """The measures: chosen answers score 1 everywhere; a wrong source keeps F1 but loses citation
    precision; a wrong span keeps citation support but loses F1."""
    examples = [p.example for p in pairs]

    def summary(texts: list[str], subset: list) -> dict:
        rows = [score_reader_output(t, p.example) for t, p in zip(texts, subset, strict=True)]
        return summarize_policy(rows, [p.example for p in subset])

    chosen = summary([ex.target for ex in examples], pairs)
    assert {
        k: chosen[k] for k in ("f1", "em", "citation_precision", "gold_citation_rate", "citation_support")
    } == {
        "f1": 1.0,
        "em": 1.0,
        "citation_precision": 1.0,
        "gold_citation_rate": 1.0,
        "citation_support": 1.0,
    }
    assert chosen["answers_with_citation"] == 1.0 and chosen["examples"] == len(pairs)
    wrong = [p for p in pairs if p.kind == "wrong_source"]
    wrong_source = summary([p.rejected for p in wrong], wrong)
    assert (wrong_source["f1"], wrong_source["citation_precision"], wrong_source["gold_citation_rate"]) == (
        1,
        0,
        0,
    )
    spans = [p for p in pairs if p.kind != "wrong_source"]
    wrong_span = summary([p.rejected for p in spans], spans)
    assert (wrong_span["f1"], wrong_span["citation_support"]) == (0.0, 1.0)
    uncited = summary(["Tower"] * len(pairs), pairs)
    assert uncited["answers_with_citation"] == 0.0 and uncited["citation_support"] is None


def test_eval_pairs_runs_policies_and_a_reward_model(
    squad_file: Path, tok: Tokenizer, tmp_path: Path
) -> None:
    """`rag eval pairs` end to end on real checkpoints: a random tiny policy decodes every prompt;
    a reward model with its zero-initialised head scores chosen and rejected alike (accuracy 0)."""
    held_out = tmp_path / "pairs.jsonl"
    write_pairs(squad_file, tok, held_out, chunk_words=CHUNK_WORDS, max_tokens=MAX_TOKENS, limit=12)
    policy = save_tiny_model(tmp_path / "policy", tok)
    torch.manual_seed(0)
    cfg = ModelConfig(**{**ModelConfig.preset("tiny").to_dict(), "vocab_size": tok.vocab_size})
    save_reward_model(tmp_path / "reward", ScalarHead(GPT(cfg)), tok)
    args = ["eval", "pairs", "--pairs", held_out, "--model", policy, "--reward", tmp_path / "reward"]
    args += ["--reference", policy]  # a policy against itself: every margin ties, implicit accuracy 0
    result = CliRunner().invoke(app, [*map(str, args), "--limit", "5", "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["examples"] == 5
    assert report["reward_accuracy"]["all"] == 0.0 and set(report["reward_accuracy"]) <= {"all", *KINDS}
    metrics, baseline = report["policies"][str(policy)], report["policies"]["word-overlap baseline"]
    assert metrics["examples"] == baseline["examples"] == 5 and 0.0 <= metrics["f1"] <= 1.0
    assert metrics["cut_at_max_new_tokens"] <= 5 and metrics["implicit_reward_accuracy"] == 0.0
    assert baseline["answers_with_citation"] == 1.0 and baseline["citation_support"] == 1.0
    result = CliRunner().invoke(app, ["eval", "pairs", "--pairs", str(held_out)])
    assert result.exit_code == 1 and "--model" in result.output


def test_citation_scorer_is_the_task_check_on_sampled_tokens(pairs, tok: Tokenizer) -> None:
    """PPO's exact reward: citation precision + F1 of the decoded response, tokens after EOS masked."""
    score = citation_scorer(pairs, tok)
    expected = {"wrong_source": 1.0, "same_source_span": 1.0, "other_source_span": 0.0}
    for pair in pairs:
        prompt = pair.example.prompt.ids
        for text, want in ((pair.example.target, 2.0), (pair.rejected, expected[pair.kind])):
            response = response_tokens(tok, text)
            junk = tok.encode(" [3] Tower999")  # sampled after EOS: masked, never scored
            seq = torch.tensor([prompt + response + junk])
            mask = torch.tensor([[1.0] * len(response) + [0.0] * len(junk)])
            assert score(seq, mask, len(prompt)).tolist() == [want]


def test_ppo_with_the_citation_reward_runs_end_to_end(
    squad_file: Path, tok: Tokenizer, tmp_path: Path
) -> None:
    prompts = tmp_path / "pairs.jsonl"
    write_pairs(squad_file, tok, prompts, chunk_words=CHUNK_WORDS, max_tokens=MAX_TOKENS, limit=12)
    policy = save_tiny_model(tmp_path / "sft", tok)
    out = tmp_path / "ppo"
    args = ["train", "ppo", "--prompts", prompts, "--init", policy, "--out", out, "--citation-reward"]
    sizes = ["--iterations", "2", "--batch-size", "4", "--response-len", "4"]
    result = CliRunner().invoke(app, [*map(str, args), *sizes])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "result.json").read_text())
    assert 0.0 <= report["reward_first"] <= 2.0 and report["kl_first"] >= 0.0
    assert (out / "ppo_curve.png").is_file() and (out / "model.safetensors").is_file()
    result = CliRunner().invoke(app, [*map(str, args[:-1]), *sizes])
    assert result.exit_code == 1 and "--citation-reward" in result.output


def test_preference_margins_match_unbatched_log_probs(pairs, tok: Tokenizer, tmp_path: Path) -> None:
    """Padded batches give each pair's log p(chosen) - log p(rejected), as one unpadded pass does."""
    policy = save_tiny_model(tmp_path / "policy", tok)
    model, _ = load_checkpoint(policy)
    few = pairs[:5]

    def logp(prompt: list[int], text: str) -> float:
        ids = prompt + response_tokens(tok, text)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[len(prompt) :])[:, None]).sum().item()

    want = [
        logp(p.example.prompt.ids, p.example.target) - logp(p.example.prompt.ids, p.rejected) for p in few
    ]
    assert preference_margins(policy, few, batch=2) == pytest.approx(want, abs=1e-4)
