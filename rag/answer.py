"""Answering: retrieved hits -> the reader's prompt -> our decoder -> text with checked citations.

One pipeline for the CLI (`rag ask`), the REST API (`/v1/ask`) and evaluation, so every entry point
answers the same way. Streaming is the primitive: `answer` drains `stream`, so the streamed pieces
are, by construction, the final text.

Without sources there is nothing to cite, so the reader abstains without calling the model: a
small model asked with no context would answer from its weights, which is what RAG is meant to
avoid.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from rag.citations import Citation, parse_citations
from rag.llm.checkpoint import load_checkpoint
from rag.llm.generate import CompiledDecoder, GenerationConfig, stream
from rag.llm.grounded import DEFAULT_STARTS, RowRead, SourceReader, evidence_spans
from rag.llm.model import GPT
from rag.llm.tokenizer import Tokenizer
from rag.prompt import ABSTAIN, Prompt, Source, SourcePrompt, build_prompt, build_source_prompt
from rag.retrieve import Retriever
from rag.squad import answer_text
from rag.types import Hit

T = TypeVar("T")
DEFAULT_MAX_NEW_TOKENS = 96  # answers are short: a span and its citation, or the abstention sentence
CALIBRATION_FILE = "reader.json"  # next to a checkpoint: the abstention threshold chosen on dev data
DEFAULT_ABSTAIN_MARGIN = 0.0  # before calibration: answer when the span beats the abstention path
DEFAULT_SELECT_WEIGHT = 1.0  # before calibration: rank sources by the margin (see Reader.choose)


class ReaderUnavailable(ValueError):
    """No usable reader checkpoint; the message names the path and how to get one."""


@dataclass
class Answer:
    question: str
    text: str  # generated text, stripped; special tokens never appear
    abstained: bool  # text is ABSTAIN, or there were no sources (then no model call)
    citations: list[Citation]
    sources: list[Source]  # all sources the model was shown, numbered 1..k
    finish_reason: str  # "stop" | "length" | "no_sources" | "no_room" (max_new_tokens left no room for any)
    timings: dict[str, float] = field(default_factory=dict)
    evidence: list[dict] = field(default_factory=list)  # source spans the answer steps attended to most
    cut_sources: list[int] = field(default_factory=list)  # sources read only in part (their span says where)
    scores: dict[str, float] = field(default_factory=dict)  # the grounded reader's span/abstention scores
    quote: dict | None = None  # grounded answers: the source span the text is (n, page, start, end, ...)

    def to_dict(self) -> dict:
        """The JSON shape shared by `rag ask --json` and `POST /v1/ask`."""
        return {
            "question": self.question,
            "answer": self.text,
            "abstained": self.abstained,
            "citations": [c.to_dict() for c in self.citations],
            "sources": [s.to_dict() for s in self.sources],
            "finish_reason": self.finish_reason,
            "timings": self.timings,
            "evidence": self.evidence,
            "cut_sources": self.cut_sources,
            "scores": self.scores,
            "quote": self.quote,
        }


def hit_to_source(hit: Hit) -> Source:
    """A retrieval hit as a prompt source (n=0: build_prompt numbers the sources it keeps)."""
    return Source(
        n=0,
        title=hit.title,
        page=hit.page,
        start=hit.start,
        end=hit.end,
        text=hit.text,
        doc_id=hit.doc_id,
        chunk_id=hit.chunk_id,
        path=hit.path,
    )


def is_abstention(text: str) -> bool:
    """The text says ABSTAIN (ignoring case, spacing, the final stop and any citation marker)."""
    return answer_text(text).casefold().rstrip(".!") == ABSTAIN.casefold().rstrip(".")


def _stripped(pieces: Generator[str, None, T]) -> Generator[str, None, T]:
    """Re-yield text pieces as pieces of the stripped text: leading space dropped, trailing space
    held back until more text follows, so the output joins to "".join(pieces).strip() and no piece
    is ever retracted. Returns what `pieces` returns."""
    held, started = "", False
    while True:
        try:
            piece = next(pieces)
        except StopIteration as end:
            return end.value
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = piece.rstrip()
        if body:
            yield held + body
            held = ""
        held += piece[len(body) :]


def drain(answer: Generator[str, None, Answer], on_piece: Callable[[str], object] | None = None) -> Answer:
    """Run a `stream`/`ask_stream` generator to its end, passing each text piece to on_piece (e.g.
    print it), and return its Answer: the one loop every front end needs."""
    while True:
        try:
            piece = next(answer)
        except StopIteration as end:
            return end.value
        if on_piece is not None:
            on_piece(piece)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _check_vocab(model: GPT, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:  # e.g. a tokenizer.json of another model
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )


class Reader:
    """Our trained decoder as a question answerer over sources.

    Two kinds of checkpoint: the from-scratch decoder reads all sources in one prompt and writes its
    answer freely (rag.prompt.build_prompt); the warm-started reader (a copy head) reads each source
    in a prompt of its own and answers with a span of the best one (rag.llm.grounded), abstaining
    when the best span's margin over the abstention path is below `abstain_margin`.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int | None = None,
        decoder: CompiledDecoder | None = None,
        abstain_margin: float = DEFAULT_ABSTAIN_MARGIN,
        starts: int = DEFAULT_STARTS,
        select_weight: float = DEFAULT_SELECT_WEIGHT,
    ):
        """max_new_tokens: the default answer room, DEFAULT_MAX_NEW_TOKENS, or half the context of
        a model too small for that."""
        _check_vocab(model, tokenizer)
        self.model, self.tokenizer, self.decoder = model, tokenizer, decoder
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, self.block_size // 2)
        self.max_new_tokens = max_new_tokens
        self._check_room(max_new_tokens)
        self.source_reader = SourceReader(model, tokenizer, starts=starts) if model.copy is not None else None
        self.abstain_margin, self.select_weight = abstain_margin, select_weight

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", **kw) -> Reader:
        """The reader from a checkpoint folder (rag.llm.checkpoint); ReaderUnavailable if missing or
        unreadable, with a message fit for the user (the API shows it as a 503)."""
        path = Path(model_dir)
        if not path.is_dir():
            raise ReaderUnavailable(
                f"no reader model at {path}: train one with `make reader` / see docs/user-guide.md"
            )
        try:
            model, tokenizer = load_checkpoint(path, device)
            _check_vocab(model, tokenizer)
            calibration = path / CALIBRATION_FILE
            if calibration.is_file():  # what `rag eval reader --save-calibration` chose
                saved = json.loads(calibration.read_text())
                kw.setdefault("abstain_margin", float(saved["abstain_margin"]))
                kw.setdefault("starts", int(saved.get("starts", DEFAULT_STARTS)))
                kw.setdefault("select_weight", float(saved.get("select_weight", DEFAULT_SELECT_WEIGHT)))
        except Exception as e:  # corrupt json, torn safetensors (SafetensorError), wrong shapes, ...
            raise ReaderUnavailable(f"reader model at {path} cannot be loaded: {e}") from e
        return cls(model, tokenizer, **kw)  # bad keywords (max_new_tokens) are the caller's ValueError

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def _check_room(self, max_new_tokens: int) -> None:
        if not 0 < max_new_tokens < self.block_size:
            raise ValueError(
                f"max_new_tokens must be in [1, {self.block_size - 1}] for a model context of "
                f"{self.block_size} tokens, got {max_new_tokens}"
            )

    def prompt(self, question: str, hits: Sequence[Hit], max_new_tokens: int | None = None) -> Prompt:
        """The prompt for `question` over `hits` (best first), leaving room for the answer in the
        model's context: budget = block_size - max_new_tokens (default: the reader's)."""
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_room(max_new)
        sources = [hit_to_source(h) for h in hits]
        return build_prompt(self.tokenizer, question, sources, self.block_size - max_new)

    def _generation_config(self, config: GenerationConfig | None) -> GenerationConfig:
        """The given config, or the default: greedy, stop at EOS, the reader's max_new_tokens."""
        return config if config is not None else GenerationConfig(max_new_tokens=self.max_new_tokens)

    def stream(
        self, question: str, hits: Sequence[Hit], config: GenerationConfig | None = None
    ) -> Generator[str, None, Answer]:
        """Yield answer text pieces as they become final; return the full Answer (citations are
        parsed once the text is complete): `answer = yield from reader.stream(...)`.

        Bad input (empty question, max_new_tokens too large) raises here, at the call, before any
        piece: an HTTP stream can still answer 422 instead of failing halfway.
        """
        return self.stream_sources(question, [hit_to_source(h) for h in hits], config)

    def stream_sources(
        self, question: str, sources: Sequence[Source], config: GenerationConfig | None = None
    ) -> Generator[str, None, Answer]:
        """`stream` over prompt sources (best first; renumbered 1..k) instead of retrieval hits."""
        config = self._generation_config(config)
        question = question.strip()
        if self.source_reader is not None:
            prompts = self.source_prompts(question, sources, config.max_new_tokens)
            return self._stream_sources(question, prompts, config)
        self._check_room(config.max_new_tokens)
        prompt = build_prompt(self.tokenizer, question, sources, self.block_size - config.max_new_tokens)
        return self._stream(question, prompt, config)

    def source_prompts(
        self, question: str, sources: Sequence[Source], max_new_tokens: int | None = None
    ) -> list[SourcePrompt]:
        """One prompt per source (the warm-started reader), numbered 1..k in the given order; a
        source too long for the room left by max_new_tokens is cut at its end (SourcePrompt.cut)."""
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_room(max_new)
        if not " ".join(question.split()):
            raise ValueError("question is empty")
        prompts = []
        for source in sources:
            if not source.text.strip():
                continue
            n = len(prompts) + 1
            prompts.append(
                build_source_prompt(self.tokenizer, question, replace(source, n=n), self.block_size - max_new)
            )
        return prompts

    def _stream_sources(
        self, question: str, prompts: list[SourcePrompt], config: GenerationConfig
    ) -> Generator[str, None, Answer]:
        sources = [p.source for p in prompts]
        if not prompts:
            yield ABSTAIN
            timings = {"generate_ms": 0.0, "prompt_tokens": 0, "new_tokens": 0}
            return Answer(question, ABSTAIN, True, [], [], "no_sources", timings)
        start, timings = time.perf_counter(), {}
        reads = self.source_reader.read(prompts, config.grounded, config.max_new_tokens, timings=timings)
        best = self.choose(reads)
        text, evidence, quote = (
            (ABSTAIN, [], None) if best is None else self.render(prompts, best, config.grounded)
        )
        yield text
        timings |= {
            "generate_ms": _ms(start),
            "prompt_tokens": sum(len(p.ids) for p in prompts),
            "new_tokens": len(best.token_ids) if best else 0,
        }
        cite_start = time.perf_counter()
        citations = parse_citations(text, sources)
        timings["cite_ms"] = _ms(cite_start)
        scores = {}
        if reads:
            top = best or self.choose(reads, abstain_margin=-math.inf) or reads[0]
            scores = {
                "span_logprob": top.span_logprob,
                "margin": top.margin,
                "abstain_margin": self.abstain_margin,
            }
        return Answer(
            question,
            text,
            best is None,
            citations,
            sources,
            "stop",
            timings,
            evidence=evidence,
            cut_sources=[p.source.n for p in prompts if p.cut],
            scores=scores,
            quote=quote,
        )

    def render(
        self, prompts: Sequence[SourcePrompt], read: RowRead, grounded: bool = True
    ) -> tuple[str, list[dict], dict | None]:
        """(answer text, evidence, quote) of one source's read. Grounded: the source's own
        characters at the span's offsets + its [n]; free: the decoded tokens as the model wrote them."""
        if not grounded:
            return self.tokenizer.decode(read.token_ids, skip_special=True).strip(), [], None
        prompt = prompts[read.row]
        a, b = prompt.char_span(*read.span)
        src = prompt.source
        quote = {
            "n": src.n,
            "doc_id": src.doc_id,
            "path": src.path,
            "page": src.page,
            "start": src.start + a,
            "end": src.start + b,
            "text": src.text[a:b],
        }
        return f"{src.text[a:b]} [{src.n}]", evidence_spans(prompt, read.evidence), quote

    def choose(
        self,
        reads: Sequence[RowRead],
        select_weight: float | None = None,
        abstain_margin: float | None = None,
    ) -> RowRead | None:
        """The source whose answer scores best, or None to abstain.

        Sources are ranked by span_logprob - select_weight * abstain_logprob: the span's own score,
        and how sure the reader is that the answer is in that source at all (weight 1 ranks by the
        margin; calibrated on dev data, more weight on the second part picks the gold more often).
        The reader abstains when no source yields a span, or the chosen span's margin over its
        abstention path is below abstain_margin."""
        weight = self.select_weight if select_weight is None else select_weight
        margin = self.abstain_margin if abstain_margin is None else abstain_margin
        found = [r for r in reads if r.token_ids]
        if not found:
            return None
        best = max(found, key=lambda r: r.span_logprob - weight * r.abstain_logprob)
        return best if best.margin >= margin else None

    def _stream(
        self, question: str, prompt: Prompt, config: GenerationConfig
    ) -> Generator[str, None, Answer]:
        if not prompt.sources:  # nothing retrieved, or no room for any: nothing to answer from
            yield ABSTAIN  # streamed like any answer: the pieces are always the text
            timings = {"generate_ms": 0.0, "prompt_tokens": 0, "new_tokens": 0}
            reason = "no_room" if prompt.dropped else "no_sources"
            return Answer(question, ABSTAIN, True, [], [], reason, timings)
        start = time.perf_counter()
        result = yield from _stripped(stream(self.model, self.tokenizer, prompt.ids, config, self.decoder))
        text = result.text.strip()
        timings = {
            "generate_ms": _ms(start),
            "prompt_tokens": result.prompt_tokens,
            "new_tokens": len(result.token_ids),
        }
        citations = parse_citations(text, prompt.sources)
        return Answer(
            question, text, is_abstention(text), citations, prompt.sources, result.finish_reason, timings
        )

    def answer(self, question: str, hits: Sequence[Hit], config: GenerationConfig | None = None) -> Answer:
        """The whole answer at once (same result as draining `stream`)."""
        return drain(self.stream(question, hits, config))

    def answer_sources(
        self, question: str, sources: Sequence[Source], config: GenerationConfig | None = None
    ) -> Answer:
        """`answer` over prompt sources instead of retrieval hits."""
        return drain(self.stream_sources(question, sources, config))


def ask_stream(
    question: str,
    retriever: Retriever,
    reader: Reader,
    *,
    k: int = 5,
    mode: str = "hybrid",
    config: GenerationConfig | None = None,
) -> Generator[str, None, Answer]:
    """Retrieve the top-k chunks for `question` (now: bad input raises at the call), then stream
    the reader's answer over them; the Answer's timings include "retrieve_ms"."""
    start = time.perf_counter()
    hits = retriever.search(question, k, mode)
    retrieve_ms = _ms(start)
    return _with_timing(reader.stream(question, hits, config), retrieve_ms=retrieve_ms)


def _with_timing(answer: Generator[str, None, Answer], **timings: float) -> Generator[str, None, Answer]:
    result = yield from answer
    result.timings = {**timings, **result.timings}
    return result


def ask(
    question: str,
    retriever: Retriever,
    reader: Reader,
    *,
    k: int = 5,
    mode: str = "hybrid",
    config: GenerationConfig | None = None,
) -> Answer:
    """Retrieval + reader in one call; timings include "retrieve_ms"."""
    return drain(ask_stream(question, retriever, reader, k=k, mode=mode, config=config))
