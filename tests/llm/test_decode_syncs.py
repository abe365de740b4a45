"""Decoding never reads a device tensor back on the host (a sync that stalls the GPU each step).

The meta device holds no values, so any read-back (`bool`, `int`, `.item()`, `nonzero`) raises there,
as it would wait on a GPU: a decode step that runs on meta has no host sync by construction.
"""

from __future__ import annotations

import torch

from rag.llm.model import MoE
from tests.llm.test_model import make_model, tiny, tokens


def test_decode_steps_with_ring_cache_learned_positions_and_moe_have_no_host_sync():
    """Ring buffer with global tokens moving to their slots (was `nonzero` + `any()`), learned
    positions (was `int(pos.max())`), MoE routing (was `nonzero` per expert), ALiBi and global masks
    (were a host->device copy per forward)."""
    for pos in ("learned", "alibi"):
        cfg = tiny(pos=pos, ffn="moe", n_experts=4, window="global", window_size=4, global_positions=(0, 2))
        model = make_model(cfg).to("meta")
        cache = model.new_cache(2, 32)
        assert cache.ring
        x = tokens(cfg, 2, 12).to("meta")
        for t in range(12):
            out = model(x[:, t : t + 1], cache=cache, last_only=True)
        assert out.logits.shape == (2, 1, cfg.vocab_size) and cache.length == 12


def test_moe_dense_decode_path_equals_the_sparse_path():
    """The sync-free dense combine (decode steps off the CPU) gives what per-expert dispatch gives."""
    cfg = tiny(ffn="moe", n_experts=4, moe_top_k=2)
    moe: MoE = make_model(cfg).blocks[0].ffn
    flat = torch.randn(7, cfg.d_model)
    gates, chosen, _ = moe.route(flat)
    torch.testing.assert_close(
        moe.dense(flat, gates, chosen), moe.sparse(flat, gates, chosen), atol=1e-6, rtol=0
    )
