"""Prefix-LM attention, the BERT layout options and the copy head, on tiny fp32 models."""

from __future__ import annotations

import pytest
import torch

from rag.llm.masks import attention_mask
from rag.llm.model import CopyHead
from tests.llm.test_model import left_pad, make_model, single_thread, tiny, tokens  # noqa: F401

ATOL = 1e-4
BERTISH = dict(
    pos="learned", norm="layernorm", ffn="gelu", bias=True, n_kv_head=4, norm_position="post", embed_norm=True
)
CONFIGS = [
    tiny(mask="prefix", **BERTISH),
    tiny(mask="prefix", **BERTISH, head_transform=True, copy_head=True),
    tiny(mask="prefix", pos="rope"),  # the rule is independent of the layout
    tiny(mask="prefix", pos="alibi", window="sliding"),
]


def test_prefix_mask_rule():
    pos = torch.arange(6)[None]
    allowed = attention_mask(pos, pos, tiny(), torch.tensor([3]))[0]
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.pos}-{c.window}-{c.norm_position}")
def test_prefix_is_bidirectional_and_answer_is_causal(cfg):
    model = make_model(cfg)
    x = tokens(cfg, 1, 10)
    prefix = torch.tensor([6])
    base = model(x, prefix_len=prefix).logits
    # changing a later prefix token changes earlier prefix positions (bidirectional) ...
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % cfg.vocab_size
    changed = model(y, prefix_len=prefix).logits
    assert not torch.allclose(changed[0, :5], base[0, :5])
    # ... while changing an answer token never changes anything before it (causal)
    z = x.clone()
    z[0, 8] = (z[0, 8] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(z, prefix_len=prefix).logits[0, :8], base[0, :8], atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.pos}-{c.window}-{c.norm_position}")
def test_cached_decoding_equals_full_forward_with_prefix(cfg):
    model = make_model(cfg)
    x = tokens(cfg, 2, 12)
    prefix = torch.tensor([7, 7])
    full = model(x, prefix_len=prefix).logits
    cache = model.new_cache(2, 32)
    out = [model(x[:, :7], cache=cache, prefix_len=prefix).logits]  # prefill: the prefix at once
    out += [model(x[:, i : i + 1], cache=cache).logits for i in range(7, 12)]  # then one per step
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["bert", "bert-copy"])
def test_left_padded_prefix_batch_equals_rows_alone(cfg):
    model = make_model(cfg)
    prompts = [tokens(cfg, n, seed=n) for n in (9, 5)]
    follow = tokens(cfg, 2, 3, seed=7)
    idx, mask = left_pad(prompts)
    lens = torch.tensor([9, 5])
    cache = model.new_cache(2, 32)
    first = model(idx, cache=cache, pad_mask=mask, prefix_len=lens).logits[:, -1]
    steps = [model(follow[:, i : i + 1], cache=cache).logits[:, -1] for i in range(3)]
    for r, p in enumerate(prompts):
        seq = torch.cat([p, follow[r]])[None]
        alone = model(seq, prefix_len=lens[r : r + 1]).logits[0]
        n = len(p)
        torch.testing.assert_close(first[r], alone[n - 1], atol=ATOL, rtol=0)
        for i in range(3):
            torch.testing.assert_close(steps[i][r], alone[n + i], atol=ATOL, rtol=0)


def test_prefix_len_required_exactly_with_prefix_mask():
    with pytest.raises(ValueError, match="prefix_len"):
        make_model(tiny(mask="prefix"))(tokens(tiny(), 1, 4))
    with pytest.raises(ValueError, match="prefix_len"):
        make_model(tiny())(tokens(tiny(), 1, 4), prefix_len=torch.tensor([2]))


def test_post_norm_block_matches_its_formula():
    """norm(x + attn(x)), then norm(x + ffn(x)): BERT's order, written out by hand."""
    model = make_model(tiny(mask="prefix", **BERTISH))
    block = model.blocks[0]
    x = torch.randn(1, 5, 32)
    ctx = type("Ctx", (), {})()
    from rag.llm.model import AttnContext

    ctx = AttnContext(None, None, None, False)
    h = block.norm1(x + block.attn(x, ctx)[0])
    expected = block.norm2(h + block.ffn(h)[0])
    torch.testing.assert_close(block(x, ctx)[0], expected)


def test_copy_mixture_is_a_distribution_and_log_prob_agrees():
    torch.manual_seed(0)
    V, T = 11, 6
    lm = torch.randn(2, 3, V)
    log_copy = torch.randn(2, 3, T).log_softmax(-1)
    gate = torch.randn(2, 3)
    key_ids = torch.randint(0, V, (2, T))
    mix = CopyHead.mix(lm, log_copy, gate, key_ids)
    torch.testing.assert_close(mix.exp().sum(-1), torch.ones(2, 3))
    y = torch.randint(0, V, (2, 3))
    torch.testing.assert_close(
        CopyHead.log_prob(lm, log_copy, gate, key_ids, y), mix.gather(-1, y[..., None])[..., 0]
    )
    # by hand for one entry: g * softmax(lm)[y] + (1 - g) * sum of copy weights on positions holding y
    g = torch.sigmoid(gate[0, 0])
    by_hand = g * lm[0, 0].softmax(-1)[y[0, 0]] + (1 - g) * log_copy[0, 0].exp()[key_ids[0] == y[0, 0]].sum()
    torch.testing.assert_close(mix[0, 0, y[0, 0]].exp(), by_hand)
