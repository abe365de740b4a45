"""Split pages into overlapping chunks measured in characters and in the embedding model's tokens.

Tokens alone make chunk size depend on the script: the bundled English WordPiece vocabulary
spends one token on ~4.5 characters of English but on ~1.2 of Russian or Czech, so a 200-token
chunk held 900 characters of one and 220 of the other. With `chunk_chars` set, a chunk ends at
that many characters (the same amount of text in any script) or at `chunk_tokens` tokens,
whichever comes first, and neighbours overlap by about `overlap_chars` characters.

Each page is tokenized once (with character offsets); cut points are then chosen from
precomputed boundary tables in O(1) per chunk, so a 1,000-page PDF costs one tokenizer pass
plus one batched check of the chunks, never a tokenization per candidate chunk.
Cuts prefer, in order: paragraph break, sentence end, line break, whitespace, word edge (punctuation),
and only then a cut between two tokens of one word.
"""

from __future__ import annotations

import re

import numpy as np
from tokenizers import Tokenizer

from rag.config import Settings
from rag.types import Chunk, Document, Page


def _codepoints(chars: str) -> np.ndarray:
    return np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


# Boundary strength of the gap *before* token k (higher wins).
TOKEN, WORD, SPACE, LINE, SENTENCE, PARAGRAPH = range(6)
_SENTENCE_END = _codepoints(".!?…。！？؟।")
_FULLWIDTH_END = _codepoints("。！？")  # CJK sentences end without a following space
_CLOSERS = _codepoints("\"')]}»”’」』")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SEGMENT_CHARS = 100_000  # long pages are tokenized in pieces cut at whitespace (bounded memory)


def _backend(tokenizer) -> Tokenizer:
    """A private copy of the Rust tokenizer without truncation or padding.

    Copied because HF tokenizers keep the truncation/padding of their last call in the shared
    backend; the embedder truncates at 256 tokens, which would silently cut our pages.
    """
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"Chunker needs a HF *fast* tokenizer with offset mappings, got {type(tokenizer).__name__}"
        )
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return own


def _segments(text: str, size: int) -> list[int]:
    """Start offsets of pieces of about `size` chars, cut after whitespace where there is some."""
    starts = [0]
    while len(text) - starts[-1] > size:
        limit = starts[-1] + size
        lo = limit - size // 4
        cut = max(text.rfind(ch, lo, limit) for ch in " \n\t")
        starts.append(cut + 1 if cut >= lo else limit)
    return starts


def _tokenizable(text: str) -> str:
    """Lone UTF-16 surrogates (from broken PDFs) made U+FFFD: the Rust tokenizer rejects them,
    and a same-length substitute keeps every offset valid for the original text."""
    return _SURROGATE.sub("\ufffd", text)


def chunking_id(settings: Settings) -> str:
    """How `rag ingest` chunks under these settings, as an index records it (`rag ingest --rebuild`)."""
    if not settings.chunk_chars:
        return f"{settings.chunk_tokens} tokens, overlap {settings.chunk_overlap}"
    return (
        f"{settings.chunk_chars} characters, overlap {settings.chunk_overlap_chars}, "
        f"at most {settings.chunk_tokens} tokens"
    )


class Chunker:
    """No chunk exceeds `chunk_tokens` tokens, nor `chunk_chars` characters unless one token is
    longer. Neighbours share about `overlap` tokens, or `overlap_chars` characters when sizes are
    in characters (`chunk_chars` set)."""

    def __init__(
        self,
        tokenizer,
        chunk_tokens: int = 200,
        overlap: int = 40,
        *,
        chunk_chars: int | None = None,
        overlap_chars: int = 0,
    ):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if not 0 <= overlap < chunk_tokens:
            raise ValueError(
                f"overlap must be in [0, chunk_tokens), got {overlap} with chunk_tokens={chunk_tokens}"
            )
        if chunk_chars is not None and not 0 <= overlap_chars < chunk_chars:
            raise ValueError(
                f"overlap_chars must be in [0, chunk_chars), got {overlap_chars} "
                f"with chunk_chars={chunk_chars}"
            )
        self.tokenizer = _backend(tokenizer)
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.chunk_chars = chunk_chars
        self.overlap_chars = overlap_chars
        # A boundary cut is taken only if the chunk keeps at least this many tokens; otherwise cut hard.
        self.min_tokens = min(chunk_tokens, max(chunk_tokens // 2, overlap + 1))

    @classmethod
    def from_settings(cls, tokenizer, settings: Settings) -> Chunker:
        """The chunker `rag ingest` uses: sizes from RAG_CHUNK_* (chunk_chars 0 = tokens only)."""
        if not settings.chunk_chars:
            return cls(tokenizer, settings.chunk_tokens, settings.chunk_overlap)
        return cls(
            tokenizer,
            settings.chunk_tokens,
            min(settings.chunk_overlap, settings.chunk_tokens - 1),
            chunk_chars=settings.chunk_chars,
            overlap_chars=settings.chunk_overlap_chars,
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without special tokens: the unit of `chunk_tokens`."""
        return len(self.tokenizer.encode(_tokenizable(text), add_special_tokens=False).ids)

    def _tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Char offsets (n, 2) and pre-tokenizer word index (n,) of every token, in one batched pass."""
        text = _tokenizable(text)
        starts = _segments(text, _SEGMENT_CHARS)
        pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
        offs, words, seen = [], [], 0
        for enc, a in zip(self.tokenizer.encode_batch(pieces, add_special_tokens=False), starts, strict=True):
            offs.append(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + a)
            w = np.asarray([-1 if x is None else x for x in enc.word_ids], dtype=np.int64) + seen
            words.append(w)
            seen = int(w.max(initial=seen)) + 1  # word indices restart in every segment
        offs, words = np.concatenate(offs), np.concatenate(words)
        keep = offs[:, 1] > offs[:, 0]  # zero-width tokens cannot anchor a span
        return offs[keep], words[keep]

    @staticmethod
    def _levels(text: str, offs: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Strength of the boundary before each token (index 0 unused), vectorized over the page."""
        cps = _codepoints(text)
        newline_at = np.flatnonzero(cps == 10)
        prev_end, start = offs[:-1, 1], offs[1:, 0]
        gap = start - prev_end
        newlines = np.searchsorted(newline_at, start) - np.searchsorted(newline_at, prev_end)
        last = cps[prev_end - 1]
        before_last = cps[np.maximum(prev_end - 2, 0)]
        mark = np.where(np.isin(last, _CLOSERS), before_last, last)  # 'end." ' ends a sentence too
        sentence = np.isin(mark, _SENTENCE_END) & ((gap > 0) | np.isin(mark, _FULLWIDTH_END))
        levels = np.zeros(len(offs), dtype=np.int8)
        levels[1:] = np.select(
            [newlines >= 2, sentence, newlines > 0, gap > 0, words[1:] != words[:-1]],
            [PARAGRAPH, SENTENCE, LINE, SPACE, WORD],
            TOKEN,
        )
        return levels

    def _char_limits(self, offs: np.ndarray) -> np.ndarray | None:
        """fit[i]: end (exclusive) of the longest token run from i within `chunk_chars` characters."""
        if self.chunk_chars is None:
            return None
        fit = np.searchsorted(offs[:, 1], offs[:, 0] + self.chunk_chars, side="right")
        return np.maximum(fit, np.arange(1, len(offs) + 1))  # one token longer than the limit: alone

    def _spans(self, text: str, offs: np.ndarray, levels: np.ndarray, verify: bool) -> list[tuple[int, int]]:
        """Token ranges [i, j) of the chunks, chosen greedily left to right."""
        n = len(offs)
        idx = np.arange(n)
        char_fit = self._char_limits(offs)
        # last_at[L][k]: largest b <= k whose boundary level is >= L (or -1).
        last_at = [np.maximum.accumulate(np.where(levels >= lv, idx, -1)) for lv in range(PARAGRAPH + 1)]
        # next_word[k]: smallest b >= k that starts a word (or n).
        next_word = np.minimum.accumulate(np.where(levels >= WORD, idx, n)[::-1])[::-1]
        spans: list[tuple[int, int]] = []
        i = j = 0
        while i < n:
            prev_end, hi = j, min(i + self.chunk_tokens, n)
            if char_fit is None:
                lo = i + self.min_tokens
            else:  # sized in characters: a boundary cut must keep at least half the characters
                hi = min(hi, int(char_fit[i]))
                half = int(np.searchsorted(offs[i:hi, 1], offs[i, 0] + self.chunk_chars // 2))
                lo = i + max(1, min(half, (hi - i) // 2))
            lo = max(lo, prev_end + 1)  # each chunk must end later than the previous one
            j = hi
            if hi < n:
                for lv in (PARAGRAPH, SENTENCE, LINE, SPACE, WORD):
                    b = last_at[lv][hi]
                    if b >= lo:
                        j = int(b)
                        break
            if verify:
                i, j = self._fit(text, offs, i, j, prev_end)
            spans.append((i, j))
            if j >= n:
                break
            i = self._next_start(i, j, last_at, next_word, offs)
        return spans

    def _fit(self, text: str, offs: np.ndarray, i: int, j: int, floor: int) -> tuple[int, int]:
        """Shrink tokens [i, j) until their text, tokenized alone, fits: cut alone, a piece of a word
        can take more tokens than in context. The end stays above `floor` so no chunk is redundant."""
        while j - i > 1 and self.count_tokens(text[offs[i, 0] : offs[j - 1, 1]]) > self.chunk_tokens:
            if j - 1 > floor:
                j -= 1
            else:
                i += 1
        return i, j

    def _next_start(
        self, i: int, j: int, last_at: list[np.ndarray], next_word: np.ndarray, offs: np.ndarray
    ) -> int:
        """Start the next chunk about `overlap` tokens (or `overlap_chars` characters) before `j`,
        at a sentence or word start.

        Starting mid-word would make the chunk's text tokenize differently from the page.
        """
        if self.chunk_chars is None:
            back = self.overlap
        else:  # tokens that start within overlap_chars of the chunk's end
            back = j - int(np.searchsorted(offs[:j, 0], offs[j - 1, 1] - self.overlap_chars))
        if back == 0:
            return j
        target = max(j - back, i + 1)  # a chunk shrunk by the re-tokenization check may be short
        slack = max(1, back // 4)
        for lv in (SENTENCE, WORD):
            b = int(last_at[lv][target])
            if b >= target - slack and b > i:
                return b
        if (b := int(next_word[target])) < j:  # the first word start after the target: less overlap
            return b
        if (b := int(last_at[WORD][target])) > i:  # or further back: more overlap
            return b
        return target

    def chunk_page(self, page: Page) -> list[Chunk]:
        """Chunks of one page; `page.text[c.start:c.end] == c.text`, never empty, never padded by spaces."""
        text = page.text
        if not text.strip():
            return []
        offs, words = self._tokenize(text)
        if len(offs) == 0:
            return []
        levels = self._levels(text, offs, words)
        spans = self._spans(text, offs, levels, verify=False)
        texts = [_tokenizable(text[offs[i, 0] : offs[j - 1, 1]]) for i, j in spans]
        counts = [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        if max(counts) > self.chunk_tokens:  # rare: a cut inside a word re-tokenized longer
            spans = self._spans(text, offs, levels, verify=True)
        return [
            Chunk(page.number, int(offs[i, 0]), int(offs[j - 1, 1]), text[offs[i, 0] : offs[j - 1, 1]])
            for i, j in spans
        ]

    def chunk_document(self, doc: Document) -> list[Chunk]:
        """Chunks of all pages in order; offsets are per page."""
        return [chunk for page in doc.pages for chunk in self.chunk_page(page)]
