"""A preallocated key/value cache for incremental decoding.

Only the KV heads are stored (GQA/MQA shrink it by n_head / n_kv_head). Each slot also records
its token's position (-1 = empty or padding), so attention masks come from the same position
rule as in training (`rag.llm.masks`) whatever order the slots are in. For windowed attention the
cache is a ring buffer of the window's span, so memory and per-token cost stay O(window):

    sliding: window_size    dilated: window_size * dilation    global: window_size + global tokens

Global tokens leaving the ring are moved into their own slots, since every later query sees them.

A *static* cache (full attention) is for compiled decoding, as in gpt-fast: attention always reads
the whole preallocated buffer (empty slots are masked by their position -1) and the write cursor is
a tensor, so every decode step has the same shapes and touches no Python state -- torch.compile
captures one graph and CUDA graphs can replay it. The price is attending over max_len slots from
the first step; eager decoding keeps the default, which reads only the slots written so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rag.llm.masks import attention_mask, row_positions

if TYPE_CHECKING:
    from rag.llm.model import ModelConfig


def eager() -> bool:
    """Value checks read tensors back (a device sync, a torch.compile graph break): eager mode only."""
    return not torch.compiler.is_compiling()


RING_SPAN = {
    "full": lambda c: None,
    "sliding": lambda c: c.window_size,
    "dilated": lambda c: c.window_size * c.dilation,
    "global": lambda c: c.window_size,
}


@dataclass
class AppendPlan:
    """Dynamic full-size buffer: new keys go to slots [start, start + T); attention reads [0, start + T)."""

    start: int

    def write(self, cache: KVCache, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.start + k.size(2)
        cache.k[layer][:, :, self.start : end] = k
        cache.v[layer][:, :, self.start : end] = v
        return cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]


@dataclass
class StaticPlan:
    """Static buffer (compiled decoding): the new keys go to tensor slots; attention reads every slot."""

    slots: Tensor  # (T,)

    def write(self, cache: KVCache, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cache.k[layer].index_copy_(2, self.slots, k)
        cache.v[layer].index_copy_(2, self.slots, v)
        return cache.k[layer], cache.v[layer]


@dataclass
class RingPlan:
    """Ring buffer: attention reads [global slots, ring, new tokens]; then the last `size` new tokens
    overwrite the oldest ring slots, and global tokens leaving the ring move to their own slots."""

    slots: Tensor  # (n_keep,) ring slots written by the new tokens [first_kept:]
    first_kept: int
    moved: Tensor  # (B, n_global) bool: this global slot receives a leaving token
    source: Tensor  # (B, n_global) index of that token in the keys read, [global, ring, new]

    def write(self, cache: KVCache, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys = torch.cat([cache.global_k[layer], cache.k[layer], k], dim=2)
        values = torch.cat([cache.global_v[layer], cache.v[layer], v], dim=2)
        index = self.source[:, None, :, None].expand(-1, keys.size(1), -1, keys.size(3))
        moved = self.moved[:, None, :, None]
        for kept, new in ((cache.global_k[layer], keys), (cache.global_v[layer], values)):
            kept.copy_(torch.where(moved, new.gather(2, index), kept))
        cache.k[layer][:, :, self.slots] = k[:, :, self.first_kept :]
        cache.v[layer][:, :, self.slots] = v[:, :, self.first_kept :]
        return keys, values


class KVCache:
    """Per-layer K/V buffers n_layer x (B, n_kv_head, size, head_dim) plus per-slot positions (B, size).

    Use: `q_pos, k_pos = cache.begin(valid)` once per forward (positions of the new tokens and of
    the keys they see), then `k, v = cache.update(layer, k, v)` in every layer. `length` counts the
    tokens written (padding included); `next_pos` (B,) counts each row's real tokens.
    max_len bounds full attention; a window whose span is shorter than max_len uses a ring buffer
    and has no length limit. static=True (full-attention buffers only; see the module docstring)
    returns the whole buffer from `update`, for torch.compile. ring=False keeps every key of a
    windowed model (max_len slots; the mask still applies the window), e.g. for global tokens
    that must see keys a ring would have dropped.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        static: bool = False,
        ring: bool = True,
    ):
        max_len = config.block_size if max_len is None else max_len
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        span = RING_SPAN[config.window](config)
        self.ring = ring and span is not None and span < max_len
        self.size = span if self.ring else max_len
        if static and self.ring:
            raise ValueError(
                f"a static cache needs full-size buffers, but window={config.window!r} with span {span} < "
                f"max_len={max_len} uses a ring buffer; use static=False"
            )
        self.static = static
        n_global = len(config.global_positions) if self.ring else 0

        # One tensor per layer, not one stacked tensor: a compiled step then writes into its inputs
        # in place, where a write into a view of a stacked buffer is copied out and back whole.
        def buffers(slots: int) -> list[Tensor]:
            shape = (batch_size, config.n_kv_head, slots, config.head_dim)
            return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

        self.k, self.v = buffers(self.size), buffers(self.size)
        self.global_k, self.global_v = buffers(n_global), buffers(n_global)
        self.global_ids = torch.tensor(config.global_positions[:n_global], device=device, dtype=torch.long)
        self.pos = torch.empty(batch_size, self.size, device=device, dtype=torch.long)
        self.global_pos = torch.empty(batch_size, n_global, device=device, dtype=torch.long)
        self.next_pos = torch.empty(batch_size, device=device, dtype=torch.long)
        self.evicted = torch.empty(
            batch_size, device=device, dtype=torch.long
        )  # newest non-global key dropped
        self.cursor = torch.empty((), device=device, dtype=torch.long)  # slots written (static mode)
        if static and torch.device(device or "cpu").type == "cuda":
            # fixed addresses let CUDA graphs replay steps that write into these buffers in place
            for t in (*self.k, *self.v, self.pos, self.next_pos, self.cursor):
                torch._dynamo.mark_static_address(t, guard=False)  # no recompile per pooled cache
        self.reset()

    def reset(self) -> None:
        """Forget all tokens (buffers are kept; empty slots are marked by position -1)."""
        self.pos.fill_(-1)
        self.global_pos.fill_(-1)
        self.next_pos.zero_()
        self.evicted.fill_(-1)
        self.cursor.zero_()
        self._length = 0
        self._plan: AppendPlan | StaticPlan | RingPlan | None = None
        self.prefix_len: Tensor | None = None

    def select_rows(self, index: Tensor) -> None:
        """Keep the rows `index` (in that order, repeats allowed), e.g. to continue several
        candidate answers from one prefilled prompt without computing the prompt again."""
        for buffers in (self.k, self.v, self.global_k, self.global_v):
            buffers[:] = [t.index_select(0, index) for t in buffers]
        self.pos, self.global_pos, self.next_pos, self.evicted = (
            t.index_select(0, index) for t in (self.pos, self.global_pos, self.next_pos, self.evicted)
        )
        if self.prefix_len is not None:
            self.prefix_len = self.prefix_len.index_select(0, index)
        self.batch_size = int(index.numel())

    def prefix(self, prefix_len: Tensor | None) -> Tensor | None:
        """Remember a prefix-LM prompt's per-row prefix lengths (given at prefill) for later steps."""
        if prefix_len is not None:
            self.prefix_len = prefix_len
        return self.prefix_len

    @property
    def length(self) -> int:
        """Tokens written so far, padding included (a device read in static mode)."""
        return int(self.cursor) if self.static else self._length

    def memory_bytes(self) -> int:
        buffers = (*self.k, *self.v, *self.global_k, *self.global_v)
        return sum(t.numel() * t.element_size() for t in buffers)

    def begin(self, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Register T new tokens (valid (B, T), False = padding): returns their positions (B, T) and
        the positions (B, Tk) of the keys that `update` will return, then advances the bookkeeping."""
        rows, T = valid.shape
        if rows != self.batch_size:
            raise ValueError(f"batch of {rows} rows does not match the cache's batch_size={self.batch_size}")
        q_pos = row_positions(valid, self.next_pos)
        if self.static:
            return q_pos, self._begin_static(valid, q_pos)
        start, end = self._length, self._length + T
        if not self.ring and end > self.size:
            self._refuse(start, T)
        if self.ring and self._needs_evicted(q_pos):
            raise ValueError(
                "a query needs a key already evicted from the windowed KV cache (e.g. a global position "
                "beyond the window decoded step by step): prefill through it in one chunk, "
                "or use a larger cache"
            )
        self.next_pos += valid.sum(dim=1)
        self._length = end
        if self.ring:
            return q_pos, self._plan_ring(q_pos, start)
        self.pos[:, start:end] = q_pos
        self._plan = AppendPlan(start)
        return q_pos, self.pos[:, :end]

    def _needs_evicted(self, q_pos: Tensor) -> bool:
        """Whether a new query would need a key the ring dropped. On the CPU a clear error; elsewhere
        a device-side assert, so decoding never waits for the device to answer (no host sync)."""
        stale = attention_mask(q_pos, self.evicted[:, None], self.config).any()
        if q_pos.device.type == "cpu" and eager():
            return bool(stale)
        if q_pos.device.type == "cuda":
            torch._assert_async(~stale, "a query needs a key already evicted from the windowed KV cache")
        return False

    def _refuse(self, start: int, T: int) -> None:
        raise ValueError(f"KV cache full: {start} + {T} tokens > max_len={self.size}; use a larger max_len")

    def _begin_static(self, valid: Tensor, q_pos: Tensor) -> Tensor:
        """Write the new positions at the tensor cursor; every key slot is returned (empties are -1).

        Compiled code skips the room check (it would read the cursor back); the caller sizes the
        cache (as `generate` does), and an index past the buffer is a device-side error.
        """
        T = valid.size(1)
        if eager() and int(self.cursor) + T > self.size:
            self._refuse(int(self.cursor), T)
        slots = self.cursor + torch.arange(T, device=self.cursor.device)
        self.pos.index_copy_(1, slots, q_pos)
        self.next_pos += valid.sum(dim=1)
        self.cursor += T
        self._plan = StaticPlan(slots)
        return self.pos

    def _plan_ring(self, q_pos: Tensor, start: int) -> Tensor:
        """Keys seen are [global slots, ring, new tokens]; the last `size` new tokens then overwrite
        the oldest ring slots. Whatever leaves (overwritten slots, new tokens that do not fit) is
        moved to the global slots if it is a global token, else it is gone for good."""
        T, S, G = q_pos.size(1), self.size, self.global_ids.numel()
        k_pos = torch.cat([self.global_pos, self.pos, q_pos], dim=1)
        n_keep = min(T, S)
        slots = (start + torch.arange(T - n_keep, T, device=q_pos.device)) % S
        leaving = torch.cat([G + slots, G + S + torch.arange(T - n_keep, device=q_pos.device)])
        leaving_pos = k_pos[:, leaving]  # (B, T)
        match = leaving_pos[:, :, None] == self.global_ids  # (B, T, G); a position leaves at most once
        moved, first = match.any(dim=1), match.int().argmax(dim=1)  # (B, G); masks, no nonzero: no sync
        self.global_pos.copy_(torch.where(moved, leaving_pos.gather(1, first), self.global_pos))
        gone = leaving_pos.masked_fill(match.any(dim=-1), -1).amax(dim=1)
        self.evicted = torch.maximum(self.evicted, gone)
        self.pos[:, slots] = q_pos[:, T - n_keep :]
        self._plan = RingPlan(slots, T - n_keep, moved, leaving[first])
        return k_pos

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys/values (B, n_kv_head, T, head_dim) as planned by `begin` and
        return all keys/values the new queries attend to, in the order of begin's key positions."""
        if self._plan is None:
            raise RuntimeError("KVCache.update before begin: call begin once per forward")
        return self._plan.write(self, layer, k.to(self.k[layer].dtype), v.to(self.v[layer].dtype))
