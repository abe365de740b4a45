"""Byte-level BPE tokenizer (HuggingFace `tokenizers` for training and encoding).

Byte level so that ANY Unicode string round-trips exactly: the base vocabulary holds all 256
bytes, so nothing is ever unknown, and there is no normalizer to rewrite the text.

Special tokens mark the RAG prompt structure. Text is encoded with `allow_special=False` by
default, so a document that literally contains "<answer>" cannot inject a control token;
templates that mean the markers pass `allow_special=True` (or insert `token_id(...)` directly).

Decoding maps every id to its raw bytes and decodes UTF-8 once at the end, which is also what
`StreamDecoder` does incrementally for generation.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import warnings
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from tqdm import tqdm

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SOURCE = "<source>"
QUESTION = "<question>"
ANSWER = "<answer>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, SOURCE, QUESTION, ANSWER)

DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte plus the specials
_BLOCK_CHARS = 1 << 20  # corpus text is fed to the trainer in ~1M-char blocks cut at line ends
MAX_BAD_UTF8 = 10  # invalid UTF-8 sequences tolerated in any file (with a warning) ...
MAX_BAD_UTF8_SHARE = 1e-3  # ... plus this share of its characters; more means a wrong encoding


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _check_lossless(hf: HFTokenizer) -> None:
    """Refuse tokenizer.json files whose pipeline would not round-trip text exactly."""
    spec = json.loads(hf.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        raise ValueError("not a lossless byte-level BPE tokenizer (normalizer or prefix space); retrain it")


class HFTokenizerFile:
    """What every tokenizer of ours shares: a HuggingFace `tokenizers` pipeline (`self._tok`) kept
    in one tokenizer.json, and the special-token ids (`self._special`). Subclasses build themselves
    from the loaded pipeline (`cls(hf)`)."""

    _tok: HFTokenizer
    _special: dict[str, int]

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(hf)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (a directory gets `tokenizer.json` inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        return self._tok.to_str()

    def token_id(self, special: str) -> int:
        if special not in self._special:
            raise KeyError(f"unknown special token {special!r}; known: {list(SPECIAL_TOKENS)}")
        return self._special[special]


class Tokenizer(HFTokenizerFile):
    """Byte-level BPE with the RAG special tokens; see the module docstring."""

    def __init__(self, hf: HFTokenizer):
        _check_lossless(hf)
        self._tok = hf
        # Specials are only ever produced on purpose (allow_special or token_id), never found in text.
        self._tok.encode_special_tokens = True
        missing = [s for s in SPECIAL_TOKENS if hf.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with Tokenizer.train")
        self._special = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}
        self.special_ids = frozenset(self._special.values())
        self.vocab_size: int = hf.get_vocab_size()
        self.bos_id = self._special[BOS]
        self.eos_id = self._special[EOS]
        self.pad_id = self._special[PAD]
        self._bytes = [self._token_bytes(i) for i in range(self.vocab_size)]
        self._special_re = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(SPECIAL_TOKENS, key=len, reverse=True)) + ")"
        )

    def _token_bytes(self, i: int) -> bytes:
        token = self._tok.id_to_token(i)
        if i in self.special_ids:
            return token.encode("utf-8")
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in token)
        except KeyError as e:
            raise ValueError(f"token {i} ({token!r}) is not byte-level BPE; retrain the tokenizer") from e

    # ---- training and persistence -------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, show_progress: bool = False
    ) -> Tokenizer:
        """Learn merges from `texts` (any iterable of strings, streamed; long strings are fine)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def train_from_files(
        cls,
        paths: Sequence[str | Path],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        max_chars: int | None = None,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train on UTF-8 text files (`.gz` allowed), reading at most `max_chars` characters in all."""
        return cls.train(iter_text_blocks(paths, max_chars), vocab_size, show_progress=show_progress)

    # ---- encoding and decoding ----------------------------------------------------------------

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `text`. Special-token strings in it become ids only with `allow_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if allow_special:
            ids: list[int] = []
            for i, piece in enumerate(self._special_re.split(text)):
                # re.split with one group alternates: text, special, text, special, ...
                if i % 2:
                    ids.append(self._special[piece])
                elif piece:
                    ids.extend(self._encode_plain(piece))
        else:
            ids = self._encode_plain(text)
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError as e:  # the Rust side rejects strings it cannot convert to UTF-8
            raise ValueError("text is not valid Unicode (lone surrogate code points?)") from e

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Plain-text encode of many strings at once (parallel in Rust); specials are never parsed."""
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        head, tail = [self.bos_id] * add_bos, [self.eos_id] * add_eos
        return [head + e.ids + tail for e in fast(texts, add_special_tokens=False)]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} out of range for vocab_size {self.vocab_size}")
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        table = self._bytes
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental decode for streaming: a character split across tokens is emitted only once complete.

    Python's incremental UTF-8 decoder buffers an unfinished multi-byte sequence, so pieces never
    contain a broken character, and their concatenation equals `decode(all ids)` exactly.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._table = tokenizer._bytes
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token (often "", e.g. mid-character or a skipped special)."""
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._table[token_id])

    def flush(self) -> str:
        """End of stream: an unfinished trailing sequence becomes U+FFFD, as in `decode`."""
        return self._utf8.decode(b"", final=True)


def iter_text_blocks(
    paths: Sequence[str | Path],
    max_chars: int | None = None,
    block_chars: int = _BLOCK_CHARS,
    progress: tqdm | None = None,
) -> Iterator[str]:
    """Text of UTF-8 files (plain or .gz) in blocks of whole lines, up to `max_chars` characters in all.

    Blocks hold about `block_chars` bytes (characters, for ASCII) and end at a line end, so no word
    is cut in two. `progress` (a tqdm) advances by bytes read from disk, compressed ones for .gz, so
    its total is the sum of the file sizes.

    Invalid UTF-8 becomes U+FFFD and is counted; a UnicodeWarning then names the file, the count and
    the first bad line. One flipped byte in a 10 GB corpus should neither kill hours of preparation
    nor pass unnoticed. More than a stray few (over MAX_BAD_UTF8 + MAX_BAD_UTF8_SHARE of the
    characters read) means the file is in another encoding such as latin-1: that raises ValueError at
    the first block, since a tokenizer or model trained on mojibake is a wasted run. So does a .gz
    file that is not gzip or is truncated.
    """
    remaining = max_chars if max_chars is not None else float("inf")
    for path in map(Path, paths):
        if remaining <= 0:
            return
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        try:
            remaining -= yield from _file_blocks(path, block_chars, remaining, progress)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from e


def _file_blocks(
    path: Path, block_chars: int, limit: float, progress: tqdm | None
) -> Generator[str, None, int]:
    """Blocks of one file (see iter_text_blocks); returns the number of characters yielded."""
    chars = lines = bad = seen = 0
    first_bad = None
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        while chars < limit:
            data = stream.read(int(min(block_chars, limit - chars)))
            if not data:
                break
            data += stream.readline()  # finish the line; UTF-8 never has b"\n" inside a character
            try:
                block = data.decode("utf-8")
            except UnicodeDecodeError as e:
                first_bad = first_bad or lines + data.count(b"\n", 0, e.start) + 1
                block = data.decode("utf-8", errors="replace")
                bad += block.count("\ufffd") - data.count("\ufffd".encode())  # minus genuine U+FFFD
            lines += data.count(b"\n")
            block = block[: int(min(len(block), limit - chars))]
            chars += len(block)
            if bad > MAX_BAD_UTF8 + MAX_BAD_UTF8_SHARE * chars:
                raise ValueError(
                    f"{path}: {bad} invalid UTF-8 sequences in its first {chars:,} characters "
                    f"(first on line {first_bad}); is it in another encoding? Convert it with iconv"
                )
            if progress is not None:
                progress.update(raw.tell() - seen)
                seen = raw.tell()
            yield block
        if progress is not None:  # the gzip trailer, or nothing
            progress.update(raw.tell() - seen)
    if bad:
        warnings.warn(
            f"{path}: {bad} invalid UTF-8 sequences replaced by U+FFFD (first on line {first_bad})",
            UnicodeWarning,
            stacklevel=2,
        )
    return chars


def train_tokenizer(
    corpus_paths: Sequence[str | Path],
    out_path: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_chars: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """CLI entry: train on the corpus files and save tokenizer.json to `out_path`."""
    if not corpus_paths:
        raise ValueError("no corpus files given")
    tok = Tokenizer.train_from_files(corpus_paths, vocab_size, max_chars, show_progress=show_progress)
    tok.save(out_path)
    return tok


def load_tokenizer(path: str | Path):
    """The tokenizer saved at `path` (a tokenizer.json or its folder), byte-level BPE or WordPiece
    (rag.llm.wordpiece, the warm-started reader's), told apart by the file's model type."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            kind = (json.loads(path.read_text(encoding="utf-8")).get("model") or {}).get("type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            kind = None
        if kind == "WordPiece":
            from rag.llm.wordpiece import WordPieceTokenizer

            return WordPieceTokenizer.load(path)
    return Tokenizer.load(path)
