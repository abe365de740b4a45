"""WordPiece tokenizer of a BERT-family model, behind the project's `Tokenizer` interface.

The warm-started reader (rag.llm.warmstart) reuses all-MiniLM-L6-v2's weights, so it must read text
the way that model was trained to: its own `tokenizer.json` (uncased WordPiece, 30,522 tokens,
accents stripped), loaded with HuggingFace `tokenizers`. Our special tokens (BOS, EOS, PAD,
<source>, <question>, <answer>) are appended after its vocabulary, and, as in the byte-level
tokenizer, they are only produced on purpose: text that says "<answer>" stays text.

WordPiece is lossy (lowercased, accents and spaces dropped, unknown words become [UNK]), so
`decode` gives readable text, not the original; answers that must show the source's own characters
use `encode_offsets`, which maps every token to its character span in the input.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from rag.llm.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, HFTokenizerFile


class WordPieceTokenizer(HFTokenizerFile):
    """A BERT WordPiece vocabulary plus the RAG special tokens (see the module docstring)."""

    kind = "wordpiece"

    def __init__(self, hf: HFTokenizer):
        spec = json.loads(hf.to_str())
        if (spec.get("model") or {}).get("type") != "WordPiece":
            raise ValueError("not a WordPiece tokenizer.json")
        hf.no_truncation()
        hf.no_padding()
        missing = [s for s in SPECIAL_TOKENS if hf.token_to_id(s) is None]
        if missing:
            hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
        hf.encode_special_tokens = True  # specials are never parsed out of text
        self._tok = hf
        self._special = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}
        self.special_ids = frozenset(self._special.values())
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._special[s] for s in (BOS, EOS, PAD))
        self.unk_id = hf.token_to_id("[UNK]")
        # "##ing" continues the previous word: an answer span may neither start nor end inside a word
        self.continues = [hf.id_to_token(i).startswith("##") for i in range(self.vocab_size)]

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> WordPieceTokenizer:
        """The tokenizer of a sentence-transformers / HF model folder (its tokenizer.json)."""
        return cls.load(Path(path) / "tokenizer.json")

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `text`; special-token strings in it become ids only with `allow_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        self._tok.encode_special_tokens = not allow_special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError as e:  # the Rust side rejects strings it cannot convert to UTF-8
            raise ValueError("text is not valid Unicode (lone surrogate code points?)") from e
        finally:
            self._tok.encode_special_tokens = True
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        head, tail = [self.bos_id] * add_bos, [self.eos_id] * add_eos
        return [head + e.ids + tail for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Readable text of `ids` ("##" pieces joined, specials kept only without skip_special)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} out of range for vocab_size {self.vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = True) -> WordPieceStreamDecoder:
        return WordPieceStreamDecoder(self, skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size})"


class WordPieceStreamDecoder:
    """Incremental decode: each push returns what decoding all ids so far adds to the text before.

    WordPiece joins "##" pieces to the previous word and cleans up spaces before punctuation, so
    the text of a token depends on its neighbours; diffing whole decodes keeps the pieces' sum
    equal to `decode(all ids)`. Answers are a few dozen tokens, so the quadratic cost is nothing.
    """

    def __init__(self, tokenizer: WordPieceTokenizer, skip_special: bool = True):
        self._tok, self._skip = tokenizer, skip_special
        self._ids: list[int] = []
        self._text = ""

    def push(self, token_id: int) -> str:
        if self._skip and token_id in self._tok.special_ids:
            return ""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids, skip_special=self._skip)
        if not text.startswith(self._text):  # cleanup rewrote earlier text: emit nothing new now
            return ""
        piece, self._text = text[len(self._text) :], text
        return piece

    def flush(self) -> str:
        return ""
