"""Byte-level BPE: exact round-trips for any Unicode, special tokens that cannot be injected, persistence."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tqdm import tqdm

from rag.llm.tokenizer import (
    ANSWER,
    BOS,
    EOS,
    MIN_VOCAB_SIZE,
    PAD,
    QUESTION,
    SOURCE,
    SPECIAL_TOKENS,
    Tokenizer,
    iter_text_blocks,
    train_tokenizer,
)

MULTILINGUAL = [
    "",
    " ",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy. ŘŠČŽÝÁÍÉ ůú",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇨🇿 ❤️",
    "中文字符和日本語のテキスト、한국어",
    "def f(x):\n\tif x:\n\t\treturn  x   *  2\r\n\n\n    # trailing   \t",
    "mixed\u00a0nbsp\u200bzero-width\ufeffbom \x00 nul \x7f del \U0010ffff",
    "combining: e\u0301 a\u0308 vs é ä",  # must NOT be normalized to NFC
    "<answer> <source> <question> <|eos|> <|bos|> <|pad|> <answer",
]


@pytest.fixture(scope="module")
def tok(shared_data: Path) -> Tokenizer:
    text = (shared_data / "lm" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    return Tokenizer.train([text, *MULTILINGUAL], vocab_size=1024)


def test_vocab_layout(tok: Tokenizer) -> None:
    assert tok.vocab_size == 1024 == len(tok)
    ids = {s: tok.token_id(s) for s in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids[BOS], ids[EOS], ids[PAD])
    assert tok.special_ids == frozenset(ids.values())
    # all 256 single bytes are tokens, so no text is ever unknown
    assert {tok.token_bytes(i) for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1} >= {
        bytes([b]) for b in range(256)
    }
    with pytest.raises(KeyError, match="unknown special token"):
        tok.token_id("<nope>")


def test_merges_compress_english(tok: Tokenizer) -> None:
    text = "ROMEO: But soft, what light through yonder window breaks?"
    assert len(tok.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_fixed_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not tok.special_ids & set(ids)
    assert tok.decode(tok.encode(text, allow_special=True)) == text


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_allow_special_maps_markers_to_ids(tok: Tokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    ids = tok.encode(text, allow_special=True)
    assert tok.decode(ids) == text
    # every marker in the text is exactly one special id, in order
    specials_in_ids = [i for i in ids if i in tok.special_ids]
    expected = [tok.token_id(m) for m in tok._special_re.findall(text)]
    assert specials_in_ids == expected
    assert tok.decode(ids, skip_special=True) == tok._special_re.sub("", text)


def test_user_text_cannot_inject_specials(tok: Tokenizer) -> None:
    doc = f"A document that says {ANSWER} and {SOURCE} {QUESTION} {EOS}."
    plain = tok.encode(doc)
    assert not tok.special_ids & set(plain)
    assert tok.decode(plain) == doc
    templated = tok.encode(f"{QUESTION} why?{ANSWER}", allow_special=True)
    assert templated[0] == tok.token_id(QUESTION) and templated[-1] == tok.token_id(ANSWER)
    assert tok.encode("x", add_bos=True, add_eos=True) == [tok.bos_id, *tok.encode("x"), tok.eos_id]
    assert tok.encode_batch([doc, "x"], add_eos=True) == [
        plain + [tok.eos_id],
        tok.encode("x") + [tok.eos_id],
    ]


def test_decode_skip_special_and_bad_ids(tok: Tokenizer) -> None:
    ids = [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    assert tok.decode(ids) == f"{BOS}hi{EOS}"
    assert tok.decode(ids, skip_special=True) == "hi"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-100])
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_split_character_decodes_to_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji is not one token in a 1k vocab: decoding a prefix breaks it
    assert tok.decode(ids[:1]) == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_decoder_matches_full_decode(tok: Tokenizer, data: st.DataObject) -> None:
    """Random ids (often invalid UTF-8): pieces concatenate to decode(); valid text never shows U+FFFD."""
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    dec = tok.stream_decoder(skip_special=True)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special=True)

    # lone surrogates (category Cs) are not valid Unicode text: encode refuses them by design
    chars = st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",))
    text = data.draw(st.text(chars, max_size=40))
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text


def test_save_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)  # a directory resolves to its tokenizer.json
    for text in MULTILINGUAL:
        assert again.encode(text) == tok.encode(text)
        assert again.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert again.vocab_size == tok.vocab_size and again.special_ids == tok.special_ids


def test_load_errors(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
    spec = json.loads(tok.to_json())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != ANSWER]
    del spec["model"]["vocab"][ANSWER]
    (tmp_path / "nospecial.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="lacks the special tokens"):
        Tokenizer.load(tmp_path / "nospecial.json")
    spec = json.loads(tok.to_json())
    spec["normalizer"] = {"type": "NFC"}
    (tmp_path / "lossy.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="lossless"):
        Tokenizer.load(tmp_path / "lossy.json")


def test_vocab_size_too_small() -> None:
    with pytest.raises(ValueError, match="vocab_size must be"):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE - 1)


def test_train_tokenizer_from_gz_and_plain_files(tmp_path: Path) -> None:
    lines = [f"line {i}: Žluťoučký kůň {i * 7} ü\n" for i in range(3000)]
    (tmp_path / "a.txt").write_text("".join(lines[:1500]), encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines[1500:]))
    paths = [tmp_path / "a.txt", tmp_path / "b.txt.gz"]

    blocks = list(iter_text_blocks(paths, block_chars=1000))
    assert "".join(blocks) == "".join(lines)
    assert all(b.endswith("\n") for b in blocks)  # cut at line ends
    assert len("".join(iter_text_blocks(paths, max_chars=5000, block_chars=1000))) == 5000

    tok = train_tokenizer(paths, tmp_path / "out" / "tokenizer.json", vocab_size=400, show_progress=False)
    assert tok.vocab_size == 400
    assert Tokenizer.load(tmp_path / "out" / "tokenizer.json").encode(lines[0]) == tok.encode(lines[0])
    assert len(tok.encode("Žluťoučký kůň")) <= 4  # frequent words became single tokens


def test_train_tokenizer_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t.json", show_progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 20)
    with pytest.raises(
        ValueError,
        match=r"latin1\.txt: 40 invalid UTF-8 .* first 220 char.* line 1\); is it in another encoding",
    ):
        train_tokenizer([tmp_path / "latin1.txt"], tmp_path / "t.json", show_progress=False)
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"fake\.gz: not a readable gzip file"):
        train_tokenizer([tmp_path / "fake.gz"], tmp_path / "t.json", show_progress=False)
    with pytest.raises(ValueError, match="no corpus files"):
        train_tokenizer([], tmp_path / "t.json")


def test_text_blocks_replace_count_and_warn_on_stray_bad_bytes(tmp_path: Path) -> None:
    """One bad byte is replaced and reported (file, count, line); a genuine U+FFFD is not counted."""
    lines = [f"{i} ünïcode line, already replaced: \ufffd\n" for i in range(400)]
    raw = "".join(lines).encode("utf-8")
    bad_at = raw.index(b"\xc3", len("".join(lines[:2]).encode()))  # first byte of "ü" on line 3
    (tmp_path / "bad.txt").write_bytes(raw[:bad_at] + b"\xff" + raw[bad_at + 2 :])
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines))
    paths = [tmp_path / "bad.txt", tmp_path / "b.txt.gz"]

    progress = tqdm(total=sum(p.stat().st_size for p in paths), file=io.StringIO())
    with pytest.warns(UnicodeWarning, match=r"bad\.txt: 1 invalid UTF-8 sequences .* line 3\)") as caught:
        blocks = list(iter_text_blocks(paths, block_chars=500, progress=progress))
    assert len(caught) == 1  # the .gz file is clean
    fixed = "".join(lines).replace("2 ü", "2 \ufffd", 1)
    assert "".join(blocks) == fixed + "".join(lines)
    assert len(blocks) > 20 and all(b.endswith("\n") for b in blocks)  # whole lines only
    assert progress.n == progress.total  # advanced by bytes read from disk, compressed for .gz

    with pytest.warns(UnicodeWarning, match="bad.txt"):
        head = "".join(iter_text_blocks(paths, max_chars=len(fixed) + 123, block_chars=500))
    assert head == fixed + "".join(lines)[:123]  # max_chars counts characters over all files


def test_text_blocks_truncated_gz_is_a_clear_error(tmp_path: Path) -> None:
    data = gzip.compress(("word " * 20 + "\n").encode() * 2000)
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.txt\.gz: not a readable gzip file"):
        list(iter_text_blocks([tmp_path / "cut.txt.gz"]))
