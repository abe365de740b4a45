"""Token files: streaming tokenization to uint16 memmaps, train/val split, rank-sharded sampling."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rag.llm.cli import app
from rag.llm.data import (
    DataError,
    IndexSampler,
    TokenWindows,
    check_vocab_fits,
    open_tokens,
    prepare_corpus,
    tokenizer_hash,
)
from rag.llm.tokenizer import Tokenizer

WORDS = [
    "the",
    "king",
    "queen",
    "river",
    "stone",
    "light",
    "dark",
    "sings",
    "walks",
    "over",
    "under",
    "slowly",
    "bright",
    "cold",
    "old",
    "young",
]


def toy_text(n_lines: int, seed: int = 0) -> str:
    """Patterned English-like lines (plus some non-ASCII) that a tiny model learns in seconds."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b, c = rng.sample(WORDS, 3)
        lines.append(f"The {a} {b} the {c}. Ünïcode {rng.randint(0, 9)}!\n")
    return "".join(lines)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait contention (5x faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([toy_text(400)], vocab_size=320)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    """A prepared token folder: ~2,000 lines, 10% held out."""
    src = tmp_path_factory.mktemp("src") / "toy.txt"
    src.write_text(toy_text(2000, seed=1), encoding="utf-8")
    out = tmp_path_factory.mktemp("tokens")
    prepare_corpus([src], tokenizer, out, val_fraction=0.1)
    return out


def test_memmap_round_trip_with_gz_and_explicit_val(tmp_path, tokenizer):
    texts = [toy_text(50, seed=s) for s in (2, 3, 4)]
    plain, zipped, val = tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "v.txt"
    plain.write_text(texts[0], encoding="utf-8")
    with gzip.open(zipped, "wt", encoding="utf-8") as f:
        f.write(texts[1])
    val.write_text(texts[2], encoding="utf-8")
    out = tmp_path / "tokens"
    meta = prepare_corpus([plain, zipped], tokenizer, out, val_paths=[val], block_chars=300)

    train = open_tokens(out, "train")
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    # Each file is one document: BOS text EOS, byte-exact through many small encoded blocks.
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    expected = [bos, *tokenizer.encode(texts[0]), eos, bos, *tokenizer.encode(texts[1]), eos]
    assert tokenizer.decode(train.tolist()) == tokenizer.decode(expected)
    assert tokenizer.decode(open_tokens(out, "val").tolist(), skip_special=True) == texts[2]
    assert meta["n_tokens"] == {"train": len(train), "val": len(open_tokens(out, "val"))}
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["vocab_size"] == tokenizer.vocab_size == 320
    assert on_disk["tokenizer_sha256"] == tokenizer_hash(Tokenizer.load(out / "tokenizer.json"))
    assert (out / "train.bin").stat().st_size == 2 * len(train)


def test_stray_bad_byte_is_kept_as_ufffd_and_reported_wrong_encoding_stops(tmp_path, tokenizer):
    """Same reader as the tokenizer trainer: a corrupt byte warns (path, line), a latin-1 file is refused."""
    text = toy_text(300, seed=6)
    raw = text.encode("utf-8")
    cut = raw.index("Ü".encode(), len(raw) // 2)
    src = tmp_path / "one-bad-byte.txt"
    src.write_bytes(raw[:cut] + b"\xff" + raw[cut + 2 :])  # "Ü" (2 bytes) -> one invalid byte
    line = text.encode()[:cut].count(b"\n") + 1
    with pytest.warns(UnicodeWarning, match=rf"one-bad-byte\.txt: 1 invalid UTF-8 .* line {line}\)"):
        prepare_corpus([src], tokenizer, tmp_path / "out", val_fraction=0.2)
    decoded = "".join(
        tokenizer.decode(open_tokens(tmp_path / "out", s).tolist(), skip_special=True)
        for s in ("train", "val")
    )
    assert decoded.count("\ufffd") == 1 and len(decoded) == len(text)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: \d+ invalid UTF-8 .*another encoding"):
        prepare_corpus([latin1], tokenizer, tmp_path / "out2", val_fraction=0.2)


def test_val_fraction_split_keeps_all_text(tmp_path, tokenizer):
    text = toy_text(1000, seed=5)
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    meta = prepare_corpus([src], tokenizer, tmp_path / "out", val_fraction=0.2)
    n = meta["n_tokens"]
    assert 0.1 < n["val"] / (n["train"] + n["val"]) < 0.3
    decoded = "".join(
        tokenizer.decode(open_tokens(tmp_path / "out", s).tolist(), skip_special=True)
        for s in ("train", "val")
    )
    assert sorted(decoded.splitlines()) == sorted(text.splitlines())  # blocks are whole lines, none lost


def test_bad_input_is_a_clear_error(tmp_path, tokenizer):
    check_vocab_fits(65535)
    with pytest.raises(DataError, match="uint16"):
        check_vocab_fits(65536)
    with pytest.raises(DataError, match="not found"):
        prepare_corpus([tmp_path / "missing.txt"], tokenizer, tmp_path / "out")
    with pytest.raises(DataError, match="rag train prepare"):
        open_tokens(tmp_path, "train")


def test_windows_are_shifted_slices_of_the_memmap(corpus):
    windows = TokenWindows(corpus, "train", block_size=16)
    starts = np.array([0, 7, len(windows) - 1])
    x, y = windows.batch(starts, torch.device("cpu"))
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    for row, s in enumerate(starts):
        assert x[row].tolist() == windows.tokens[s : s + 16].tolist()
        assert y[row].tolist() == windows.tokens[s + 1 : s + 17].tolist()


def test_sampler_shards_one_global_batch_and_resumes():
    whole = IndexSampler(high=10_000, batch_size=8, seed=3)
    ranks = [IndexSampler(high=10_000, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        expected = whole.next()
        parts = [s.next() for s in ranks]
        assert not set(parts[0]) & set(parts[1])  # each rank reads its own rows
        assert np.array_equal(np.concatenate(parts), expected)  # together: one process's batch
    resumed = IndexSampler(high=10_000, batch_size=8, seed=3)
    resumed.load_state_dict(whole.state_dict())
    assert np.array_equal(resumed.next(), whole.next())
    assert not np.array_equal(IndexSampler(10_000, 8, seed=4).next(), IndexSampler(10_000, 8, seed=3).next())
    with pytest.raises(DataError, match="seed"):
        IndexSampler(10_000, 8, seed=9).load_state_dict(whole.state_dict())


def test_cli_tokenizer_then_prepare(tmp_path):
    src = tmp_path / "corpus.txt.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(toy_text(300, seed=8))
    tok_path, out = tmp_path / "tok.json", tmp_path / "tokens"
    runner = CliRunner()
    result = runner.invoke(
        app, ["tokenizer", "--corpus", str(src), "--vocab-size", "300", "--out", str(tok_path)]
    )
    assert result.exit_code == 0, result.output
    assert Tokenizer.load(tok_path).vocab_size == 300
    args = [
        "prepare",
        "--corpus",
        str(src),
        "--tokenizer",
        str(tok_path),
        "--out",
        str(out),
        "--val-fraction",
        "0.1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["n_tokens"]["val"] > 0
    assert "val tokens" in result.output
    bad = runner.invoke(app, ["prepare", "--corpus", "no-such-corpus", "--tokenizer", str(tok_path)])
    assert bad.exit_code == 1 and "unknown corpus" in bad.output
