"""The answer pipeline end to end on real parts: a real index (embedder, FAISS, BM25), a real
tokenizer and a tiny GPT trained for a couple of seconds to answer five questions over what the
retriever returns for them, in the very prompt format `Reader.prompt` builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rag.answer import (
    DEFAULT_MAX_NEW_TOKENS,
    Answer,
    Reader,
    ReaderUnavailable,
    _stripped,
    ask,
    ask_stream,
    drain,
    hit_to_source,
    is_abstention,
)
from rag.citations import parse_citations
from rag.config import Settings
from rag.ingest.job import ingest
from rag.llm.checkpoint import save_checkpoint
from rag.llm.generate import GenerationConfig
from rag.llm.model import GPT, IGNORE_INDEX, ModelConfig
from rag.llm.tokenizer import Tokenizer
from rag.prompt import ABSTAIN
from rag.retrieve import Retriever, open_retriever
from tests.app.readers import one_torch_thread

DOCS = {
    "paris.txt": "Paris is the capital of France. The city stands on the river Seine.",
    "berlin.txt": "Berlin is the capital of Germany. The city stands on the river Spree.",
    "kyiv.txt": "Київ — столиця України. Місто стоїть на берегах Дніпра.",
    "hrad.txt": "Pražský hrad je sídlem prezidenta republiky. Stojí nad řekou Vltavou.",
    "tea.txt": "Green tea leaves are steamed soon after picking, so they do not oxidise.",
}
# question -> answer, "{stem}" = the number of that document among the retrieved sources
EXAMPLES = {
    "What is the capital of France?": "Paris [{paris}]",
    "Яке місто є столицею України?": "Київ [{kyiv}]",
    "Kde sídlí prezident republiky?": "V Pražském hradu [{hrad}]",
    "Which rivers flow through Paris and Berlin?": "The Seine [{paris}] and the Spree [{berlin}]",
    "How many moons does Jupiter have?": ABSTAIN,
}
K = 2
# the JSON shape of an answer (rag ask --json, POST /v1/ask): the answer's own keys, then the
# grounded reader's (empty or None for a from-scratch reader)
ANSWER_KEYS = ["question", "answer", "abstained", "citations", "sources", "finish_reason", "timings"]
ANSWER_KEYS += ["evidence", "cut_sources", "scores", "quote"]
TINY = dict(vocab_size=600, block_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64)


def build_index(root: Path) -> Settings:
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in DOCS.items():
        (corpus / name).write_text(text, encoding="utf-8")
    settings = Settings(index_dir=root / "index")
    assert ingest([corpus], settings).ingested == len(DOCS)
    return settings


def train_tokenizer(shared_data: Path, vocab_size: int = TINY["vocab_size"]) -> Tokenizer:
    text = (shared_data / "lm" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    return Tokenizer.train([text], vocab_size=vocab_size)


def expected_answers(retriever: Retriever) -> dict[str, str]:
    """Each example's target, numbered as the retriever's hits for it come."""
    out = {}
    for question, answer in EXAMPLES.items():
        stems = [Path(h.path).stem for h in retriever.search(question, K)]
        out[question] = answer.format(**{stem: n for n, stem in enumerate(stems, start=1)})
    return out


def train_reader(tokenizer: Tokenizer, retriever: Retriever, max_new_tokens: int = 32) -> Reader:
    """A tiny GPT that answers EXAMPLES (loss on the answer and EOS only, like SFT)."""
    torch.manual_seed(0)
    reader = Reader(GPT(ModelConfig(**TINY)), tokenizer, max_new_tokens=max_new_tokens)
    rows = []
    for question, answer in expected_answers(retriever).items():
        prompt = reader.prompt(question, retriever.search(question, K)).ids
        rows.append((prompt, tokenizer.encode(answer) + [tokenizer.eos_id]))
    T = max(len(p) + len(a) for p, a in rows) - 1
    x = torch.full((len(rows), T), tokenizer.pad_id)
    y = torch.full((len(rows), T), IGNORE_INDEX)
    for i, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a)
        x[i, : len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1 : len(seq) - 1] = seq[len(p) :]
    model = reader.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_torch_thread():  # a tiny model gains nothing from threads on a shared 2-core machine
        for _ in range(150):
            loss = model(x, y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.01:
                break
    assert loss.item() < 0.02
    model.eval()
    return reader


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> Retriever:
    return open_retriever(build_index(tmp_path_factory.mktemp("answer")))


@pytest.fixture(scope="module")
def tok(shared_data: Path) -> Tokenizer:
    return train_tokenizer(shared_data)


@pytest.fixture(scope="module")
def reader(tok: Tokenizer, retriever: Retriever) -> Reader:
    return train_reader(tok, retriever)


@pytest.fixture(scope="module")
def expected(retriever: Retriever) -> dict[str, str]:
    return expected_answers(retriever)


def collect(gen) -> tuple[list[str], Answer]:
    pieces: list[str] = []
    return pieces, drain(gen, pieces.append)


@pytest.mark.parametrize("question", list(EXAMPLES)[:4])
def test_answers_cite_the_sources_they_came_from(reader, retriever, expected, question) -> None:
    hits = retriever.search(question, K)
    answer = reader.answer(question, hits)
    assert answer.text == expected[question] and answer.finish_reason == "stop"
    assert not answer.abstained
    assert [s.chunk_id for s in answer.sources] == [h.chunk_id for h in hits]
    # numbered 1..k; a query the embedder cannot read is BM25 alone, which may match fewer chunks
    assert [s.n for s in answer.sources] == list(range(1, len(hits) + 1)) and hits
    for c in answer.citations:
        assert c.valid and c.supported, c
        assert c.source == answer.sources[c.n - 1]
        assert c.source.text == hits[c.n - 1].text  # short chunks: nothing cut
        assert answer.text[c.start : c.end] == f"[{c.n}]"
    cited = {Path(c.source.path).stem for c in answer.citations}
    assert cited == {s for s in ("paris", "kyiv", "hrad", "berlin") if f"{{{s}}}" in EXAMPLES[question]}
    assert answer.timings["prompt_tokens"] == len(reader.prompt(question, hits).ids)
    assert answer.timings["new_tokens"] == len(reader.tokenizer.encode(answer.text))
    assert answer.timings["generate_ms"] > 0


def test_multi_citation_answer_checks_each_clause(reader, retriever) -> None:
    question = "Which rivers flow through Paris and Berlin?"
    answer = reader.answer(question, retriever.search(question, K))
    assert [(c.sentence, Path(c.source.path).stem) for c in answer.citations] == [
        ("The Seine", "paris"),
        ("and the Spree", "berlin"),
    ]
    # cite the other way round: the words are then not in the cited source
    wrong = answer.text.replace("[1]", "[x]").replace("[2]", "[1]").replace("[x]", "[2]")
    assert [c.supported for c in parse_citations(wrong, answer.sources)] == [False, False]


def test_stream_pieces_are_the_final_text(reader, retriever) -> None:
    for question in EXAMPLES:
        pieces, answer = collect(ask_stream(question, retriever, reader, k=K))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == answer.text
        whole = ask(question, retriever, reader, k=K)
        assert (whole.text, whole.citations, whole.sources) == (answer.text, answer.citations, answer.sources)
        assert set(answer.timings) == {"retrieve_ms", "generate_ms", "prompt_tokens", "new_tokens"}
        assert "<" not in answer.text  # no special token leaks into the text


def test_abstention(reader, retriever) -> None:
    answer = ask("How many moons does Jupiter have?", retriever, reader, k=K)
    assert answer.text == ABSTAIN and answer.abstained and answer.citations == []
    assert answer.finish_reason == "stop" and len(answer.sources) == K
    assert is_abstention(" the documents do NOT contain the answer. [1]")
    assert is_abstention("The documents do not contain the answer [1].")  # the marker before the stop
    assert is_abstention("The documents do not contain the answer")  # the final stop left out
    assert not is_abstention("The documents do not contain the answer, but Paris [1]")


def test_no_sources_abstains_without_calling_the_model(reader, retriever) -> None:
    calls = []
    handle = reader.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        answer = reader.answer("What is the capital of France?", [])
        pieces, streamed = collect(reader.stream("What is the capital of France?", []))
        # hits, but an answer budget that leaves no room for any source: the same case
        hits = retriever.search("What is the capital of France?", K)
        no_room = reader.answer("What is the capital of France?", hits, GenerationConfig(max_new_tokens=480))
        assert calls == []
        reader.answer("What is the capital of France?", hits)
        assert calls  # the hook does see a real answer's forwards
    finally:
        handle.remove()
    assert pieces == [ABSTAIN]
    assert (answer.text, answer.abstained, answer.finish_reason) == (ABSTAIN, True, "no_sources")
    assert answer.citations == [] and answer.sources == [] and streamed == answer
    assert answer.timings == {"generate_ms": 0.0, "prompt_tokens": 0, "new_tokens": 0}
    assert answer.to_dict()["answer"] == ABSTAIN
    assert (no_room.text, no_room.finish_reason, no_room.sources) == (ABSTAIN, "no_room", [])


def test_length_limit_and_bad_input(reader, retriever) -> None:
    question = "Kde sídlí prezident republiky?"
    hits = retriever.search(question, K)
    short = reader.answer(question, hits, GenerationConfig(max_new_tokens=3))
    assert short.finish_reason == "length" and short.timings["new_tokens"] == 3
    assert reader.answer(question, hits).text.startswith(short.text)
    with pytest.raises(ValueError, match="question is empty"):
        reader.stream("  ", hits)  # raised at the call, before any piece
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        reader.stream(question, hits, GenerationConfig(max_new_tokens=512))
    with pytest.raises(ValueError, match="unknown mode"):
        ask_stream(question, retriever, reader, mode="sparse")


def test_to_dict_is_the_shared_json_shape(reader, retriever) -> None:
    answer = ask("Яке місто є столицею України?", retriever, reader, k=K)
    d = json.loads(json.dumps(answer.to_dict(), ensure_ascii=False))
    assert list(d) == ANSWER_KEYS
    assert d["evidence"] == [] and d["cut_sources"] == [] and d["quote"] is None  # no copy head
    assert d["question"] == "Яке місто є столицею України?" and d["answer"] == answer.text
    (c,) = d["citations"]
    assert c["valid"] and c["supported"] and c["source"] == d["sources"][c["n"] - 1]
    assert set(c) == {"n", "start", "end", "sentence", "supported", "valid", "source"}
    hit = retriever.search("Київ", 1)[0]
    src = hit_to_source(hit)
    assert (src.n, src.doc_id, src.chunk_id, src.path, src.page, src.start, src.end, src.text) == (
        0,
        hit.doc_id,
        hit.chunk_id,
        hit.path,
        hit.page,
        hit.start,
        hit.end,
        hit.text,
    )


def test_stripped_stream_never_retracts() -> None:
    def pieces():
        yield from [" ", "\n Pa", "ris ", " ", "[1]", "  \n"]
        return "done"

    out, value = collect(_stripped(pieces()))
    assert "".join(out) == "Paris  [1]" and all(out) and value == "done"


def test_load_round_trip_and_clear_errors(reader, retriever, shared_data, tmp_path) -> None:
    question = "What is the capital of France?"
    hits = retriever.search(question, K)
    save_checkpoint(tmp_path / "m", reader.model, reader.tokenizer)
    loaded = Reader.load(tmp_path / "m", max_new_tokens=32)
    assert loaded.answer(question, hits).text == reader.answer(question, hits).text

    with pytest.raises(
        ReaderUnavailable, match=r"no reader model at .*nowhere: train one with `make reader`"
    ):
        Reader.load(tmp_path / "nowhere")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a torn file
    with pytest.raises(ReaderUnavailable, match="cannot be loaded"):
        Reader.load(tmp_path / "m")
    save_checkpoint(tmp_path / "m", reader.model, reader.tokenizer)
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ReaderUnavailable, match="cannot be loaded"):
        Reader.load(tmp_path / "m")
    save_checkpoint(tmp_path / "m", reader.model, reader.tokenizer)
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(ReaderUnavailable, match="tokenizer.json"):
        Reader.load(tmp_path / "m")
    save_checkpoint(tmp_path / "m", reader.model, train_tokenizer(shared_data, vocab_size=700))
    with pytest.raises(ReaderUnavailable, match="tokenizer has 700 tokens but the model only 600"):
        Reader.load(tmp_path / "m")
    assert issubclass(ReaderUnavailable, ValueError)


def test_default_answer_room_fits_a_small_model(tok: Tokenizer) -> None:
    """96 new tokens cannot fit a 64-token context: the default becomes half of it, not an error."""
    small = GPT(ModelConfig(**{**TINY, "block_size": 64}))
    assert Reader(small, tok).max_new_tokens == 32
    assert Reader(GPT(ModelConfig(**TINY)), tok).max_new_tokens == min(
        DEFAULT_MAX_NEW_TOKENS, TINY["block_size"] // 2
    )
