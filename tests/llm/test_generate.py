"""Generation engine: cached decoding == full forwards, sampling, stops, streaming, batching, limits.

Models are tiny and random (weights scaled up so greedy outputs vary instead of repeating one
token), except one trained for a few seconds to say a fixed multilingual sentence and then EOS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rag.llm.generate import (
    CompiledDecoder,
    Completion,
    GenerationConfig,
    context_limit,
    generate,
    sample,
    stream,
)
from rag.llm.model import GPT, ModelConfig
from rag.llm.tokenizer import Tokenizer

V = 512
TINY = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, tie_embeddings=False)
ARCHS = {
    "rope-gqa": {},
    "alibi": {"pos": "alibi"},
    "learned-layernorm-gelu": {"pos": "learned", "norm": "layernorm", "ffn": "gelu"},
    "sinusoidal-mha": {"pos": "sinusoidal", "n_kv_head": 4},
    "sliding": {"window": "sliding", "window_size": 8},
    "dilated-mqa": {"window": "dilated", "window_size": 4, "dilation": 2, "n_kv_head": 1},
    "global": {"window": "global", "window_size": 6, "global_positions": (0, 3)},
    "moe": {"ffn": "moe", "n_experts": 4},
}
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "a"]
GREEDY = GenerationConfig(max_new_tokens=24, stop_at_eos=False)


@pytest.fixture(scope="module")
def tok(shared_data: Path) -> Tokenizer:
    text = (shared_data / "lm" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    return Tokenizer.train([text], vocab_size=V)


def random_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@torch.no_grad()
def naive_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """Reference: a full forward over the whole sequence for every new token, no cache."""
    ids, out = list(ids), []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids])).logits[0, -1, :V].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def joined_stream(model: GPT, tok: Tokenizer, prompt, config: GenerationConfig) -> str:
    pieces = []
    it = stream(model, tok, prompt, config)
    while True:
        try:
            pieces.append(next(it))
        except StopIteration as end:
            result = end.value  # the generator returns the full result
            break
    assert all(pieces), "stream yields only non-empty pieces"
    assert result == generate(model, tok, [prompt], config)[0]
    return "".join(pieces)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_naive(tok: Tokenizer, arch: str) -> None:
    model = random_model(**ARCHS[arch])
    results = generate(model, tok, PROMPTS, GREEDY)
    for prompt, res in zip(PROMPTS, results, strict=True):
        ids = tok.encode(prompt, add_bos=True)
        assert res.prompt_tokens == len(ids)
        assert res.token_ids == naive_greedy(model, ids, GREEDY.max_new_tokens)
        assert len(set(res.token_ids)) > 3  # the check is not vacuous: outputs vary
        assert res.finish_reason == "length"
        assert res.text == tok.decode(res.token_ids, skip_special=True)


@pytest.mark.parametrize("arch", ["rope-gqa", "learned-layernorm-gelu", "sliding", "global"])
def test_batched_equals_single(tok: Tokenizer, arch: str) -> None:
    model = random_model(**ARCHS[arch])
    alone = [generate(model, tok, [p], GREEDY)[0] for p in PROMPTS]
    # a stop string from the middle of row 0's output: row 0 stops early, the others go on
    stop = alone[0].text[8:11]
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False, stop_strings=[stop])
    alone = [generate(model, tok, [p], cfg)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, cfg)
    assert batched == alone
    assert alone[0].finish_reason == "stop" and len(alone[0].token_ids) < 24
    assert any(r.finish_reason == "length" for r in alone[1:])
    # token id prompts are used as given, in a batch too
    as_ids = generate(model, tok, [tok.encode(p, add_bos=True) for p in PROMPTS], cfg)
    assert as_ids == batched


def test_stop_token(tok: Tokenizer) -> None:
    model = random_model()
    full = generate(model, tok, ["ROMEO:"], GREEDY)[0].token_ids
    stop_id = full[6]
    k = full.index(stop_id)
    res = generate(model, tok, ["ROMEO:"], GenerationConfig(max_new_tokens=24, stop_token_ids=[stop_id]))[0]
    assert res.token_ids == full[:k]  # the stop token itself is not returned
    assert res.finish_reason == "stop"
    assert res.text == tok.decode(full[:k], skip_special=True)


def test_stop_string_cuts_text_and_stream(tok: Tokenizer) -> None:
    model = random_model()
    prompt = PROMPTS[1]
    full = generate(model, tok, [prompt], GREEDY)[0].text
    stop = full[10:14]
    expected = full[: full.index(stop)]
    for cfg in (
        GenerationConfig(max_new_tokens=24, stop_at_eos=False, stop_strings=[stop]),
        GenerationConfig(max_new_tokens=24, stop_at_eos=False, stop_strings=["never in the text", stop]),
    ):
        res = generate(model, tok, [prompt], cfg)[0]
        assert (res.text, res.finish_reason) == (expected, "stop")
        assert joined_stream(model, tok, prompt, cfg) == expected
    # a stop string whose start appears but that never completes holds text back only for a while
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False, stop_strings=[stop + "\x00\x00never"])
    assert joined_stream(model, tok, prompt, cfg) == full == generate(model, tok, [prompt], cfg)[0].text


def test_completion_holds_back_partial_stop_strings(tok: Tokenizer) -> None:
    """Token by token: a possible stop-string start is withheld, released on mismatch, dropped on match."""

    def run(text: str, stops: list[str]) -> tuple[list[str], Completion]:
        row = Completion(tok.stream_decoder(), frozenset(), stops, budget=1000, prompt_len=0)
        pieces = []
        for t in tok.encode(text):
            pieces.append(row.push(t))
            if row.done:
                break
        return pieces, row

    pieces, row = run("My lord, KING RICHARD comes", ["KING RICHARD"])
    assert "".join(pieces) == "My lord, " and row.finish_reason == "stop"
    assert not any("K" in p for p in pieces)

    pieces, row = run("My lord, KING HENRY", ["KING RICHARD", "HENRY IV"])
    assert "".join(pieces) == "My lord, KING "  # "HENRY" may still become "HENRY IV"
    for t in tok.encode(" comes"):
        pieces.append(row.push(t))
    assert "".join(pieces) == "My lord, KING HENRY comes" and not row.done

    # the earliest stop string wins, even when a later-starting one completes in the same token
    pieces, row = run("abcdef", ["cdef", "bc"])
    assert row.result().text == "a"


def test_context_limit_full_attention(tok: Tokenizer) -> None:
    model = random_model(pos="learned", block_size=32)
    assert context_limit(model) == 32
    cfg = GenerationConfig(max_new_tokens=100, stop_at_eos=False)
    prompts = [list(range(10, 30)), list(range(10, 42)), [7]]  # 20, 32 (= block_size) and 1 tokens
    results = generate(model, tok, prompts, cfg)
    # the last context position predicts one token past the context; nothing is fed beyond it
    assert [len(r.token_ids) for r in results] == [13, 1, 32]
    assert all(r.finish_reason == "length" for r in results)
    assert results == [generate(model, tok, [p], cfg)[0] for p in prompts]
    assert results[0].token_ids == naive_greedy(model, prompts[0], 13)
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        generate(model, tok, [list(range(10, 43))], cfg)


def test_windowed_model_goes_past_block_size(tok: Tokenizer) -> None:
    model = random_model(window="sliding", window_size=8, block_size=32)
    assert context_limit(model) is None
    res = generate(model, tok, ["ROMEO:"], GenerationConfig(max_new_tokens=80, stop_at_eos=False))[0]
    assert len(res.token_ids) == 80 and res.finish_reason == "length"
    # within block_size the ring buffer gives exactly the full-forward result
    assert res.token_ids[:20] == naive_greedy(model, tok.encode("ROMEO:", add_bos=True), 20)


def test_sampling_seeds_and_degenerate_filters(tok: Tokenizer) -> None:
    model = random_model()
    greedy = generate(model, tok, PROMPTS, GREEDY)

    def sampled(seed: int | None, **kw) -> list[list[int]]:
        cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False, temperature=1.0, seed=seed, **kw)
        return [r.token_ids for r in generate(model, tok, PROMPTS, cfg)]

    assert sampled(0) == sampled(0)
    assert sampled(0) != sampled(1)
    assert sampled(None) != sampled(None)  # unseeded calls draw fresh seeds
    assert sampled(0) != [r.token_ids for r in greedy]
    assert sampled(5, top_k=1) == [r.token_ids for r in greedy]
    assert sampled(5, top_p=1e-6) == [r.token_ids for r in greedy]
    assert sampled(3, top_k=V, top_p=1.0) == sampled(3)  # no-op filters change nothing


def test_sample_filters_on_known_distribution() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log().repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits).unique().tolist() == [0]
    top2 = sample(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.unique().tolist()) == {0, 1}
    assert abs((top2 == 0).float().mean().item() - 0.4 / 0.7) < 0.05  # renormalised over the kept tokens
    # nucleus 0.5: {0.4} is not enough, {0.4, 0.3} is, so exactly tokens 0 and 1 stay
    assert set(sample(logits, 1.0, top_p=0.5, generator=gen).unique().tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.75, generator=gen).unique().tolist()) == {0, 1, 2}
    assert set(sample(logits, 1.0, generator=gen).unique().tolist()) == {0, 1, 2, 3}
    cold = sample(logits, 0.05, generator=gen)  # low temperature sharpens towards the argmax
    assert (cold == 0).float().mean().item() > 0.99


def test_global_token_beyond_the_window_decodes_from_a_short_prompt(tok: Tokenizer) -> None:
    """Position 9 is global: decoding reaches it and it must see keys a 4-slot ring would have dropped."""
    model = random_model(window="global", window_size=4, global_positions=(0, 9))
    prompts = ["a", "ROMEO: hi there good sir"]
    for batch in ([prompts[0]], [prompts[1]], prompts):
        for p, res in zip(batch, generate(model, tok, batch, GREEDY), strict=True):
            assert res.token_ids == naive_greedy(model, tok.encode(p, add_bos=True), GREEDY.max_new_tokens)


def test_stream_matches_generate(tok: Tokenizer) -> None:
    model = random_model()
    for cfg in (GREEDY, GenerationConfig(max_new_tokens=40, temperature=1.0, seed=7, stop_at_eos=False)):
        for prompt in PROMPTS:
            res = generate(model, tok, [prompt], cfg)[0]
            assert joined_stream(model, tok, prompt, cfg) == res.text
            # decoding the accumulated ids at once gives the same text: no character was broken
            assert res.text == tok.decode(res.token_ids, skip_special=True)


def test_stream_close_restores_training_mode(tok: Tokenizer) -> None:
    model = random_model(dropout=0.5).train()
    cfg = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    # eval mode inside (dropout off), so greedy output is deterministic
    assert generate(model, tok, ["ROMEO:"], cfg) == generate(model, tok, ["ROMEO:"], cfg)
    assert model.training
    it = stream(model, tok, "ROMEO:", cfg)
    next(it)
    assert not model.training
    it.close()
    assert model.training


def test_bad_input(tok: Tokenizer) -> None:
    model = random_model()
    for bad in (
        {"max_new_tokens": -1},
        {"temperature": -0.5},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"stop_strings": [""]},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"max_new_tokens": 2.5},
        {"top_k": 3.0},
        {"seed": "1"},
        {"temperature": True},
        {"top_p": True},
        {"stop_strings": [5]},
        {"stop_token_ids": "ab"},
        {"stop_token_ids": [1.0]},
    ):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)
    assert GenerationConfig(stop_strings="\n\n").stop_strings == ("\n\n",)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tok, [[]])
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        generate(model, tok, [[V]])
    with pytest.raises(TypeError, match="sequence of token ids"):
        generate(model, tok, [1, 2])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be integers"):
        generate(model, tok, [[1, 2.5]])
    # a tiny temperature is (almost) greedy, never NaN probabilities
    greedy8 = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    want = generate(model, tok, ["ROMEO:"], greedy8)[0].token_ids
    for t in (1e-30, 1e-46, 5e-324, 1e-6):  # below float32's range, and just below MIN_TEMPERATURE
        cold = GenerationConfig(max_new_tokens=8, temperature=t, seed=0, stop_at_eos=False)
        assert generate(model, tok, ["ROMEO:"], cold)[0].token_ids == want
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, tok, "ROMEO:")  # type: ignore[arg-type]
    assert generate(model, tok, []) == []
    res = generate(model, tok, ["ROMEO:"], GenerationConfig(max_new_tokens=0))[0]
    assert (res.text, res.token_ids, res.finish_reason) == ("", [], "length")


ANSWER = " Příliš žluťoučký kůň 😀🎉 done"


@pytest.fixture(scope="module")
def parrot(tok: Tokenizer) -> GPT:
    """A tiny model trained (seconds) to answer one prompt with ANSWER and then EOS."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    seq = tok.encode("Q: say it\nA:", add_bos=True) + tok.encode(ANSWER, add_eos=True)
    x = torch.tensor([seq[:-1]])
    y = torch.tensor([seq[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(80):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval()


def test_trained_model_stops_at_eos_and_streams_whole_characters(tok: Tokenizer, parrot: GPT) -> None:
    answer_ids = tok.encode(ANSWER)
    assert len(answer_ids) > len(ANSWER.encode()) // 2  # emoji and diacritics span several tokens
    res = generate(parrot, tok, ["Q: say it\nA:"])[0]  # default config: greedy, stop at EOS
    assert (res.text, res.token_ids, res.finish_reason) == (ANSWER, answer_ids, "stop")

    pieces = list(stream(parrot, tok, "Q: say it\nA:"))
    assert "".join(pieces) == ANSWER
    assert not any("\ufffd" in p for p in pieces)  # no half-decoded character was ever emitted
    assert len(pieces) > 5

    cut = list(stream(parrot, tok, "Q: say it\nA:", GenerationConfig(stop_strings=["kůň"])))
    assert "".join(cut) == " Příliš žluťoučký "
    no_eos = generate(parrot, tok, ["Q: say it\nA:"], GenerationConfig(max_new_tokens=40, stop_at_eos=False))[
        0
    ]
    assert no_eos.finish_reason == "length" and tok.eos_id in no_eos.token_ids
    assert no_eos.text.startswith(ANSWER)  # EOS itself is a special token: not in the text


def test_compiled_decoder_generates_what_eager_does(tok: Tokenizer) -> None:
    """torch.compile (inductor) over a static cache: the same tokens, batched or alone, greedy or
    sampled; a second call of the same shape reuses the compiled step and the cache."""
    torch._dynamo.reset()
    model = random_model()
    decoder = CompiledDecoder(model)
    sampled = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=50, seed=3, stop_at_eos=False)
    for cfg in (GREEDY, sampled):
        assert generate(model, tok, PROMPTS, cfg, decoder=decoder) == generate(model, tok, PROMPTS, cfg)
    with decoder.cache(len(PROMPTS)) as cache:
        pass
    with decoder.cache(len(PROMPTS)) as again:
        assert again is cache and cache.length == 0  # pooled and reused, emptied
    # two streams interleaved step by step never share a cache
    alone = [generate(model, tok, [p], GREEDY)[0].text for p in PROMPTS[:2]]
    streams = [stream(model, tok, p, GREEDY, decoder) for p in PROMPTS[:2]]
    pieces: list[list[str]] = [[], []]
    for _ in range(GREEDY.max_new_tokens + 1):
        for it, out in zip(streams, pieces, strict=True):
            out.append(next(it, ""))
    assert ["".join(p) for p in pieces] == alone
    # left padding: a short row may decode more tokens than the model's context has slots
    long_short = [list(range(5, 5 + 60)), [7, 8]]
    many = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    compiled = generate(model, tok, long_short, many, decoder=decoder)
    assert compiled == generate(model, tok, long_short, many)
    assert [len(r.token_ids) for r in compiled] == [5, 40]  # block_size 64: 64 - 60 + 1, and all 40
    with pytest.raises(ValueError, match="another model"):
        generate(random_model(), tok, PROMPTS, GREEDY, decoder=decoder)
    with pytest.raises(ValueError, match="ring buffer"):
        CompiledDecoder(random_model(**ARCHS["sliding"]))
