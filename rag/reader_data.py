"""Reader training data from SQuAD v1.1: numbered sources + question -> "answer [n]" or abstention.

Each question becomes one prompt built by `rag.prompt.build_prompt`, the very function that builds
prompts at answer time, so the model is trained on exactly what it will be shown:

- a number of sources drawn per row, uniformly from 1..sources (default DEFAULT_SOURCES, the
  serving default k): answers are served over however many passages were retrieved and fit, so
  every citation number up to k must be seen in training, and short prompts too;
- the gold paragraph plus distractors, other paragraphs of the same article first (hard negatives:
  same topic and title, so the model must read rather than match the title), then random
  paragraphs of other articles; the gold is put at a random position among the row's sources, so
  `[n]` must be read off the prompt, not memorised (over rows of 1..k sources, position j holds
  the gold in a share (H_k - H_{j-1}) / k of rows: 46% [1] ... 4% [5] for k = 5, BuildStats shows it);
- the gold paragraph is never cut before its answer: where the budget would cut it, it moves in
  front of the last (cut) distractor; if it does not fit alone, the question is skipped (and
  counted);
- a fraction of abstention rows: the gold paragraph is left out, and so is every paragraph that
  names a gold answer, inflected too (rag.squad.mentions_answer: a same-topic paragraph that says
  "Warsaw's" would make "not in the documents" a wrong label); the target is `rag.prompt.ABSTAIN`.

Rows are deterministic per (seed, question id): the same question gets the same prompt whatever
`limit` or the order of the file, so training and evaluation data can be rebuilt exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from tqdm import tqdm

from rag.llm.tokenizer import Tokenizer
from rag.prompt import ABSTAIN, Prompt, Source, build_prompt, build_source_prompt
from rag.squad import mentions_answer

if TYPE_CHECKING:
    from rag.answer import Reader

# The defaults of `rag train reader-data`, `rag eval reader` and evaluate_reader, defined here only.
DEFAULT_SOURCES = 5  # most sources per row: the serving default k (rag ask --k, POST /v1/ask "k")
DEFAULT_ABSTAIN = 0.1  # share of abstention rows
DEFAULT_MAX_TOKENS = 1024 - 96  # without a model: the default context minus rag.answer's answer room
DEFAULT_BATCH_SIZE = 8  # evaluation prompts decoded together
OTHER_ARTICLE_TRIES = 50  # random draws per missing distractor before giving up on more


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    question: str
    answers: tuple[str, ...]  # distinct gold answers, the first is the training target
    answer_end: int | None  # where the target answer ends in its paragraph; None: not found in it
    article: int
    paragraph: int
    ambiguous: bool = False  # the answer occurs more than once in its paragraph and the rebuilt
    # train file may point at the wrong copy ("n_occurrences"): no exact span to train on


@dataclass
class Squad:
    titles: list[str]  # per article, readable ("Super Bowl 50", not "Super_Bowl_50")
    contexts: list[list[str]]  # article -> paragraphs
    questions: list[SquadQuestion]


def _answer_end(context: str, answer: dict) -> int | None:
    """End offset of the answer; its own offset when it matches the text, else its first occurrence."""
    text, start = answer["text"], answer.get("answer_start")
    if isinstance(start, int) and context[start : start + len(text)] == text:
        return start + len(text)
    found = context.find(text)
    return found + len(text) if found >= 0 else None


def load_squad(path: str | Path) -> Squad:
    """SQuAD v1.1 JSON (plain or .gz): data -> paragraphs -> context, qas -> id, question, answers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a SQuAD JSON file ({e})") from e
    squad = Squad([], [], [])
    try:
        for a, article in enumerate(raw["data"]):
            squad.titles.append(" ".join(unquote(article.get("title") or "").replace("_", " ").split()))
            squad.contexts.append([p["context"] for p in article["paragraphs"]])
            for p, para in enumerate(article["paragraphs"]):
                for qa in para["qas"]:
                    if not isinstance(qa["question"], str) or not isinstance(para["context"], str):
                        raise TypeError("question or context is not a string")
                    texts = [x["text"].strip() for x in qa["answers"]]
                    answers = tuple(dict.fromkeys(t for t in texts if t))
                    first = next((x for x in qa["answers"] if x["text"].strip()), None)
                    end = _answer_end(para["context"], first) if first else None
                    many = bool(first and first.get("n_occurrences", 1) > 1)
                    squad.questions.append(
                        SquadQuestion(str(qa["id"]), qa["question"], answers, end, a, p, many)
                    )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path}: not SQuAD v1.1 (expected data -> paragraphs -> context, qas -> id, question, "
            f"answers[text, answer_start]; bad or missing {e})"
        ) from None
    if not squad.questions:
        raise ValueError(f"{path}: no questions")
    return squad


@dataclass
class ReaderExample:
    id: str
    question: str
    answers: tuple[str, ...]
    prompt: Prompt
    gold: int | None  # number of the gold source; None on abstention rows
    target: str  # the SFT answer: "answer [gold]" or ABSTAIN
    drawn: int  # sources drawn for the row; the prompt shows fewer when the budget or paragraphs run out

    def to_row(self) -> dict:
        """The SFT JSONL row (rag.llm.align reads prompt_ids + answer)."""
        return {"prompt_ids": self.prompt.ids, "answer": self.target, "id": self.id, "gold": self.gold}


@dataclass
class BuildStats:
    questions: int = 0  # questions considered (after limit)
    rows: int = 0
    abstain: int = 0  # rows whose target is ABSTAIN
    fewer_sources: int = 0  # rows showing fewer sources than drawn (the budget, or too few paragraphs)
    skipped: Counter = field(default_factory=Counter)  # reason -> questions
    gold_positions: Counter = field(default_factory=Counter)  # gold n -> rows
    sources: Counter = field(default_factory=Counter)  # sources shown -> rows

    def to_dict(self) -> dict:
        return {
            "questions": self.questions,
            "rows": self.rows,
            "answerable": self.rows - self.abstain,
            "abstain": self.abstain,
            "fewer_sources": self.fewer_sources,
            "skipped": dict(sorted(self.skipped.items())),
            "gold_positions": dict(sorted(self.gold_positions.items())),
            "sources": dict(sorted(self.sources.items())),
        }


def select_questions(n: int, limit: int | None, seed: int, offset: int = 0) -> list[int]:
    """Indices of the questions to use: all, or a seeded sample of `limit` in file order.

    A slice of one seeded permutation, so a larger limit keeps every question of a smaller one, a
    sample covers many articles (SQuAD's first article alone has hundreds of questions), and
    `offset` gives a disjoint sample (e.g. to calibrate on questions the evaluation does not use).
    """
    if (limit is None or limit >= n) and not offset:
        return list(range(n))
    order = list(range(n))
    random.Random(f"{seed}:limit").shuffle(order)
    end = None if limit is None else offset + limit
    return sorted(order[offset:end])


class ExampleBuilder:
    """Turns SQuAD questions into reader examples; see the module docstring for the recipe.

    sources: the most sources a row shows (each row draws 1..sources); abstain: the share of
    abstention rows; max_tokens: the prompt budget (see load_reader for a model's).
    """

    def __init__(
        self,
        squad: Squad,
        tokenizer: Tokenizer,
        *,
        sources: int = DEFAULT_SOURCES,
        abstain: float = DEFAULT_ABSTAIN,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int = 0,
        per_source: bool = False,
    ):
        """per_source: the reader reads each source in a prompt of its own (rag.prompt.
        build_source_prompt), so max_tokens bounds each source's prompt, not their sum."""
        if sources < 1:
            raise ValueError(f"sources must be >= 1, got {sources}")
        if not 0.0 <= abstain <= 1.0:
            raise ValueError(f"abstain must be in [0, 1], got {abstain}")
        self.squad, self.tokenizer = squad, tokenizer
        self.n_sources, self.abstain, self.max_tokens, self.seed = sources, abstain, max_tokens, seed
        self.per_source = per_source
        self.stats = BuildStats()

    def prompt(self, question: str, picks: list[tuple[int, int]]) -> Prompt:
        """The prompt over (article, paragraph) picks in order; doc_id/chunk_id say which they are."""
        passages = []
        for a, p in picks:
            text = self.squad.contexts[a][p]
            passages.append(Source(0, self.squad.titles[a], 1, 0, len(text), text, doc_id=a, chunk_id=p))
        if self.per_source:  # ids are the reader's business; sources are shown as each prompt reads them
            read = [
                build_source_prompt(self.tokenizer, question, replace(s, n=n), self.max_tokens).source
                for n, s in enumerate(passages, 1)
            ]
            return Prompt(ids=[], sources=read, question=" ".join(question.split()))
        return build_prompt(self.tokenizer, question, passages, self.max_tokens)

    def distractors(
        self, q: SquadQuestion, count: int, rng: random.Random, without_answer: bool
    ) -> list[tuple[int, int]]:
        """(article, paragraph) pairs other than the gold: the same article first, then others."""

        def usable(a: int, p: int) -> bool:
            return not (without_answer and mentions_answer(self.squad.contexts[a][p], q.answers))

        same = [(q.article, p) for p in range(len(self.squad.contexts[q.article])) if p != q.paragraph]
        rng.shuffle(same)
        picks = list(islice((ap for ap in same if usable(*ap)), count))  # checks no more than needed
        n_articles = len(self.squad.contexts)
        for _ in range(OTHER_ARTICLE_TRIES * (count - len(picks))):
            if len(picks) >= count or n_articles < 2:
                break
            a = rng.randrange(n_articles)
            p = rng.randrange(len(self.squad.contexts[a]))
            if a != q.article and (a, p) not in picks and usable(a, p):
                picks.append((a, p))
        return picks

    def answerable(self, q: SquadQuestion, k: int, rng: random.Random) -> tuple[Prompt, int] | None:
        """Gold + k - 1 distractors, the gold at a random position among the sources the budget holds.

        The budget's source count is measured with the gold first, so the gold is shown whole. Any
        position is drawn first; if the gold would be cut there before its answer (the last source
        may be cut), a position before the last is drawn: the sources in front of the cut are then
        the same ones as with the gold first, so the gold is shown whole and the last distractor is
        cut instead (showing fewer distractors would waste the room). Under a tight budget the gold
        still lands in front more often: it can only be the cut last source where its answer lies
        within the room left; BuildStats.gold_positions shows the spread.
        """
        others = self.distractors(q, k - 1, rng, without_answer=False)
        gold = (q.article, q.paragraph)
        fit = len(self.prompt(q.question, [gold, *others]).sources)
        order = others[: max(fit - 1, 0)]
        for positions in (fit, fit - 1):  # any position, then any but the last
            if positions < 1:
                break
            pos = rng.randrange(positions)
            prompt = self.prompt(q.question, [*order[:pos], gold, *order[pos:]])
            if pos < len(prompt.sources) and prompt.sources[pos].end >= q.answer_end:
                return prompt, pos + 1
        return None

    def example(self, q: SquadQuestion) -> ReaderExample | str:
        """The example for one question, or the reason it is skipped."""
        if not q.answers:
            return "no_answer"
        if q.answer_end is None:
            return "answer_not_in_context"
        if not q.question.strip():
            return "empty_question"
        rng = random.Random(f"{self.seed}:{q.id}")
        k = rng.randint(1, self.n_sources)
        try:
            if rng.random() < self.abstain:
                picks = self.distractors(q, k, rng, without_answer=True)
                prompt = self.prompt(q.question, picks)
                if not prompt.sources:
                    return "no_source_without_answer"
                return ReaderExample(q.id, q.question, q.answers, prompt, None, ABSTAIN, k)
            found = self.answerable(q, k, rng)
        except ValueError:  # build_prompt: not even the question fits the budget
            return "question_does_not_fit"
        if found is None:
            return "gold_does_not_fit"
        prompt, gold = found
        return ReaderExample(q.id, q.question, q.answers, prompt, gold, f"{q.answers[0]} [{gold}]", k)

    def __call__(
        self, limit: int | None = None, progress: bool = False, offset: int = 0
    ) -> Iterator[ReaderExample]:
        """Examples for the selected questions (see select_questions), counting into self.stats."""
        chosen = select_questions(len(self.squad.questions), limit, self.seed, offset)
        for i in tqdm(chosen, desc="reader data", unit="q", disable=not progress, dynamic_ncols=True):
            self.stats.questions += 1
            ex = self.example(self.squad.questions[i])
            if isinstance(ex, str):
                self.stats.skipped[ex] += 1
                continue
            self.stats.rows += 1
            if ex.gold is None:
                self.stats.abstain += 1
            else:
                self.stats.gold_positions[ex.gold] += 1
            self.stats.sources[len(ex.prompt.sources)] += 1
            self.stats.fewer_sources += len(ex.prompt.sources) < ex.drawn
            yield ex


def load_reader(
    model_dir: str | Path, device: str = "cpu", max_new_tokens: int | None = None
) -> tuple[Reader, int]:
    """A reader checkpoint and its prompt budget: block_size - max_new_tokens (None: the reader's).

    The room `rag ask` leaves a prompt, so rows built for (or evaluated on) a model are as long as
    the prompts it is served; training data and evaluation both size prompts here.
    """
    from rag.answer import Reader  # imports torch: only where a checkpoint is used

    reader = Reader.load(model_dir, device, max_new_tokens=max_new_tokens)  # None: the reader's default
    return reader, reader.block_size - reader.max_new_tokens


def write_rows(rows: Iterable[dict], out: str | Path, source: Callable[[], str]) -> int:
    """Write JSONL rows to `out` whole (a temporary file renamed into place); the number written.
    No rows: nothing is written and ValueError says `source()` (the input and its skip reasons)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    if not n:
        tmp.unlink()
        raise ValueError(f"no rows built from {source()}")
    os.replace(tmp, out)
    return n


def write_reader_data(
    squad_path: str | Path,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    limit: int | None = None,
    progress: bool = False,
    **builder_kw,
) -> BuildStats:
    """Build SFT rows from a SQuAD file into a JSONL file (written whole, then renamed into place)."""
    builder = ExampleBuilder(load_squad(squad_path), tokenizer, **builder_kw)
    rows = (ex.to_row() for ex in builder(limit, progress))
    write_rows(rows, out, lambda: f"{squad_path}: skipped {dict(builder.stats.skipped)}")
    return builder.stats
