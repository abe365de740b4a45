"""Windowed attention in O(T * w) for full forwards (training, prefill): block-local attention.

A dense masked forward computes all T x T scores and then throws away all but w per query, so a
window saves nothing. Here the queries of a stream are cut into blocks of C rows (C = ceil(w / 2)
by default); the keys one block can see lie in its own block and the m = ceil((w - 1) / C) blocks
before it, so each block attends to those K = (m + 1) * C keys only (K = 1.5w for even w): T * K
scores instead of T^2. The windows are concatenated block views, no overlapping `unfold` (whose
backward is a slow scatter-add). The mask inside a block is still the one position rule of
`rag.llm.masks` (and ALiBi's bias), so the result equals the dense masked path. Smaller blocks
compute fewer masked scores (K / w - 1 of them per query: 1 for C = w, 0.5 for C = w / 2) but
make more, smaller kernel batches and copy more keys; at T = 4096, w = 256 on the CPU, C = w / 2
was ~10% faster in fwd + bwd than C = w and than C = w / 4 (docs/benchmarks.md).

Dilated windows (every d-th key within w * d) become plain sliding windows of w over d streams:
the tokens whose index is r mod d form stream r, and a query's keys all lie in its own stream.
Padding (left-padded rows) keeps index distance equal to position distance for real tokens, so
the index-based streams and blocks stay exact.

Global windows (Longformer) are a sliding window plus G global tokens that see and are seen by all:
every block also reads the G global keys (unless they are already among its window's keys), and the
G global queries attend densely to all T keys. Cost T * (K + G) + G * T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
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
    rows: int  # C: queries per block
    window: int  # w: keys per query
    mask: Tensor  # bool (B|1, 1, d*n, C, K + G) or additive (B|1, H, d*n, C, K + G), K = `keys`
    global_index: Tensor | None = None  # (B|1, G) token index of each global position (0 if absent)
    global_present: Tensor | None = None  # (B|1, G) whether the row has that position
    global_mask: Tensor | None = None  # (B|1, 1|H, G, T): global queries over every key
    _sdpa_masks: dict = field(default_factory=dict)  # sdpa_mask's, made once per forward

    def sdpa_mask(self, B: int, n_kv: int, G: int, dtype: torch.dtype) -> Tensor:
        """`mask` as `_sdpa_4d` passes it to SDPA: additive in `dtype` (the CPU kernels turn a bool
        mask into one on every call, backward too), a KV head's G query heads folded into its rows,
        4-D; built by the first layer and shared by all (and by their backward: kept once)."""
        key = (B, n_kv, G, dtype)
        if key not in self._sdpa_masks:
            mask = self.mask
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                    ~mask, float("-inf")
                )
            mask = mask.to(dtype)  # (B|1, 1|H, N, C, K); 1: a bool mask, the same for every head
            mask = mask.expand(-1, G, -1, -1, -1) if mask.size(1) == 1 else mask
            mask = mask.unflatten(1, (-1, G)).transpose(2, 3).flatten(3, 4)  # (B|1, 1|n_kv, N, G*C, K)
            if mask.size(0) * mask.size(1) == 1:  # the same for every row and head: broadcast it
                self._sdpa_masks[key] = mask[0, 0][:, None]
            else:
                self._sdpa_masks[key] = _four_d(mask.expand(B, n_kv, -1, -1, -1))
        return self._sdpa_masks[key]

    @property
    def back(self) -> int:
        """m: blocks before its own that a block's window reaches into."""
        return -(-(self.window - 1) // self.rows)

    @property
    def keys(self) -> int:
        """K: window keys per block, its own C and the m * C before them."""
        return (self.back + 1) * self.rows

    def queries(self, x: Tensor, fill: float = 0) -> Tensor:
        """(..., T, D) -> (..., d*n, C, D): each block's query rows."""
        s = self._streams(x, fill)
        return s.unflatten(-2, (self.blocks, self.rows)).flatten(-4, -3)

    def key_windows(self, x: Tensor, fill: float = 0) -> Tensor:
        """(..., T, D) -> (..., d*n, K, D): the keys of each block's window, the m blocks before it and
        its own (`fill` before the first), concatenated: its backward is m + 1 slice adds."""
        m, n = self.back, self.blocks
        s = F.pad(self._streams(x, fill), (0, 0, m * self.rows, 0), value=fill)
        s = s.unflatten(-2, (n + m, self.rows))  # (..., d, n + m, C, D)
        return torch.cat([s[..., j : j + n, :, :] for j in range(m + 1)], dim=-2).flatten(-4, -3)

    def merge(self, y: Tensor) -> Tensor:
        """(..., d*n, C, D) block outputs -> (..., T, D) in token order."""
        s = y.unflatten(-3, (self.streams, self.blocks)).flatten(-3, -2)  # (..., d, n*C, D)
        return s.transpose(-3, -2).flatten(-3, -2)[..., : self.T, :]

    def _streams(self, x: Tensor, fill: float) -> Tensor:
        """(..., T, D) -> (..., d, n*C, D): token t = l*d + r is row l of stream r; the tail is `fill`."""
        length = self.streams * self.blocks * self.rows
        x = F.pad(x, (0, 0, 0, length - self.T), value=fill)
        return x.unflatten(-2, (self.blocks * self.rows, self.streams)).transpose(-3, -2)


def local_plan(q_pos: Tensor, cfg: ModelConfig, mask_fn: MaskFn, rows: int | None = None) -> LocalPlan | None:
    """A block-local plan for sliding and dilated windows when it is cheaper than dense attention,
    else None. q_pos (B|1, T) are the token positions (-1 = padding); keys are the same tokens.
    rows: queries per block (default ceil(w / 2)); any value gives the same result."""
    if cfg.window == "full":
        return None
    d = cfg.dilation if cfg.window == "dilated" else 1
    w, length = cfg.window_size, q_pos.size(1)
    if length < 2 * w * d:  # a block plan reads up to 2w keys per query, no fewer than dense
        return None
    C = rows or -(-w // 2)
    n = math.ceil(length / (d * C))
    plan = LocalPlan(length, d, n, C, w, mask=q_pos.new_empty(0))
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
        start = torch.arange(n, device=q_pos.device)[:, None] * C  # first query of each block
        index = plan.global_index[:, None]
        duplicate = (index >= start - (plan.keys - C)) & (
            index < start + C
        )  # (B|1, N, G): already in the window
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
    y = _sdpa_4d(qb, kb, vb, plan.sdpa_mask(B, n_kv, G, q.dtype), dropout)
    y = y.reshape(B, n_kv, N, G, C, D).transpose(2, 3).reshape(B, H, N, C, D)
    y = plan.merge(y)
    if plan.global_index is not None:
        y = _global_queries(q, k, v, y, plan, dropout)
    return y


def _four_d(x: Tensor) -> Tensor:
    """(B, H, N, rows, D) -> (N, B*H, rows, D): N batches of B*H heads."""
    return x.permute(2, 0, 1, 3, 4).flatten(1, 2)


def _sdpa_4d(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: float) -> Tensor:
    """SDPA over (B, H, N, rows, D) blocks laid out as N batches of B*H heads: the fused kernels
    (flash on the CPU too) take 4-D inputs only, and the math fallback keeps every block's scores.
    mask: `LocalPlan.sdpa_mask`, already 4-D."""
    B, H = q.shape[:2]
    y = F.scaled_dot_product_attention(_four_d(q), _four_d(k), _four_d(v), attn_mask=mask, dropout_p=dropout)
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
