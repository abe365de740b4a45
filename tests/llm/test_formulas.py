"""Each formula of the seeds pinned to its published definition, independently of our code's layout.

Every test names the deliberate breakage (mutation) it was seen to catch: the mutation was applied to
the source once, this file was run, the named test failed, and the source was restored.
"""

from __future__ import annotations

import math

import pytest
import torch

from rag.llm.align import dpo_loss
from rag.llm.masks import attention_mask
from rag.llm.model import GPT, Alibi, AttnContext, ModelConfig, Sinusoidal, alibi_slopes, apply_rope
from tests.llm.test_model import make_model, tiny

T = 9


def seed_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoFormer, eq. 34: pairs (x_2i, x_2i+1) rotated by the angle pos * theta^(-2i/d)."""
    d = x.size(-1)
    out = x.clone()
    for i in range(d // 2):
        a = pos.double() * theta ** (-2 * i / d)
        c, s = a.cos().float()[:, None], a.sin().float()[:, None]
        x0, x1 = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = x0 * c[:, 0] - x1 * s[:, 0]
        out[..., 2 * i + 1] = x0 * s[:, 0] + x1 * c[:, 0]
    return out


def interleave(d: int) -> torch.Tensor:
    """The fixed permutation from our half-split layout (i, i + d/2) to the seed's pairs (2i, 2i+1)."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()


def rope_context(model: GPT, pos: torch.Tensor) -> AttnContext:
    return AttnContext(mask=None, rope=model.positions.rotary(pos[None]), cache=None, return_attn=True)


def test_apply_rope_is_the_seed_pairwise_rotation_after_a_fixed_permutation():
    """Mutation "x1 * cos + x2 * sin" (rotation sign, `apply_rope`) fails this test and the next."""
    cfg = tiny(pos="rope")
    model = make_model(cfg)
    pos = torch.arange(T) * 3 + 1  # positions far enough apart that every frequency matters
    x = torch.randn(T, cfg.head_dim)
    cos, sin = model.positions.rotary(pos[None])
    ours = apply_rope(x[None, None], cos, sin)[0, 0]
    perm = interleave(cfg.head_dim)
    torch.testing.assert_close(ours[:, perm], seed_rope(x[:, perm], pos), atol=1e-5, rtol=0)


def test_rope_attention_scores_are_the_seed_formula_and_depend_only_on_m_minus_n():
    """Mutation "RoPE applied to the queries only" (`Attention.forward`) fails this test: the scores
    then depend on the query's absolute position and differ from the seed's q_m . k_n."""
    cfg = tiny(pos="rope", n_kv_head=4)
    model = make_model(cfg)
    attn = model.blocks[0].attn
    x = torch.randn(1, T, cfg.d_model)
    pos = torch.arange(T)
    _, w = attn(x, rope_context(model, pos))
    _, w_shifted = attn(x, rope_context(model, pos + 37))
    torch.testing.assert_close(w_shifted, w, atol=1e-5, rtol=0)  # relative: a shift changes nothing

    perm, D = interleave(cfg.head_dim), cfg.head_dim
    q = attn.wq(x)[0].view(T, cfg.n_head, D).transpose(0, 1)[..., perm]
    k = attn.wk(x)[0].view(T, cfg.n_head, D).transpose(0, 1)[..., perm]
    scores = seed_rope(q, pos) @ seed_rope(k, pos).transpose(-2, -1) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(w[0], want, atol=1e-5, rtol=0)
    _, plain = attn(x, AttnContext(mask=None, rope=None, cache=None, return_attn=True))
    assert (plain - w).abs().max() > 1e-3  # and positions do reach the scores


def test_alibi_slopes_are_the_papers_values_for_8_12_and_6_heads():
    """Mutation "slopes 2**(-(i+1)/n)" (`alibi_slopes`) fails this test.

    Press et al. 2022, section 3 and their reference code: for n a power of 2 the slopes are the
    geometric sequence starting at and multiplied by 2^(-8/n); otherwise the 2^floor(log2 n) slopes
    followed by every other slope of 2 * 2^floor(log2 n) heads, up to n."""
    assert alibi_slopes(8) == [2.0**-k for k in range(1, 9)]  # 1/2, 1/4, ..., 1/256
    twelve = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert alibi_slopes(12) == pytest.approx(twelve, rel=1e-12)
    six = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert alibi_slopes(6) == pytest.approx(six, rel=1e-12)


def test_alibi_bias_is_minus_slope_times_distance():
    """Head h adds -m_h * (i - j) to score (i, j); also fails under the slope mutation above."""
    cfg = tiny(pos="alibi", n_head=8, n_kv_head=8)
    pos = torch.arange(5)[None]
    bias = Alibi(cfg).bias(pos, pos)
    assert bias.shape == (1, 8, 5, 5)
    assert bias[0, 0, 4, 1].item() == pytest.approx(-0.5 * 3)
    assert bias[0, 7, 3, 0].item() == pytest.approx(-(2.0**-8) * 3)
    assert bias[0, 2, 2, 2].item() == 0.0


def test_sinusoidal_table_at_known_positions():
    """Mutation "sin and cos swapped" (`Sinusoidal.embed`) fails this test.

    Vaswani et al. 2017: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)),
    here times Sinusoidal.scale."""
    table = (
        Sinusoidal(ModelConfig(d_model=4, n_head=1, n_kv_head=1, pos="sinusoidal")).embed(
            torch.tensor([[0, 1, 5]])
        )[0]
        / Sinusoidal.scale
    )
    want = [
        [0.0, 1.0, 0.0, 1.0],
        [0.8414709848, 0.5403023059, 0.0099998333, 0.9999500004],
        [-0.9589242747, 0.2836621855, 0.0499791693, 0.9987502604],
    ]
    torch.testing.assert_close(table, torch.tensor(want), atol=1e-6, rtol=0)


def reference_attention(model: GPT, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention written per query head, head h reading KV head h // (n_head / n_kv_head)."""
    cfg, attn = model.config, model.blocks[0].attn
    D, G = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    q = attn.wq(x).view(*x.shape[:2], cfg.n_head, D)
    k = attn.wk(x).view(*x.shape[:2], cfg.n_kv_head, D)
    v = attn.wv(x).view(*x.shape[:2], cfg.n_kv_head, D)
    heads = []
    for h in range(cfg.n_head):
        s = q[:, :, h] @ k[:, :, h // G].transpose(-2, -1) / math.sqrt(D)
        heads.append(s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, :, h // G])
    return attn.proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", ["full", "sliding"])
@pytest.mark.parametrize("weights", [False, True], ids=["sdpa", "weights"])
def test_query_head_h_reads_kv_head_h_div_g(n_kv_head, window, weights):
    """Mutation "query head h reads KV head h % n_kv" (the fold in `attend` and SDPA's GQA replaced
    by tiling) fails the gqa cases here; mutation "MQA/GQA fold of query rows in (T, G) order
    instead of (G, T)" (`attend`) fails the mqa and gqa cases with a window or weights."""
    cfg = tiny(pos="sinusoidal", n_kv_head=n_kv_head, window=window)
    model = make_model(cfg)
    x = torch.randn(2, T, cfg.d_model)
    pos = torch.arange(T)[None]
    allowed = attention_mask(pos, pos, cfg)
    mask = None if window == "full" and not weights else allowed[:, None]
    got, _ = model.blocks[0].attn(x, AttnContext(mask=mask, rope=None, cache=None, return_attn=weights))
    torch.testing.assert_close(got, reference_attention(model, x, allowed), atol=1e-5, rtol=0)


def test_mqa_is_mha_with_one_shared_kv_head():
    """MQA (n_kv_head=1) equals MHA whose every KV head is a copy of that one head; its cache holds
    n_head times fewer keys. Fails under the (T, G) fold-order mutation above."""
    mqa = make_model(tiny(n_kv_head=1, pos="alibi", window="sliding"))
    mha = GPT(tiny(n_kv_head=4, pos="alibi", window="sliding")).eval()
    state = mqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            state[name] = w.repeat(4, 1)
    mha.load_state_dict(state)
    x = torch.randint(1, 61, (2, T))
    torch.testing.assert_close(mqa(x).logits, mha(x).logits, atol=1e-5, rtol=0)
    assert mha.new_cache(1, 16).memory_bytes() == 4 * mqa.new_cache(1, 16).memory_bytes()


def test_dpo_loss_hand_computed_with_a_reference_term():
    """Mutation "DPO without its reference-model term" (`dpo_loss`) fails this test.

    Rafailov et al. 2023, eq. 7: -log sigmoid(beta * ((pc - pr) - (rc - rr))). With beta = 0.5:
    row 0: policy margin -1 - -3 = 2, reference margin -2 - -2.5 = 0.5, logit 0.75,
           loss log(1 + e^-0.75) = 0.386871;
    row 1: policy margin -4 - -2 = -2, reference margin -3 - -3.5 = 0.5, logit -1.25,
           loss log(1 + e^1.25) = 1.501929."""
    loss, stats = dpo_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-2.0, -3.0]),
        torch.tensor([-2.5, -3.5]),
        beta=0.5,
    )
    assert loss.item() == pytest.approx((0.386871006 + 1.501929081) / 2, abs=1e-6)
    assert stats["reward_margin"].item() == pytest.approx((0.75 - 1.25) / 2)
    assert stats["reward_acc"].item() == 0.5
    assert stats["logp_margin"].item() == pytest.approx(0.0)
