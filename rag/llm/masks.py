"""Attention masks as a function of query and key *positions*.

Every mask is one rule over `q_pos` (B, Tq) and `k_pos` (B, Tk), where -1 marks padding and
empty cache slots. Because the rule only looks at positions, full forwards, cached decoding,
ring buffers (keys in any slot order) and left-padded batches all use the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from rag.llm.model import ModelConfig


def row_positions(valid: Tensor, start: Tensor | None = None) -> Tensor:
    """Per-row positions of real tokens (cumsum of the pad mask), -1 at padding.

    `start` (B,) continues the count, e.g. from a KV cache's per-row counters.
    """
    pos = valid.long().cumsum(1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return pos.masked_fill(~valid, -1)


def _full(q: Tensor, k: Tensor, cfg: ModelConfig) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=q.device)


def _sliding(q: Tensor, k: Tensor, cfg: ModelConfig) -> Tensor:
    return q - k < cfg.window_size


def _dilated(q: Tensor, k: Tensor, cfg: ModelConfig) -> Tensor:
    dist = q - k
    return (dist < cfg.window_size * cfg.dilation) & (dist % cfg.dilation == 0)


def _global(q: Tensor, k: Tensor, cfg: ModelConfig) -> Tensor:
    """Longformer: a sliding window, plus global tokens that see and are seen by everyone."""
    allowed = _sliding(q, k, cfg)
    for p in cfg.global_positions:  # scalar compares: no host->device copy (a sync) per forward
        allowed = allowed | (q == p) | (k == p)
    return allowed


WINDOWS: dict[str, Callable[[Tensor, Tensor, ModelConfig], Tensor]] = {
    "full": _full,
    "sliding": _sliding,
    "dilated": _dilated,
    "global": _global,
}


def attention_mask(
    q_pos: Tensor, k_pos: Tensor, cfg: ModelConfig, prefix_len: Tensor | None = None
) -> Tensor:
    """(B, Tq, Tk) bool, True = query may attend key: both real, causal, and inside the window.

    prefix_len (B,) makes it a prefix-LM mask (UniLM): a key at a position below its row's
    prefix_len is seen by every query of that row, so the prompt is read bidirectionally, as an
    encoder reads it, while the answer after it stays causal. Cached decoding needs nothing more:
    a decode step's query is past the prefix, where the rule is plain causality.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    order = k <= q
    if prefix_len is not None:
        order = order | (k < prefix_len[:, None, None])
    return (q >= 0) & (k >= 0) & order & WINDOWS[cfg.window](q, k, cfg)
