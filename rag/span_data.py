"""Training rows for the warm-started reader: one (question, source) prompt per row.

The reader reads each source alone (rag.prompt.build_source_prompt) and answers with a span of it
followed by its citation, or says the answer is not there; answers are then compared across
sources (rag.llm.grounded). So each SQuAD question gives:

- an answer row: the gold paragraph as source [n] (n drawn from 1..DEFAULT_SOURCES, so the citation
  is read off the header, not memorised), target = the paragraph's own tokens covering the gold
  answer, then "[n]" and EOS. The span is located by the answer's character offsets, so the copy
  targets are exact positions, not a search for the string;
- with probability `negatives` (more than 1 adds several), a no-answer row: a paragraph that does
  not name any gold answer (rag.squad.mentions_answer), from the same article first (hard: same
  topic and title), target = EOS alone. This is the "no-answer option" of Clark and Gardner (2018)
  that makes scores comparable across separately read sources.

Questions whose answer occurs several times in the paragraph of the rebuilt train file are skipped
(their offsets may point at the wrong copy), as are answers beyond the prompt budget.
Rows are deterministic per (seed, question id) and written as JSONL of token ids.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rag.prompt import Source, SourcePrompt, build_source_prompt
from rag.reader_data import DEFAULT_SOURCES, Squad, SquadQuestion, load_squad, select_questions, write_rows
from rag.squad import mentions_answer

DEFAULT_NEGATIVES = 0.7  # no-answer rows per question
DEFAULT_CONTEXT = 512  # MiniLM's learned positions
DEFAULT_SPAN_MAX_TOKENS = DEFAULT_CONTEXT - 32  # the prompt budget: the context minus the answer room
ANSWER_TAIL = 4  # after the span: "[", n, "]", EOS


@dataclass
class SpanRow:
    id: str
    prompt: SourcePrompt
    span: tuple[int, int] | None  # text tokens [first, last] of the answer; None: not in this source
    n: int

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "prompt_ids": self.prompt.ids,
            "text_start": self.prompt.text_start,
            "text_len": len(self.prompt.offsets),
            "span": list(self.span) if self.span else None,
            "n": self.n,
        }


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last token overlapping characters [start, end); None when no token does."""
    hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (hit[0], hit[-1]) if hit else None


@dataclass
class SpanStats:
    questions: int = 0
    answer_rows: int = 0
    no_answer_rows: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "questions": self.questions,
            "answer_rows": self.answer_rows,
            "no_answer_rows": self.no_answer_rows,
            "skipped": dict(sorted(self.skipped.items())),
        }


class SpanRowBuilder:
    def __init__(
        self,
        squad: Squad,
        tokenizer,
        *,
        negatives: float = DEFAULT_NEGATIVES,
        max_tokens: int = DEFAULT_SPAN_MAX_TOKENS,
        seed: int = 0,
        context: int = DEFAULT_CONTEXT,
    ):
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        self.squad, self.tokenizer = squad, tokenizer
        self.negatives, self.max_tokens, self.seed, self.context = negatives, max_tokens, seed, context
        self.stats = SpanStats()

    def source(self, a: int, p: int, n: int) -> Source:
        text = self.squad.contexts[a][p]
        return Source(n, self.squad.titles[a], 1, 0, len(text), text, doc_id=a, chunk_id=p)

    def no_answer_paragraph(self, q: SquadQuestion, rng: random.Random, taken: set) -> tuple[int, int] | None:
        same = [(q.article, p) for p in range(len(self.squad.contexts[q.article])) if p != q.paragraph]
        rng.shuffle(same)
        for a, p in same:
            if (a, p) not in taken and not mentions_answer(self.squad.contexts[a][p], q.answers):
                return a, p
        for _ in range(50):
            a = rng.randrange(len(self.squad.contexts))
            p = rng.randrange(len(self.squad.contexts[a]))
            if a != q.article and not mentions_answer(self.squad.contexts[a][p], q.answers):
                return a, p
        return None

    def rows(self, q: SquadQuestion) -> list[SpanRow] | str:
        """The rows of one question, or the reason it gives none."""
        if not q.answers or q.answer_end is None:
            return "no_answer_in_context"
        if q.ambiguous:
            return "ambiguous_offset"
        rng = random.Random(f"{self.seed}:{q.id}")
        n = rng.randint(1, DEFAULT_SOURCES)
        try:
            prompt = build_source_prompt(
                self.tokenizer, q.question, self.source(q.article, q.paragraph, n), self.max_tokens
            )
        except ValueError:
            return "question_does_not_fit"
        span = token_span(prompt.offsets, q.answer_end - len(q.answers[0]), q.answer_end)
        if span is None or prompt.source.end < q.answer_end:
            return "answer_beyond_budget"
        if len(prompt.ids) + span[1] - span[0] + 1 + ANSWER_TAIL > self.context:
            return "answer_too_long_for_the_context"
        rows = [SpanRow(q.id, prompt, span, n)]
        count = int(self.negatives) + (rng.random() < self.negatives % 1)
        taken = {(q.article, q.paragraph)}
        for k in range(count):
            pick = self.no_answer_paragraph(q, rng, taken)
            if pick is None:
                break
            taken.add(pick)
            m = rng.randint(1, DEFAULT_SOURCES)
            try:
                neg = build_source_prompt(self.tokenizer, q.question, self.source(*pick, m), self.max_tokens)
            except ValueError:
                break
            rows.append(SpanRow(f"{q.id}:neg{k}", neg, None, m))
        return rows

    def __call__(self, limit: int | None = None, progress: bool = False) -> Iterator[SpanRow]:
        chosen = select_questions(len(self.squad.questions), limit, self.seed)
        for i in tqdm(chosen, desc="span rows", unit="q", disable=not progress, dynamic_ncols=True):
            self.stats.questions += 1
            rows = self.rows(self.squad.questions[i])
            if isinstance(rows, str):
                self.stats.skipped[rows] += 1
                continue
            for row in rows:
                if row.span is None:
                    self.stats.no_answer_rows += 1
                else:
                    self.stats.answer_rows += 1
                yield row


def write_span_rows(
    squad_path: str | Path,
    tokenizer,
    out: str | Path,
    *,
    limit: int | None = None,
    progress: bool = False,
    **builder_kw,
) -> SpanStats:
    """Build the rows of a SQuAD file into a JSONL file (written whole, then renamed into place)."""
    builder = SpanRowBuilder(load_squad(squad_path), tokenizer, **builder_kw)
    rows = (row.to_row() for row in builder(limit, progress))
    write_rows(rows, out, lambda: f"{squad_path}: skipped {dict(builder.stats.skipped)}")
    return builder.stats
