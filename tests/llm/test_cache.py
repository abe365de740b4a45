"""KV cache: cached decoding equals a full forward for every option value, ring buffers wrap,
static (compile-ready) caches give the same logits as dynamic ones."""

from __future__ import annotations

import pytest
import torch

from rag.llm.cache import KVCache
from tests.llm.test_model import (
    GRID,
    SEQ,
    config_id,
    left_pad,
    make_model,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny,
    tokens,
)

ATOL = 1e-4


FULL = [c for c in GRID if c.window == "full"]  # one per position type


def decode(model, x: torch.Tensor, chunks: list[int], max_len: int = 32, static: bool = False, **kw):
    """Feed x through a fresh cache in chunks of the given sizes; logits of every position."""
    cache = model.new_cache(x.size(0), max_len, static=static)
    out, start = [], 0
    for n in chunks:
        out.append(model(x[:, start : start + n], cache=cache, **kw).logits)
        start += n
    assert start == x.size(1) and cache.length == start
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("cfg", GRID, ids=config_id)
def test_cached_decoding_matches_full_forward(cfg):
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    full = model(x).logits
    step_by_step = decode(model, x, [1] * SEQ)
    torch.testing.assert_close(step_by_step, full, atol=ATOL, rtol=0)
    # a prefill longer than any ring (windows span <= 6), a chunk, then single steps
    chunked = decode(model, x, [9, 3, 1, 1])
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", GRID, ids=config_id)
def test_left_padded_cached_decoding_matches_rows_alone(cfg):
    model = make_model(cfg)
    prompts = [tokens(cfg, n, seed=n) for n in (11, 7, 2)]
    follow = tokens(cfg, 3, 4, seed=99)  # fed one token per step, as generation would
    idx, mask = left_pad(prompts)
    cache = model.new_cache(3, 32)
    # prefill in two chunks: the first holds all the padding (row 2 has nothing else in it)
    first = model(idx[:, :9], cache=cache, pad_mask=mask[:, :9]).logits
    second = model(idx[:, 9:], cache=cache).logits
    steps = [model(follow[:, i : i + 1], cache=cache).logits for i in range(4)]
    logits = torch.cat([first, second, *steps], dim=1)
    real = torch.cat([mask, torch.ones(3, 4, dtype=torch.bool)], dim=1)
    for b, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, follow[b]])[None]).logits[0]
        torch.testing.assert_close(logits[b, real[b]], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("window", "slots", "global_slots"),
    [("full", 64, 0), ("sliding", 4, 0), ("dilated", 6, 0), ("global", 4, 2)],
)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_buffers_hold_kv_heads_and_window_slots_only(window, slots, global_slots, n_kv_head):
    cfg = tiny(window=window, n_kv_head=n_kv_head)
    cache = KVCache(cfg, batch_size=3, max_len=64)
    shape = (3, n_kv_head, slots, cfg.head_dim)
    assert len(cache.k) == len(cache.v) == len(cache.global_k) == cfg.n_layer
    assert all(k.shape == v.shape == shape for k, v in zip(cache.k, cache.v, strict=True))
    assert cache.global_k[0].shape[2] == global_slots
    assert cache.ring == (window != "full")
    assert cache.memory_bytes() == 2 * 4 * cfg.n_layer * 3 * n_kv_head * (slots + global_slots) * cfg.head_dim


def test_window_longer_than_max_len_uses_a_plain_buffer():
    cache = KVCache(tiny(window="sliding", window_size=16), batch_size=1, max_len=8)
    assert not cache.ring and cache.k[0].shape[2] == 8


def test_ring_buffer_decodes_past_max_len_and_block_size():
    cfg = tiny(window="sliding", pos="rope")  # rope computes angles on the fly: no table to outgrow
    model = make_model(cfg)
    x = tokens(cfg, 1, 40)
    full = model(x).logits
    torch.testing.assert_close(decode(model, x, [1] * 40, max_len=8), full, atol=ATOL, rtol=0)


def test_global_query_beyond_the_window_needs_a_prefill():
    cfg = tiny(window="global", window_size=3, global_positions=(1, 7))
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    full = model(x).logits
    # prefilling through position 7 in one chunk sees every key; later steps only need the window
    torch.testing.assert_close(decode(model, x, [10, 1, 1, 1, 1]), full, atol=ATOL, rtol=0)
    cache = model.new_cache(2, 32)
    model(x[:, :7], cache=cache)
    with pytest.raises(ValueError, match="evicted"):
        model(x[:, 7:8], cache=cache)


def test_full_cache_overflow_and_batch_mismatch_are_clear_errors():
    model = make_model(tiny())
    cache = model.new_cache(2, max_len=8)
    x = tokens(model.config, 2, 6)
    model(x, cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(x, cache=cache)
    assert cache.length == 6  # a refused call leaves the cache as it was
    with pytest.raises(ValueError, match="batch_size=2"):
        model(x[:1], cache=cache)


def test_reset_starts_a_new_sequence():
    model = make_model(tiny(window="sliding"))
    x = tokens(model.config, 2, 10)
    cache = model.new_cache(2, 32)
    first = torch.cat([model(x[:, i : i + 1], cache=cache).logits for i in range(10)], dim=1)
    cache.reset()
    assert cache.length == 0 and (cache.pos == -1).all() and (cache.next_pos == 0).all()
    again = torch.cat([model(x[:, i : i + 1], cache=cache).logits for i in range(10)], dim=1)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("cfg", FULL, ids=config_id)
def test_static_cache_matches_full_forward(cfg):
    """Attending over the whole preallocated buffer (empty slots masked) changes nothing."""
    assert {c.pos for c in FULL} == {"sinusoidal", "learned", "rope", "alibi"}
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    full = model(x).logits
    torch.testing.assert_close(decode(model, x, [1] * SEQ, static=True), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(decode(model, x, [9, 3, 1, 1], static=True), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", FULL[:2], ids=config_id)
def test_static_cache_with_left_padding_matches_dynamic(cfg):
    model = make_model(cfg)
    idx, mask = left_pad([tokens(cfg, n, seed=n) for n in (9, 4)])
    follow = tokens(cfg, 2, 3, seed=7)
    logits = {}
    for static in (False, True):
        cache = model.new_cache(2, 32, static=static)
        out = [model(idx, cache=cache, pad_mask=mask).logits]
        out += [model(follow[:, i : i + 1], cache=cache).logits for i in range(3)]
        logits[static] = torch.cat(out, dim=1)
        assert cache.length == 12 and cache.next_pos.tolist() == [12, 7]
    real = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1)  # padding outputs are unused
    torch.testing.assert_close(logits[True][real], logits[False][real], atol=ATOL, rtol=0)


def test_static_cache_refuses_ring_buffers_and_overflow():
    with pytest.raises(ValueError, match="ring buffer"):
        KVCache(tiny(window="sliding"), batch_size=1, max_len=64, static=True)
    # a window at least as long as the cache needs no ring: static is fine there
    assert KVCache(tiny(window="sliding", window_size=16), batch_size=1, max_len=16, static=True).static
    model = make_model(tiny())
    cache = model.new_cache(2, max_len=8, static=True)
    x = tokens(model.config, 2, 6)
    model(x, cache=cache)
    with pytest.raises(ValueError, match="KV cache full"):
        model(x, cache=cache)
    assert cache.length == 6
    cache.reset()
    assert cache.length == 0 and (cache.pos == -1).all()


def test_static_decode_step_compiles_to_one_graph():
    """torch.compile captures a static-cache step whole and reuses it at every position: the
    cursor and positions are tensors, so nothing in Python changes between steps."""
    torch._dynamo.reset()
    model = make_model(tiny())
    x = tokens(model.config, 1, 20)
    graphs = []
    compiled = torch.compile(
        lambda idx, cache: model(idx, cache=cache, last_only=True).logits,
        backend=lambda gm, _: graphs.append(gm) or gm.forward,
        fullgraph=True,
    )
    with torch.inference_mode():
        full = model(x).logits
        cache = model.new_cache(1, 32, static=True)
        model(x[:, :8], cache=cache)
        steps = [compiled(x[:, i : i + 1].clone(), cache) for i in range(8, 20)]
    assert len(graphs) == 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], atol=ATOL, rtol=0)


def test_moe_top1_cached_decoding_matches_full_forward():
    """Switch-style routing (k = 1 keeps the raw gate): the grid only has k = 2."""
    cfg = tiny(ffn="moe", moe_top_k=1, pos="alibi", n_kv_head=1)
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    torch.testing.assert_close(decode(model, x, [5, 1, 8]), model(x).logits, atol=ATOL, rtol=0)


def test_gqa_attention_accepts_transposed_kernel_outputs(monkeypatch):
    """CUDA's memory-efficient kernel (the one masked attention gets) returns its output with
    (B, T, H, D) memory order; the folded GQA path must not assume a contiguous result."""
    real = torch.nn.functional.scaled_dot_product_attention

    def like_cuda(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, transposed memory

    cfg = tiny(n_kv_head=2, pos="alibi")  # GQA with a per-head additive bias
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    want = decode(model, x, [5, 1, 8])
    monkeypatch.setattr("rag.llm.model.F.scaled_dot_product_attention", like_cuda)
    torch.testing.assert_close(decode(model, x, [5, 1, 8]), want, atol=ATOL, rtol=0)
