"""Windowed attention in O(T * w) for full forwards (training, prefill): block-local attention.

A dense masked forward computes all T x T scores and then throws away all but w per query, so a
window saves nothing. Here the queries of a stream are cut into blocks of C = w rows; the keys one
block can see lie in the C + w - 1 positions ending at its last row, so each block attends to
those only: T * (2w - 1) scores instead of T^2. The mask inside a block is still the one position
rule of `rag.llm.masks` (and ALiBi's bias), so the result equals the dense masked path.

Dilated windows (every d-th key within w * d) become plain sliding windows of w over d streams:
the tokens whose index is r mod d form stream r, and a query's keys all lie in its own stream.
Padding (left-padded rows) keeps index distance equal to position distance for real tokens, so
the index-based streams and blocks stay exact.

Global windows (Longformer) are a sliding window plus G global tokens that see and are seen by all:
every block also reads the G global keys (unless they are already among its window's keys), and the
G global queries attend densely to all T keys. Cost T * (2w - 1 + G) + G * T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from rag.llm.model import ModelConfig

# (q_pos (B', C), k_pos (B', K)) -> bool (B', 1, C, K) or additive (B', H, C, K), as GPT._mask builds it
MaskFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LocalPlan:
    """How one forward's tokens are cut into blocks, and each block's mask; shared by all layers."""

    T: int
    streams: int  # d: dilation (1 for a sliding window)
    blocks: int  # n: query blocks per stream
    rows: int  # C: queries per block = window keys per query
    mask: Tensor  # bool (B|1, 1, d*n, C, K + G) or additive (B|1, H, d*n, C, K + G), K = 2C - 1
    global_index: Tensor | None = None  # (B|1, G) token index of each global position (0 if absent)
    global_present: Tensor | None = None  # (B|1, G) whether the row has that position
    global_mask: Tensor | None = None  # (B|1, 1|H, G, T): global queries over every key

    @property
    def keys(self) -> int:
        return 2 * self.rows - 1

    def queries(self, x: Tensor, fill: float = 0) -> Tensor:
        """(..., T, D) -> (..., d*n, C, D): each block's query rows."""
        s = self._streams(x, fill)
        return s.unflatten(-2, (self.blocks, self.rows)).flatten(-4, -3)

    def key_windows(self, x: Tensor, fill: float = 0) -> Tensor:
        """(..., T, D) -> (..., d*n, K, D): the keys each block can see (the rows - 1 before it, and it)."""
        s = F.pad(self._streams(x, fill), (0, 0, self.rows - 1, 0), value=fill)
        return s.unfold(-2, self.keys, self.rows).transpose(-1, -2).flatten(-4, -3)

    def merge(self, y: Tensor) -> Tensor:
        """(..., d*n, C, D) block outputs -> (..., T, D) in token order."""
        s = y.unflatten(-3, (self.streams, self.blocks)).flatten(-3, -2)  # (..., d, n*C, D)
        return s.transpose(-3, -2).flatten(-3, -2)[..., : self.T, :]

    def _streams(self, x: Tensor, fill: float) -> Tensor:
        """(..., T, D) -> (..., d, n*C, D): token t = l*d + r is row l of stream r; the tail is `fill`."""
        length = self.streams * self.blocks * self.rows
        x = F.pad(x, (0, 0, 0, length - self.T), value=fill)
        return x.unflatten(-2, (self.blocks * self.rows, self.streams)).transpose(-3, -2)


def local_plan(q_pos: Tensor, cfg: ModelConfig, mask_fn: MaskFn) -> LocalPlan | None:
    """A block-local plan for sliding and dilated windows when it is cheaper than dense attention,
    else None. q_pos (B|1, T) are the token positions (-1 = padding); keys are the same tokens."""
    if cfg.window == "full":
        return None
    d = cfg.dilation if cfg.window == "dilated" else 1
    w, length = cfg.window_size, q_pos.size(1)
    if length < 2 * w * d:  # one block: a block plan reads 2w - 1 keys per query, no fewer than dense
        return None
    n = math.ceil(length / (d * w))
    plan = LocalPlan(length, d, n, w, mask=q_pos.new_empty(0))
    qb = plan.queries(q_pos[..., None], fill=-1)[..., 0]  # (B|1, N, C)
    kb = plan.key_windows(q_pos[..., None], fill=-1)[..., 0]  # (B|1, N, K)
    duplicate = None
    if cfg.window == "global":
        # scalar compares, no tensor of the positions: no host->device copy per forward
        match = torch.stack([q_pos == p for p in cfg.global_positions], dim=1)  # (B|1, G, T)
        plan.global_present, plan.global_index = match.any(-1), match.int().argmax(-1)
        g_pos = q_pos.gather(1, plan.global_index).masked_fill(~plan.global_present, -1)
        plan.global_mask = mask_fn(g_pos, q_pos)
        kb = torch.cat([kb, g_pos[:, None].expand(-1, kb.size(1), -1)], dim=-1)  # (B|1, N, K + G)
        start = torch.arange(n, device=q_pos.device)[:, None] * w  # first query of each block
        index = plan.global_index[:, None]
        duplicate = (index > start - w) & (index < start + w)  # (B|1, N, G): already in the window
    mask = mask_fn(qb.flatten(0, 1), kb.flatten(0, 1))  # (B'*N, 1|H, C, K [+ G])
    plan.mask = mask.unflatten(0, qb.shape[:2]).transpose(1, 2)
    if duplicate is not None:  # a key counted twice would get twice its softmax weight
        dup = F.pad(duplicate, (plan.keys, 0))[:, None, :, None, :]
        no = False if plan.mask.dtype == torch.bool else float("-inf")
        plan.mask = plan.mask.masked_fill(dup, no)
    return plan


def attend_local(q: Tensor, k: Tensor, v: Tensor, plan: LocalPlan, dropout: float) -> Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) block by block; (B, H, T, D).

    GQA: a KV head's G query heads are folded into its block rows, as in `rag.llm.model.attend`
    (query head h reads KV head h // G), so every block's keys are read once per KV head."""
    B, H, T, D = q.shape
    n_kv = k.size(1)
    G = H // n_kv
    qb = plan.queries(q)  # (B, H, N, C, D)
    N, C = qb.shape[2:4]
    qb = qb.unflatten(1, (n_kv, G)).transpose(2, 3).flatten(3, 4)  # (B, n_kv, N, G*C, D)
    kb, vb = plan.key_windows(k), plan.key_windows(v)  # (B, n_kv, N, K, D)
    if plan.global_index is not None:  # every block also reads the global keys
        index = plan.global_index.expand(B, -1)[:, None, :, None].expand(-1, n_kv, -1, D)
        kb, vb = (
            torch.cat([b, t.gather(2, index)[:, :, None].expand(-1, -1, N, -1, -1)], dim=3)
            for b, t in ((kb, k), (vb, v))
        )
    mask = plan.mask
    if mask.dtype == torch.bool:  # (B|1, 1, N, C, K), the same for every head
        mask = mask.unsqueeze(3).expand(-1, -1, -1, G, -1, -1).flatten(3, 4)
    else:  # additive per-head bias (B|1, H, N, C, K)
        mask = mask.to(q.dtype).unflatten(1, (n_kv, G)).transpose(2, 3).flatten(3, 4)
    y = _sdpa_4d(qb, kb, vb, mask, dropout)
    y = y.reshape(B, n_kv, N, G, C, D).transpose(2, 3).reshape(B, H, N, C, D)
    y = plan.merge(y)
    if plan.global_index is not None:
        y = _global_queries(q, k, v, y, plan, dropout)
    return y


def _sdpa_4d(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: float) -> Tensor:
    """SDPA over (B, H, N, rows, D) blocks laid out as N batches of B*H heads: the fused kernels
    (flash on the CPU too) take 4-D inputs only, and the math fallback keeps every block's scores."""
    B, H, N = q.shape[:3]

    def four_d(x: Tensor) -> Tensor:
        return x.permute(2, 0, 1, 3, 4).flatten(1, 2)

    shared = mask.size(0) * mask.size(1) == 1  # the same mask for every row and head: broadcast it
    mask = mask[0, 0][:, None] if shared else four_d(mask.expand(B, H, -1, -1, -1))
    y = F.scaled_dot_product_attention(four_d(q), four_d(k), four_d(v), attn_mask=mask, dropout_p=dropout)
    return y.unflatten(1, (B, H)).permute(1, 2, 0, 3, 4)


def _global_queries(q: Tensor, k: Tensor, v: Tensor, y: Tensor, plan: LocalPlan, dropout: float) -> Tensor:
    """Overwrite the global tokens' rows of y (B, H, T, D) with their attention over all T keys."""
    B, H, T, D = q.shape
    G = H // k.size(1)
    index = plan.global_index.expand(B, -1)[:, None, :, None].expand(-1, H, -1, D)  # (B, H, n_g, D)
    mask = plan.global_mask
    mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
    rows = F.scaled_dot_product_attention(
        q.gather(2, index),
        k.repeat_interleave(G, dim=1),  # O(T) copies for n_g query rows; query head h reads KV head h // G
        v.repeat_interleave(G, dim=1),
        attn_mask=mask,
        dropout_p=dropout,
    )
    present = plan.global_present.expand(B, -1)[:, None, :, None]
    return y.scatter(2, index, torch.where(present, rows, y.gather(2, index)))
