"""The reader's prompt: numbered sources, the question, then the answer the model writes.

One function builds it, for training data and for answering alike, so the model is always asked
in exactly the format it was trained on:

    <|bos|><source>[1] Title · page 3
    chunk text
    <source>[2] Other title · page 1
    chunk text
    <question>What is ...?
    <answer>The answer [1].<|eos|>

Special tokens (`<source>`, `<question>`, `<answer>`) are inserted as ids, never parsed out of
document or user text, so a document cannot fake a marker. Each source header shows its number as
`[n]`, the very string the answer cites, which a small model learns to copy. Sources that do not
fit the token budget are dropped from the end (retrieval order: the best first); a source that
only partly fits is cut at a word boundary, and its span records the cut, so a citation still
points at exactly the text the model saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from rag.llm.tokenizer import ANSWER, QUESTION, SOURCE, Tokenizer

ABSTAIN = "The documents do not contain the answer."
MAX_QUESTION_TOKENS = 128  # a longer question is cut: sources, not the question, carry the answer
MIN_SOURCE_TOKENS = 32  # a source cut shorter than this is left out rather than shown as a stub


@dataclass(frozen=True)
class Source:
    """One numbered source in a prompt: what `[n]` in the answer points to.

    `page`, `start` and `end` locate `text` in the document: `page_text[start:end] == text`
    (offsets per page, as chunks store them).
    """

    n: int
    title: str
    page: int
    start: int
    end: int
    text: str
    doc_id: int | None = None
    chunk_id: int | None = None
    path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prompt:
    ids: list[int]  # BOS ... <answer>: what the model is given
    sources: list[Source]  # in prompt order, numbered 1..len
    question: str  # as shown (possibly cut)
    dropped: int = 0  # sources left out for lack of room


def source_header(n: int, title: str, page: int) -> str:
    title = " ".join(title.split()) or "untitled"
    return f"[{n}] {title} · page {page}\n"


def _cut_to_tokens(tokenizer: Tokenizer, text: str, budget: int) -> str:
    """The longest prefix of `text` ending at a word boundary whose tokens fit in `budget`."""
    ids = tokenizer.encode(text)
    if len(ids) <= budget:
        return text
    prefix = tokenizer.decode(ids[:budget])
    prefix = prefix.rstrip("\ufffd")  # a character split between tokens decodes as U+FFFD
    cut = max(prefix.rfind(" "), prefix.rfind("\n"))
    prefix = prefix[:cut] if cut > 0 else prefix
    # decode(encode(x)) == x, so the prefix is a prefix of text; guard anyway: offsets depend on it
    return prefix if text.startswith(prefix) else ""


def build_prompt(
    tokenizer: Tokenizer,
    question: str,
    passages: Sequence[Source],
    max_tokens: int,
) -> Prompt:
    """Prompt ids for `question` over `passages` (best first; their `n` is reassigned 1..k in the
    order kept), fitting in `max_tokens` (the model's context minus room for the answer).

    Raises ValueError when not even the question fits.
    """
    question = " ".join(question.split())
    if not question:
        raise ValueError("question is empty")
    q_ids = tokenizer.encode(question)
    if len(q_ids) > MAX_QUESTION_TOKENS:
        question = _cut_to_tokens(tokenizer, question, MAX_QUESTION_TOKENS) or tokenizer.decode(
            q_ids[:MAX_QUESTION_TOKENS]
        )
        q_ids = tokenizer.encode(question)
    tail = [tokenizer.token_id(QUESTION), *q_ids, tokenizer.token_id(ANSWER)]
    room = max_tokens - 1 - len(tail)  # 1 for BOS
    if room < 0:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for the question ({len(tail) + 1} tokens)")

    body: list[int] = []
    kept: list[Source] = []
    for passage in passages:
        n = len(kept) + 1
        header = [
            tokenizer.token_id(SOURCE),
            *tokenizer.encode(source_header(n, passage.title, passage.page)),
        ]
        text_room = room - len(body) - len(header) - 1  # 1 for the newline after the text
        if text_room < MIN_SOURCE_TOKENS:
            break
        text = _cut_to_tokens(tokenizer, passage.text, text_room)
        piece = tokenizer.encode(text + "\n")
        if not text.strip() or len(body) + len(header) + len(piece) > room:
            break
        body += header + piece
        kept.append(replace(passage, n=n, end=passage.start + len(text), text=text))
    ids = [tokenizer.bos_id, *body, *tail]
    return Prompt(ids=ids, sources=kept, question=question, dropped=len(passages) - len(kept))


# ------------------------------------------------------------------------------- one source per prompt
# The warm-started reader (a BERT-sized encoder, 512 positions) reads each source in a prompt of
# its own, question first, and its answers are compared across sources (rag.llm.grounded):
#
#     <|bos|><question> question <source>[n] Title · page p chunk text <answer>
#
# Five 200-token sources and a question do not fit 512 positions; one source does, so nothing is
# dropped for lack of room and every source is read whole (or cut at its end, recorded in its span).


@dataclass
class SourcePrompt:
    """One source's prompt. Its text tokens are ids[text_start : text_start + len(offsets)], and
    offsets[i] is token i's (start, end) in source.text, so a span of tokens maps back to the
    source's own characters (case and accents included, though WordPiece reads them uncased)."""

    ids: list[int]
    source: Source  # as read: text and end cut where the budget cut it
    question: str
    text_start: int
    offsets: list[tuple[int, int]]
    cut: bool = False  # the source's text was cut to fit

    @property
    def text_end(self) -> int:
        return self.text_start + len(self.offsets)

    def char_span(self, first: int, last: int) -> tuple[int, int]:
        """Character span in source.text of text tokens first..last (inclusive)."""
        return self.offsets[first][0], self.offsets[last][1]


def _question_ids(tokenizer, question: str) -> tuple[str, list[int]]:
    question = " ".join(question.split())
    if not question:
        raise ValueError("question is empty")
    q_ids = tokenizer.encode(question)
    if len(q_ids) > MAX_QUESTION_TOKENS:
        question = _cut_to_tokens(tokenizer, question, MAX_QUESTION_TOKENS) or question
        q_ids = tokenizer.encode(question)[:MAX_QUESTION_TOKENS]
    return question, q_ids


def build_source_prompt(tokenizer, question: str, source: Source, max_tokens: int) -> SourcePrompt:
    """The prompt for `question` over one `source`, at most `max_tokens` ids (context minus answer
    room). A text too long for the room is cut after its last whole word that fits.

    Raises ValueError when the question and header leave less than MIN_SOURCE_TOKENS for the text.
    """
    question, q_ids = _question_ids(tokenizer, question)
    header = tokenizer.encode(source_header(source.n, source.title, source.page).strip())
    head = [tokenizer.bos_id, tokenizer.token_id(QUESTION), *q_ids, tokenizer.token_id(SOURCE), *header]
    room = max_tokens - len(head) - 1  # 1 for <answer>
    if room < MIN_SOURCE_TOKENS:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for a source after the question")
    ids, offsets = tokenizer.encode_offsets(source.text)
    cut = len(ids) > room
    if cut:
        keep = room
        while keep > 1 and tokenizer.continues[ids[keep]]:  # never end inside a word
            keep -= 1
        ids, offsets = ids[:keep], offsets[:keep]
        end = offsets[-1][1]
        source = replace(source, end=source.start + end, text=source.text[:end])
    return SourcePrompt(
        ids=[*head, *ids, tokenizer.token_id(ANSWER)],
        source=source,
        question=question,
        text_start=len(head),
        offsets=[tuple(o) for o in offsets],
        cut=cut,
    )
