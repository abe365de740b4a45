"""GPT model: every option value over a covering grid of tiny fp32 configs on the CPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Literal

import pytest
import torch

from rag.llm.masks import attention_mask
from rag.llm.model import GPT, AttnContext, ModelConfig, MoE

POS = ["sinusoidal", "learned", "rope", "alibi"]
WINDOW = ["full", "sliding", "dilated", "global"]
FFN = ["relu", "gelu", "swiglu", "moe"]
NORM = ["layernorm", "rmsnorm"]
KV_HEADS = [4, 2, 1]  # MHA, GQA, MQA with n_head=4
# Windows shorter than the test sequences, so sliding/dilated/global caches wrap.
WINDOW_ARGS = {
    "full": {},
    "sliding": {"window_size": 4},
    "dilated": {"window_size": 3, "dilation": 2},
    "global": {"window_size": 4, "global_positions": (0, 2)},
}
SEQ = 14


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls gain nothing from threads; on a shared 2-core box extra threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, n_experts=3)
    return ModelConfig(**{**base, **WINDOW_ARGS.get(kw.get("window", "full"), {}), **kw})


def _grid() -> list[ModelConfig]:
    """A Latin square over pos x window x ffn (every pair of those values once), with norm, KV heads,
    bias, tying and the MoE expert type rotating so every value of every option appears."""
    grid = []
    for (i, pos), (j, window) in itertools.product(enumerate(POS), enumerate(WINDOW)):
        ffn = FFN[(i + j) % 4]
        grid.append(
            tiny(
                pos=pos,
                window=window,
                ffn=ffn,
                norm=NORM[(i + j // 2) % 2],
                n_kv_head=KV_HEADS[(i + 2 * j) % 3],
                bias=(i + j) % 3 == 0,
                tie_embeddings=j % 2 == 0,
                moe_expert="gelu" if i % 2 else "swiglu",
            )
        )
    return grid


GRID = _grid()


def config_id(c: ModelConfig) -> str:
    return f"{c.pos}-{c.window}-{c.ffn}-{c.norm}-kv{c.n_kv_head}"


def make_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def tokens(cfg: ModelConfig, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token rows into (B, T) ids and a pad_mask (True = real token)."""
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, width - len(r) :], mask[b, width - len(r) :] = r, True
    return idx, mask


def test_grid_covers_every_option_value():
    for name, values in [
        ("pos", POS),
        ("window", WINDOW),
        ("ffn", FFN),
        ("norm", NORM),
        ("n_kv_head", KV_HEADS),
    ]:
        assert {getattr(c, name) for c in GRID} == set(values), name
    assert len({(c.pos, c.window) for c in GRID}) == 16 and len({(c.pos, c.ffn) for c in GRID}) == 16
    assert {c.moe_expert for c in GRID if c.ffn == "moe"} == {"gelu", "swiglu"}


# --- config -------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = tiny(window="global", ffn="moe", pos="alibi")
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.global_positions == (0, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pos": "xpos"}, "pos='xpos'"),
        ({"norm": "batchnorm"}, "norm="),
        ({"ffn": "glu"}, "ffn="),
        ({"window": "local"}, "window="),
        ({"n_kv_head": 3}, "must divide n_head"),
        ({"d_model": 30}, "not divisible by n_head"),
        ({"d_model": 36, "n_head": 12, "n_kv_head": 12}, "even head_dim"),
        ({"ffn": "moe", "moe_top_k": 4}, "moe_top_k"),
        ({"window": "global", "global_positions": ()}, "needs global_positions"),
        ({"window": "sliding", "global_positions": (0,)}, "only used with window='global'"),
        ({"window": "sliding", "window_size": 0}, "window_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_layer": "8"}, "n_layer must be int"),
        ({"bias": 1}, "bias must be bool"),
        ({"window": "global", "global_positions": (0, -3)}, "distinct and >= 0"),
    ],
)
def test_config_rejects_bad_combinations(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_from_dict_rejects_unknown_fields_and_presets_exist():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")
    assert ModelConfig.preset("default") == ModelConfig()
    assert ModelConfig.preset("tiny").n_layer < ModelConfig().n_layer


def test_default_reader_size_and_flops():
    model = GPT(ModelConfig())
    cfg = model.config
    assert (cfg.n_kv_head, cfg.pos, cfg.norm, cfg.ffn) == (4, "rope", "rmsnorm", "swiglu")
    assert 10e6 <= model.num_params() <= 30e6
    assert model.num_params(non_embedding=False) == model.num_params() + cfg.vocab_size * cfg.d_model
    n = model.num_params() + cfg.vocab_size * cfg.d_model  # the tied output projection is a matmul too
    assert model.flops_per_token(1024) == 6 * n + 12 * cfg.n_layer * cfg.d_model * 1024


def test_moe_flops_count_only_active_experts():
    dense, moe = GPT(tiny(ffn="swiglu")), GPT(tiny(ffn="moe", moe_top_k=1))
    router = sum(b.ffn.router.weight.numel() for b in moe.blocks)
    idle = sum(p.numel() for b in moe.blocks for e in b.ffn.experts[1:] for p in e.parameters())
    assert moe.num_params() == dense.num_params() + router + idle
    assert moe.flops_per_token(16) == dense.flops_per_token(16) + 6 * router


def test_residual_projections_use_scaled_init():
    model = GPT(ModelConfig(n_layer=8, d_model=256, n_head=4, n_kv_head=4, vocab_size=64))
    std = 0.02 / (2 * 8) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert abs(p.std().item() - std) < 0.1 * std, name
        elif name.endswith("wq.weight"):
            assert abs(p.std().item() - 0.02) < 0.002, name


def test_bad_inputs_give_clear_errors():
    model = make_model(tiny())
    x = tokens(model.config, 2, 5)
    with pytest.raises(ValueError, match="token ids must be in"):
        model(x + 100)
    with pytest.raises(ValueError, match="integer tensor"):
        model(x.float())
    with pytest.raises(ValueError, match="targets shape"):
        model(x, targets=x[:, :3])
    with pytest.raises(ValueError, match="targets must be in"):
        model(x, targets=x + 100)
    with pytest.raises(ValueError, match="pad_mask shape"):
        model(x, pad_mask=torch.ones(2, 4, dtype=torch.bool))
    learned = make_model(tiny(pos="learned"))
    with pytest.raises(ValueError, match="beyond block_size"):
        learned(tokens(learned.config, 1, 33))


def test_value_checks_are_cpu_only_so_gpu_forwards_never_sync():
    """The meta device holds no values: any read-back raises, as any read-back on a GPU would sync."""
    model = make_model(tiny()).to("meta")
    x = tokens(model.config, 2, 5).to("meta")
    out = model(x + 100, targets=x + 100)  # out of range, but checked only on the CPU
    assert out.logits.shape == (2, 5, model.config.vocab_size) and out.loss.device.type == "meta"
    with pytest.raises(ValueError, match="targets shape"):  # shape checks cost no sync: still everywhere
        model(x, targets=x[:, :3])


# --- forward ------------------------------------------------------------------------------------


def test_ignored_targets_do_not_count():
    model = make_model(tiny())
    x = tokens(model.config, 2, 8)
    targets = x.clone()
    targets[:, :5] = -100
    out = model(x, targets=targets)
    ref = torch.nn.functional.cross_entropy(out.logits[:, 5:].reshape(-1, 61), x[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert model(x, targets=torch.full_like(x, -100)).loss.item() == 0.0
    last = model(x, last_only=True).logits
    torch.testing.assert_close(last, out.logits[:, -1:])


@pytest.mark.parametrize("cfg", GRID, ids=config_id)
def test_causality(cfg):
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    base = model(x).logits
    for t in (3, 9):
        y = x.clone()
        y[:, t] = x[:, t] % (cfg.vocab_size - 1) + 1  # a different token
        changed = model(y).logits
        torch.testing.assert_close(changed[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert (changed[:, t] - base[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("cfg", GRID, ids=config_id)
def test_left_padded_batch_matches_rows_alone(cfg):
    model = make_model(cfg)
    rows = [tokens(cfg, n, seed=n) for n in (SEQ, 9, 3)]
    idx, mask = left_pad(rows)
    logits = model(idx, pad_mask=mask).logits
    for b, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(logits[b, mask[b]], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg", GRID, ids=config_id)
def test_attention_weights_are_masked_and_normalised(cfg):
    model = make_model(cfg)
    x = tokens(cfg, 2, SEQ)
    out = model(x, return_attn=True)
    torch.testing.assert_close(out.logits, model(x).logits, atol=1e-5, rtol=0)  # explicit math == SDPA
    pos = torch.arange(SEQ)[None]
    allowed = attention_mask(pos, pos, cfg)[:, None]
    assert len(out.attn) == cfg.n_layer
    for w in out.attn:
        assert w.shape == (2, cfg.n_head, SEQ, SEQ)
        assert (w[~allowed.expand_as(w)] == 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(2, cfg.n_head, SEQ))


# --- masks against plain-Python definitions ------------------------------------------------------


def reference_allowed(q: int, k: int, cfg: ModelConfig) -> bool:
    if q < 0 or k < 0 or k > q:
        return False
    dist = q - k
    if cfg.window == "full":
        return True
    if cfg.window == "sliding":
        return dist < cfg.window_size
    if cfg.window == "dilated":
        return dist < cfg.window_size * cfg.dilation and dist % cfg.dilation == 0
    return dist < cfg.window_size or q in cfg.global_positions or k in cfg.global_positions


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(window="full"),
        tiny(window="sliding", window_size=3),
        tiny(window="dilated", window_size=3, dilation=2),
        tiny(window="dilated", window_size=2, dilation=4),
        tiny(window="global", window_size=3, global_positions=(1, 7, 12)),
    ],
    ids=lambda c: f"{c.window}-w{c.window_size}-d{c.dilation}",
)
def test_masks_match_loop_reference(cfg):
    # queries with padding (-1) and keys in ring-buffer order with empty slots, as a cache holds them
    q_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]])
    k_pos = torch.tensor([[12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -1, -1, -1]])
    got = attention_mask(q_pos, k_pos, cfg)[0]
    want = torch.tensor([[reference_allowed(int(q), int(k), cfg) for k in k_pos[0]] for q in q_pos[0]])
    assert torch.equal(got, want)


# --- GQA / MQA ----------------------------------------------------------------------------------


def test_mha_attention_equals_torch_multihead_attention():
    cfg = tiny(pos="sinusoidal", n_kv_head=4)  # no rotation inside attention
    attn = make_model(cfg).blocks[0].attn
    ref = torch.nn.MultiheadAttention(cfg.d_model, cfg.n_head, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        ref.out_proj.weight.copy_(attn.proj.weight)
    x = torch.randn(2, SEQ, cfg.d_model)
    future = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    want, _ = ref(x, x, x, attn_mask=future, need_weights=False)
    got, _ = attn(x, AttnContext(mask=None, rope=None, cache=None, return_attn=False))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_gqa_equals_mha_with_repeated_kv_heads(pos):
    gqa = make_model(tiny(pos=pos, n_kv_head=2))
    mha = GPT(tiny(pos=pos, n_kv_head=4)).eval()
    group = 2
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            state[name] = w.view(2, -1, w.size(-1)).repeat_interleave(group, dim=0).reshape(-1, w.size(-1))
    mha.load_state_dict(state)
    assert mha.blocks[0].attn.wk.weight.shape[0] == 2 * gqa.blocks[0].attn.wk.weight.shape[0]
    x = tokens(gqa.config, 2, SEQ)
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(gqa(x, return_attn=True).logits, mha(x).logits, atol=1e-5, rtol=0)


def test_mqa_shares_one_kv_head():
    model = make_model(tiny(n_kv_head=1))
    assert model.blocks[0].attn.wk.weight.shape == (model.config.head_dim, model.config.d_model)
    out = model(tokens(model.config, 2, SEQ), targets=tokens(model.config, 2, SEQ))
    assert torch.isfinite(out.loss)


# --- MoE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_aux_loss_is_in_the_loss_and_trains_the_router(top_k):
    cfg = tiny(ffn="moe", n_experts=4, moe_top_k=top_k, moe_aux_weight=0.5)
    model = make_model(cfg).train()
    x = tokens(cfg, 2, SEQ)
    out = model(x, targets=x)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 0.5 * out.aux_loss)
    out.aux_loss.backward()  # the balancing term alone must reach the router
    routers = [b.ffn.router.weight for b in model.blocks]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)
    model.zero_grad()
    model(x, targets=x).ce_loss.backward()  # and so must the language-model loss, via the gates
    assert all(r.grad.abs().sum() > 0 for r in routers)


def test_moe_routes_each_token_to_its_top_k_experts():
    cfg = tiny(ffn="moe", n_experts=4, moe_top_k=2)
    moe: MoE = make_model(cfg).blocks[0].ffn
    x = torch.randn(2, 5, cfg.d_model)
    out, aux = moe(x)
    probs = moe.router(x).softmax(-1)
    flat_x, flat_p = x.reshape(-1, cfg.d_model), probs.reshape(-1, 4)
    for n in range(flat_x.size(0)):
        top = flat_p[n].topk(2)
        want = sum(
            w / top.values.sum() * moe.experts[int(e)](flat_x[n : n + 1])[0][0]
            for w, e in zip(top.values, top.indices, strict=True)
        )
        torch.testing.assert_close(out.reshape(-1, cfg.d_model)[n], want, atol=1e-5, rtol=0)
    share = torch.zeros(4)
    for e in probs.topk(2).indices.flatten():
        share[e] += 1
    torch.testing.assert_close(aux, 4 * (share / share.sum() * flat_p.mean(0)).sum())


def test_moe_experts_without_tokens_add_nothing_and_get_zero_gradient():
    """Every expert runs, even on zero tokens (no data-dependent branch for torch.compile to split on)."""
    cfg = tiny(ffn="moe", n_experts=4, moe_top_k=1)
    moe: MoE = make_model(cfg).blocks[0].ffn
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([1.0, 0.0, -1.0, -1.0])[:, None].expand(4, cfg.d_model))
    x = torch.rand(2, 5, cfg.d_model)  # positive inputs: expert 0 has the largest logit for every token
    out, _ = moe(x)
    gate = moe.router(x).softmax(-1)[..., :1]
    torch.testing.assert_close(out, gate * moe.experts[0](x)[0], atol=1e-6, rtol=0)
    out.sum().backward()
    idle = [p.grad for e in moe.experts[1:] for p in e.parameters()]
    assert all(g is not None and not g.any() for g in idle)


# --- training -----------------------------------------------------------------------------------


def test_tiny_model_overfits_a_fixed_batch():
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    model = make_model(cfg).train()
    x = tokens(cfg, 4, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.05:
            break
    assert losses[0] > 3.5 and min(losses) < 0.1, (losses[0], min(losses))


def test_config_validation_reads_any_field_annotation():
    """A new field's type is checked from its annotation; one validation cannot read is a clear
    TypeError naming the field, not a KeyError from a lookup table."""

    @dataclasses.dataclass
    class Extended(ModelConfig):
        scale: float | None = None
        sizes: tuple[int, ...] = ()

    assert Extended(scale=2, sizes=(1, 2)).scale == 2
    with pytest.raises(ValueError, match="ModelConfig.scale must be float"):
        Extended(scale="big")
    with pytest.raises(ValueError, match="sizes must be"):
        Extended(sizes=(1, "2"))
    with pytest.raises(ValueError, match="rope_theta must be float"):
        tiny(rope_theta=True)

    @dataclasses.dataclass
    class Unknown(ModelConfig):
        kind: Literal["a", "b"] = "a"

    with pytest.raises(TypeError, match="ModelConfig.kind: validation does not know the annotation"):
        Unknown()
