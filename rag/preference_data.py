"""Reader preference pairs from SQuAD, checkable without people, and the measures that use them.

Issue 12's task: over reader prompts (a question and 2-4 numbered sources, one holding the gold
answer), prefer the answer that matches the gold span and cites the source that contains it over

- `wrong_source`: the same gold span citing another source of the prompt (one without the answer),
- `other_source_span`: another question's answer that a distractor source contains, cited to it,
- `same_source_span`: another question's answer from the gold source itself, cited to it.

Both rejected spans are correctly cited (the project's citation check passes) but share no word
with a gold answer (SQuAD F1 0), so the preference can only be learnt by reading the question;
`wrong_source` can only be learnt by reading which source holds the span. Wrong spans are real
SQuAD answers to other questions, so they look like answers and are not just odd word windows.

Prompts are built by rag.reader_data's ExampleBuilder (the serving prompt format) over SQuAD
paragraphs cut into chunks of whole sentences (`chunk_squad`): a tiny model's 384-token prompt
then holds 2-4 sources, as a retriever's chunks would be, instead of one and a half paragraphs.
Distractors are other chunks of the same article first (often the gold's own paragraph).

Each JSONL row is at once an SFT row (`prompt_ids`, `answer` = the chosen answer), a DPO and reward
row (`chosen`, `rejected`) and a PPO prompt, and carries its sources and gold answers, so
`evaluate_policy` scores a policy's answers on exactly the held-out pairs' prompts.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from rag.citations import parse_citations
from rag.llm.tokenizer import Tokenizer
from rag.prompt import Prompt, Source
from rag.reader_data import ExampleBuilder, ReaderExample, Squad, load_squad, write_rows
from rag.squad import contains_answer, f1_score

KINDS = ("wrong_source", "other_source_span", "same_source_span")
DEFAULT_CHUNK_WORDS = 50  # about 100 tokens of a 1024-token BPE: 3 sources fit a 384-token prompt
DEFAULT_PAIR_SOURCES = 4  # most sources drawn per prompt; rows showing fewer than 2 are skipped
MIN_SOURCES = 2  # a preference between sources needs at least two
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentence_chunks(text: str, max_words: int) -> list[tuple[int, int]]:
    """Character spans of consecutive whole sentences of about max_words words each.

    A sentence is never split (a longer one is a chunk of its own), so an answer is only lost
    where it straddles two chunks."""
    bounds = [0, *(m.start() for m in _SENTENCE_END.finditer(text)), len(text)]
    starts = [0, *(m.end() for m in _SENTENCE_END.finditer(text))]
    sentences = [(s, e) for s, e in zip(starts, bounds[1:], strict=True) if text[s:e].strip()]
    chunks: list[tuple[int, int]] = []
    words = 0
    for s, e in sentences:
        n = len(text[s:e].split())
        if chunks and words + n <= max_words:
            chunks[-1] = (chunks[-1][0], e)
            words += n
        else:
            chunks.append((s, e))
            words = n
    return chunks


def chunk_squad(squad: Squad, max_words: int = DEFAULT_CHUNK_WORDS) -> Squad:
    """The same articles with each paragraph cut into sentence chunks (`sentence_chunks`); every
    question moves to the chunk holding its answer (answer_end None where the answer straddles two)."""
    contexts: list[list[str]] = []
    where: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (a, p) -> (chunk index, start, end)
    for a, paragraphs in enumerate(squad.contexts):
        chunks: list[str] = []
        for p, text in enumerate(paragraphs):
            spans = sentence_chunks(text, max_words)
            where[a, p] = [(len(chunks) + i, s, e) for i, (s, e) in enumerate(spans)]
            chunks += [text[s:e] for s, e in spans]
        contexts.append(chunks)
    questions = []
    for q in squad.questions:
        spans = where[q.article, q.paragraph]
        end = q.answer_end
        if end is None or not q.answers or not spans:
            questions.append(replace(q, paragraph=spans[0][0] if spans else 0, answer_end=None))
            continue
        begin = end - len(q.answers[0])
        c, s, e = next((x for x in spans if x[1] <= begin < x[2]), spans[-1])
        inside = s <= begin and end <= e
        questions.append(replace(q, paragraph=c, answer_end=end - s if inside else None))
    return Squad(squad.titles, contexts, questions)


def answer_spans(squad: Squad) -> dict[tuple[int, int], list[str]]:
    """(article, paragraph) -> the gold answers of all its questions: answer-like spans it contains."""
    spans: dict[tuple[int, int], list[str]] = {}
    for q in squad.questions:
        if q.answer_end is not None:
            spans.setdefault((q.article, q.paragraph), []).extend(q.answers)
    return {k: list(dict.fromkeys(v)) for k, v in spans.items()}


def rejections(example: ReaderExample, spans: dict[tuple[int, int], list[str]]) -> dict[str, list[str]]:
    """Every rejected answer of each kind for one answerable example (see the module docstring)."""
    golds, gold = example.answers, example.gold
    found: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for source in example.prompt.sources:
        if source.n != gold and not contains_answer(source.text, golds):
            found["wrong_source"].append(f"{golds[0]} [{source.n}]")
        kind = "same_source_span" if source.n == gold else "other_source_span"
        for span in spans.get((source.doc_id, source.chunk_id), ()):
            if span in source.text and f1_score(span, golds) == 0.0:
                found[kind].append(f"{span} [{source.n}]")
    return found


@dataclass
class PreferencePair:
    example: ReaderExample
    rejected: str
    kind: str

    def to_row(self) -> dict:
        """One JSONL row for `rag train sft` (answer), `dpo`/`reward` (chosen, rejected) and `ppo`."""
        ex = self.example
        return ex.to_row() | {
            "chosen": ex.target,
            "rejected": self.rejected,
            "kind": self.kind,
            "question": ex.question,
            "answers": list(ex.answers),
            "sources": [s.to_dict() for s in ex.prompt.sources],
            "dropped": ex.prompt.dropped,
            "drawn": ex.drawn,
        }

    @classmethod
    def from_row(cls, row: dict) -> PreferencePair:
        sources = [Source(**s) for s in row["sources"]]
        prompt = Prompt([int(i) for i in row["prompt_ids"]], sources, row["question"], row["dropped"])
        example = ReaderExample(
            row["id"],
            row["question"],
            tuple(row["answers"]),
            prompt,
            row["gold"],
            row["chosen"],
            row["drawn"],
        )
        return cls(example, row["rejected"], row["kind"])


@dataclass
class PairStats:
    questions: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> questions
    kinds: Counter = field(default_factory=Counter)
    gold_positions: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)  # sources shown -> pairs

    def to_dict(self) -> dict:
        return {
            "questions": self.questions,
            "pairs": self.pairs,
            "skipped": dict(sorted(self.skipped.items())),
            "kinds": dict(sorted(self.kinds.items())),
            "gold_positions": dict(sorted(self.gold_positions.items())),
            "sources": dict(sorted(self.sources.items())),
        }


def build_pairs(
    squad: Squad,
    tokenizer: Tokenizer,
    *,
    max_tokens: int,
    sources: int = DEFAULT_PAIR_SOURCES,
    limit: int | None = None,
    seed: int = 0,
    stats: PairStats | None = None,
    progress: bool = False,
) -> Iterator[PreferencePair]:
    """One pair per usable question of a seeded sample (rag.reader_data.select_questions): its
    answerable prompt if it shows >= 2 sources, and a rejected answer of a kind drawn uniformly
    among those the prompt allows. Deterministic per (seed, question id), like the reader data."""
    stats = stats if stats is not None else PairStats()
    builder = ExampleBuilder(squad, tokenizer, sources=sources, abstain=0.0, max_tokens=max_tokens, seed=seed)
    spans = answer_spans(squad)
    for example in builder(limit, progress):
        if len(example.prompt.sources) < MIN_SOURCES:
            stats.skipped["one_source"] += 1
            continue
        options = {kind: found for kind, found in rejections(example, spans).items() if found}
        if not options:
            stats.skipped["no_rejected_answer"] += 1
            continue
        rng = random.Random(f"{seed}:{example.id}:rejected")
        kind = rng.choice(sorted(options))
        stats.pairs += 1
        stats.kinds[kind] += 1
        stats.gold_positions[example.gold] += 1
        stats.sources[len(example.prompt.sources)] += 1
        yield PreferencePair(example, rng.choice(options[kind]), kind)
    stats.questions = builder.stats.questions
    stats.skipped.update(builder.stats.skipped)


def write_pairs(
    squad_path: str | Path,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    chunk_words: int = DEFAULT_CHUNK_WORDS,
    **build_kw,
) -> PairStats:
    """Preference pairs from a SQuAD file (paragraphs cut into chunks) into a JSONL file, whole."""
    squad = chunk_squad(load_squad(squad_path), chunk_words)
    stats = PairStats()
    rows = (pair.to_row() for pair in build_pairs(squad, tokenizer, stats=stats, **build_kw))
    write_rows(rows, out, lambda: f"{squad_path}: skipped {dict(stats.skipped)}")
    return stats


def read_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    """Pairs written by write_pairs (the first `limit`); rows are checked by rag.llm.align.read_jsonl."""
    from rag.llm.align import DPO_KEYS, read_jsonl

    rows = read_jsonl(path, DPO_KEYS)[:limit]
    missing = [k for k in ("sources", "answers", "gold", "kind", "drawn") if k not in rows[0]]
    if missing:
        raise ValueError(f"{path}: not a `rag train pairs` file (rows lack {missing})")
    return [PreferencePair.from_row(r) for r in rows]


def summarize_policy(rows: list[dict], examples: list[ReaderExample]) -> dict:
    """rag.eval_reader's summary of scored answers (score_reader_output rows: SQuAD EM/F1, citation
    precision = the cited source contains a gold answer, gold citation rate) plus citation support
    (the cited source backs the cited words: rag.citations' check) and the share of cited answers."""
    from rag.eval_reader import summarize_reader

    supported = [
        c.supported
        for row, ex in zip(rows, examples, strict=True)
        for c in parse_citations(row["output"], ex.prompt.sources)
        if c.valid
    ]
    return summarize_reader(rows) | {
        "citation_support": sum(supported) / len(supported) if supported else None,
        "answers_with_citation": sum(r["citations"] > 0 for r in rows) / len(rows),
        "examples": len(rows),
    }


def evaluate_policy(
    model_dir: str | Path,
    pairs: list[PreferencePair],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict:
    """A policy's greedy answers to the pairs' prompts, decoded and scored as `rag eval reader`
    does (rag.eval_reader.decode_and_score), summarized by summarize_policy."""
    from rag.eval_reader import decode_and_score
    from rag.reader_data import load_reader

    reader, _ = load_reader(model_dir, device, max_new_tokens)
    examples = [p.example for p in pairs]
    rows = [m for _, m, _ in decode_and_score(reader, examples, batch_size=batch_size, grounded=False)]
    cut = sum(r["finish"] == "length" for r in rows)
    return summarize_policy(rows, examples) | {"cut_at_max_new_tokens": cut}


def evaluate_baseline(pairs: list[PreferencePair]) -> dict:
    """rag.eval_reader's word-overlap baseline (the source sentence sharing most words with the
    question, cited) on the pairs' prompts: the bar a policy's citations should clear."""
    from rag.eval_reader import overlap_baseline, score_reader_output

    examples = [p.example for p in pairs]
    texts = [overlap_baseline(ex.prompt.question, ex.prompt.sources) for ex in examples]
    rows = [score_reader_output(t, ex) for t, ex in zip(texts, examples, strict=True)]
    return summarize_policy(rows, examples)


def preference_margins(model_dir: str | Path, pairs: list[PreferencePair], batch: int = 16) -> list[float]:
    """log pi(chosen | prompt) - log pi(rejected | prompt) of a checkpoint, per pair."""
    import torch

    from rag.llm.align import DPO_KEYS, collate, prompt_tokens, response_tokens, sequence_logprobs
    from rag.llm.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(model_dir)
    model.eval()
    margins: list[float] = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            rows = [p.to_row() for p in pairs[i : i + batch]]
            items = [
                (prompt_tokens(tokenizer, r), response_tokens(tokenizer, r[k]))
                for k in DPO_KEYS
                for r in rows
            ]
            x, targets = collate(items, tokenizer.pad_id)
            logp = sequence_logprobs(model(x).logits, targets)
            margins += (logp[: len(rows)] - logp[len(rows) :]).tolist()
    return margins


def implicit_reward_accuracy(policy: list[float], reference: list[float]) -> float:
    """Share of pairs DPO's implicit reward beta * log(pi / pi_ref) ranks right, from the policy's and
    the reference's preference_margins on the same pairs (the policy raised the chosen answer over
    the rejected one more than the reference did): comparable, pair for pair, to a reward model's
    pairwise accuracy."""
    return sum(p > r for p, r in zip(policy, reference, strict=True)) / len(policy)


def answer_reward(text: str, example: ReaderExample) -> float:
    """The task's own check as a reward: the share of the answer's valid citations whose source
    holds a gold answer (citation precision, 0 without one) plus the answer's SQuAD F1; in [0, 2]."""
    from rag.eval_reader import score_reader_output

    row = score_reader_output(text, example)
    valid = row["citations"] - row["invalid"]
    return (row["precise"] / valid if valid else 0.0) + row["f1"]


def citation_scorer(pairs: list[PreferencePair], tokenizer: Tokenizer):
    """A PPO score_fn (rag.llm.rlhf.ppo) scoring each sampled answer with answer_reward on its
    prompt's example: PPO with an exact reward, to tell a failing reward model from failing PPO."""
    import torch

    examples = {tuple(p.example.prompt.ids): p.example for p in pairs}

    def score(seq, mask, n_prompt: int):
        rewards = []
        for row, keep in zip(seq.tolist(), mask.bool().tolist(), strict=True):
            response = [t for t, k in zip(row[n_prompt:], keep, strict=True) if k]
            text = tokenizer.decode(response, skip_special=True).strip()
            rewards.append(answer_reward(text, examples[tuple(row[:n_prompt])]))
        return torch.tensor(rewards)

    return score


def train_ppo_on_citations(pairs_path: str | Path, init: str | Path, out_dir: str | Path, cfg) -> dict:
    """`rag train ppo --citation-reward`: PPO of init on the pairs' prompts against citation_scorer."""
    from rag.llm.checkpoint import load_checkpoint
    from rag.llm.rlhf import run_ppo

    policy, tokenizer = load_checkpoint(init)
    pairs = read_pairs(pairs_path)
    prompts = [p.example.prompt.ids for p in pairs]
    return run_ppo(policy, tokenizer, prompts, citation_scorer(pairs, tokenizer), Path(out_dir), cfg)


def reward_accuracy(reward_dir: str | Path, pairs: list[PreferencePair]) -> dict[str, float]:
    """A reward model's pairwise accuracy (chosen scored higher) on the pairs, overall and per kind."""
    from rag.llm.rlhf import encode_pairs, load_reward_model, pairwise_accuracy
    from rag.llm.train import context_length

    model, tokenizer = load_reward_model(reward_dir)
    max_len = context_length(model.trunk.config)
    per_kind, right, scored = {}, 0, 0
    for kind in KINDS:  # each pair scored once; "all" is the kinds' pooled count
        rows = [p.to_row() for p in pairs if p.kind == kind]
        if rows:
            encoded = encode_pairs(rows, tokenizer, max_len)
            per_kind[kind] = pairwise_accuracy(model, encoded, tokenizer.pad_id)
            right += round(per_kind[kind] * len(encoded))
            scored += len(encoded)
    return {"all": right / scored, **per_kind} if scored else {}
