"""Block-local windowed attention (rag.llm.local): equal to the dense masked path, chosen by itself,
and O(T * w) in the scores it builds."""

from __future__ import annotations

import functools

import pytest
import torch

import rag.llm.model as model_module
from rag.llm.local import local_plan
from rag.llm.model import GPT
from tests.llm.test_model import left_pad, make_model, tiny, tokens

WINDOWS = {
    "sliding": {"window": "sliding", "window_size": 4},
    "dilated": {"window": "dilated", "window_size": 3, "dilation": 2},
    "global": {"window": "global", "window_size": 3, "global_positions": (1, 7, 12)},
}
CASES = [(w, pos, kv) for w in WINDOWS for pos, kv in (("rope", 2), ("alibi", 1), ("learned", 4))]


def dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the dense masked path (SDPA over the whole (T, T) mask)."""
    monkeypatch.setattr(model_module, "local_plan", lambda *args: None)


@pytest.mark.parametrize(("window", "pos", "n_kv_head"), CASES)
def test_block_local_equals_dense_masked_attention_and_its_gradients(window, pos, n_kv_head, monkeypatch):
    cfg = tiny(**WINDOWS[window], pos=pos, n_kv_head=n_kv_head)
    model = make_model(cfg).train()
    x = tokens(cfg, 2, 27)
    rows = [tokens(cfg, n, seed=n) for n in (27, 9, 20)]
    idx, pad = left_pad(rows)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(x, targets=x)
        out.loss.backward()
        padded = model(idx, pad_mask=pad).logits[pad]
        return out.logits, padded, [p.grad.clone() for p in model.parameters()]

    local = run()
    dense(monkeypatch)
    want = run()
    torch.testing.assert_close(local[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(local[1], want[1], atol=1e-5, rtol=0)
    for got, ref in zip(local[2], want[2], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_block_local_path_is_chosen_automatically(monkeypatch):
    """Windowed full forwards longer than two windows use it; full attention, short inputs, cached
    decoding, attention weights and prefix-LM masks (not local) keep the dense path."""
    calls = []
    real = model_module.attend_local
    monkeypatch.setattr(model_module, "attend_local", lambda *a: calls.append(1) or real(*a))

    def used(model: GPT, T: int, **kw) -> bool:
        calls.clear()
        model(tokens(model.config, 1, T), **kw)
        return bool(calls)

    sliding = make_model(tiny(**WINDOWS["sliding"]))
    assert used(sliding, 8) and used(sliding, 30)
    assert not used(sliding, 7)  # one window: nothing to save
    assert not used(sliding, 30, return_attn=True)
    assert not used(sliding, 20, cache=sliding.new_cache(1, 32))
    assert not used(make_model(tiny()), 30)
    prefix = make_model(tiny(**WINDOWS["sliding"], mask="prefix"))
    assert not used(prefix, 30, prefix_len=torch.tensor([5]))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("window", list(WINDOWS))
def test_any_block_size_gives_the_dense_result(window, rows, monkeypatch):
    """Blocks of C query rows read their own and the ceil((w - 1) / C) blocks before: any C, dividing
    the window or not, shorter or longer than it, gives the dense path's outputs and gradients."""
    cfg = tiny(**WINDOWS[window], pos="alibi", n_kv_head=2)
    model = make_model(cfg).train()
    x = tokens(cfg, 2, 26)

    def run() -> list[torch.Tensor]:
        model.zero_grad()
        out = model(x, targets=x)
        out.loss.backward()
        return [out.logits] + [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(model_module, "local_plan", functools.partial(local_plan, rows=rows))
    local = run()
    dense(monkeypatch)
    for got, ref in zip(local, run(), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_sdpa_mask_is_made_once_per_forward_and_shared_by_the_layers(monkeypatch):
    cfg = tiny(**WINDOWS["sliding"], n_layer=3)
    plans = []
    monkeypatch.setattr(model_module, "local_plan", lambda *a: plans.append(local_plan(*a)) or plans[-1])
    make_model(cfg)(tokens(cfg, 2, 30))
    (plan,) = plans
    assert len(plan._sdpa_masks) == 1  # three layers, one additive mask
    (mask,) = plan._sdpa_masks.values()
    assert mask.dtype == torch.float32 and mask.dim() == 4


@pytest.mark.parametrize("window", list(WINDOWS))
def test_scores_grow_linearly_with_length(window):
    """The block masks (one entry per score computed) hold T * (K + G) entries, K <= 2w window keys
    per query (1.5w with the default blocks of w / 2): doubling T doubles them, where the dense
    (T, T) mask quadruples."""
    cfg = tiny(**WINDOWS[window], block_size=4096)
    model = make_model(cfg)

    def plan(T: int):
        return local_plan(torch.arange(T)[None], cfg, lambda q, k: model._mask(q, k, False, None))

    def scores(T: int) -> int:
        return plan(T).mask.numel()

    w, d = cfg.window_size, cfg.dilation if window == "dilated" else 1
    g = len(cfg.global_positions)
    keys = plan(240).keys
    assert w <= keys <= 2 * w
    for T in (240, 960):
        assert scores(T) == T * (keys + g)  # T a multiple of d * w: no padded rows
    assert scores(1920) == 2 * scores(960)
    assert d * w * 2 <= 240
