"""Text generation: prefill the prompt once, then decode one token per step from the KV cache.

An engine kept apart from the model (as in gpt-fast): the model only maps tokens to logits, this
module owns sampling, stopping and detokenization. Per step the Python work is O(batch + length of
the stop strings), never O(context): one forward of the new tokens, one sampling call, one
device->host copy of the sampled ids, and an incremental UTF-8 decode of their bytes.

Batches are left-padded; the model counts positions per row, so each row generates exactly what
it would alone, and stops on its own.

`CompiledDecoder` is the fast path (gpt-fast's recipe): a torch.compile'd one-token step over a
static KV cache that is reused across calls, so every step has the same shapes and, on CUDA, is
replayed as a CUDA graph. Prefill stays eager (prompt lengths vary).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from rag.llm.cache import KVCache
from rag.llm.model import GPT
from rag.llm.tokenizer import StreamDecoder, Tokenizer

MIN_TEMPERATURE = 1e-5  # sampling this cold is argmax anyway; colder would divide by a float32 zero


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy argmax; top_k / top_p then do nothing
    top_k: int | None = None  # sample among the k most likely tokens
    top_p: float | None = None  # nucleus: the smallest set of tokens with probability >= top_p
    stop_token_ids: Sequence[int] = ()  # EOS is added unless stop_at_eos=False
    stop_strings: Sequence[str] = ()  # the text is cut before the first one that appears
    seed: int | None = None  # same seed -> same output; None -> a fresh random seed per call
    stop_at_eos: bool = True
    # Readers with a copy head (rag.llm.grounded): the answer is a span of one source + its [n].
    # False decodes the model's full distribution freely. Other models ignore it.
    grounded: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if isinstance(self.stop_strings, str):  # a bare string would be read as one stop per character
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")
        if isinstance(self.stop_token_ids, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")


@dataclass
class GenerationResult:
    text: str  # special tokens left out, cut before a stop string
    token_ids: list[int]  # the new tokens, without the stop token that ended generation
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens or the context)
    prompt_tokens: int = 0


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row from logits (B, V): argmax at temperature 0, else top-k/top-p sampling."""
    if temperature < MIN_TEMPERATURE:  # (x - max) / t would underflow t to 0 in float32: 0/0
        return logits.argmax(dim=-1)
    # shifted so the best logit is 0: a tiny temperature then gives -inf for the rest, never inf - inf
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def context_limit(model: GPT) -> int | None:
    """Most positions a sequence may use, or None when a windowed model can go on indefinitely.

    Full attention is trained on block_size positions and is not extrapolated past them; a window
    only ever sees window_size keys (the cache is a ring buffer), unless a learned position table
    caps the positions themselves.
    """
    cfg = model.config
    if cfg.window != "full" and cfg.pos != "learned":
        return None
    return cfg.block_size


class Completion:
    """One sequence being generated: its ids, its final text so far, stop tokens and stop strings.

    Text that could be the start of a stop string is held back until it cannot be, so a streamed
    piece is never retracted.
    """

    def __init__(
        self,
        decoder: StreamDecoder,
        stop_ids: frozenset[int],
        stops: Sequence[str],
        budget: int,
        prompt_len: int,
    ):
        self.decoder, self.stop_ids, self.stops, self.budget = decoder, stop_ids, tuple(stops), budget
        self.prompt_len = prompt_len
        self.prefixes = {s[:k] for s in self.stops for k in range(1, len(s))}  # proper prefixes
        self.ids: list[int] = []
        self.pieces: list[str] = []  # emitted text
        self.pending = ""  # decoded text held back: it may be the start of a stop string
        self.finish_reason: str | None = None if budget > 0 else "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        """Take the next token; return the text that is now final (possibly "")."""
        if token_id in self.stop_ids:
            return self._end("stop")
        self.ids.append(token_id)
        piece = self._add(self.decoder.push(token_id))
        if not self.done and len(self.ids) >= self.budget:
            piece += self._end("length")
        return piece

    def _end(self, reason: str) -> str:
        piece = self._add(self.decoder.flush())  # the flushed tail may still complete a stop string
        if not self.done:
            self.finish_reason = reason
            piece += self._emit(self.pending)  # nothing more can complete a stop string
            self.pending = ""
        return piece

    def _add(self, new: str) -> str:
        """Append decoded text; cut at a stop string, else emit all but a possible stop prefix.

        `pending` holds no complete stop string, so any match in it + new is a new one, and the
        work is bounded by the stop strings' length, not by the text generated so far.
        """
        if self.done or not new:
            return ""
        buf = self.pending + new
        if not self.stops:
            return self._emit(buf)
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            self.finish_reason = "stop"
            return self._emit(buf[:cut])
        keep = max((len(p) for p in self.prefixes if buf.endswith(p)), default=0)
        self.pending = buf[len(buf) - keep :]
        return self._emit(buf[: len(buf) - keep])

    def _emit(self, text: str) -> str:
        if text:
            self.pieces.append(text)
        return text

    def result(self) -> GenerationResult:
        return GenerationResult(
            "".join(self.pieces), self.ids, self.finish_reason or "length", self.prompt_len
        )


def _prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int], vocab: int) -> list[int]:
    """Strings start a document (BOS first, their text never parsed for specials); ids are used as given."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=True)
    if isinstance(prompt, int | float) or not isinstance(prompt, Sequence | Tensor):
        raise TypeError(f"a prompt is a str or a sequence of token ids, got {type(prompt).__name__}")
    ids = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError("prompt token ids must be integers")
    if not ids:
        raise ValueError("empty prompt: give at least one token id (e.g. the BOS id)")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got [{min(ids)}, {max(ids)}]")
    return ids


Forward = Callable[[Tensor, KVCache, "Tensor | None"], Tensor]  # (idx, cache, pad_mask) -> last logits


def forward_last(model: GPT) -> Forward:
    """The model's logits for the last new token: the one call an engine makes per step."""
    return lambda idx, cache, pad_mask: model(idx, cache=cache, pad_mask=pad_mask, last_only=True).logits


class CompiledDecoder:
    """Decode steps compiled once per model, over static KV caches reused across calls.

    A static cache (`KVCache(static=True)`) of the model's full context gives every step the same
    shapes, so torch.compile captures one graph (`fullgraph=True`: a graph break is an error, not
    a silent slowdown). Caches are pooled by shape and reused, which keeps their buffers at the
    same addresses, as CUDA graphs ("reduce-overhead", the default mode on CUDA) need; a cache is
    lent to one generation at a time, so interleaved streams never share one. Full attention
    only: windowed models already decode from an O(window) ring buffer.
    """

    def __init__(self, model: GPT, mode: str | None = None):
        if model.config.window != "full":
            raise ValueError(
                f"compiled decoding uses a static full-attention cache; window={model.config.window!r} "
                "models decode eagerly from their ring buffer"
            )
        self.model = model
        on_cuda = model.tok_emb.weight.device.type == "cuda"
        self.mode = mode if mode is not None else ("reduce-overhead" if on_cuda else "default")
        self.step: Forward = torch.compile(forward_last(model), fullgraph=True, mode=self.mode)
        self._free: dict[tuple[int, int], list[KVCache]] = {}
        self._lock = threading.Lock()  # lending is thread-safe; one cache serves one generation

    @contextmanager
    def cache(self, batch_size: int, slots: int | None = None) -> Iterator[KVCache]:
        """Lend an empty static cache of batch_size rows and at least `slots` slots (default: the
        model's context). Usually that is block_size; left padding can need more slots than any
        row has positions, and then a cache of the next multiple of block_size is made (and
        compiled for) once, so few shapes ever exist."""
        block = self.model.config.block_size
        size = block * max(1, math.ceil((slots or 0) / block))
        with self._lock:
            free = self._free.setdefault((batch_size, size), [])
            cache = free.pop() if free else None
        with torch.inference_mode():  # the engine decodes in inference mode; so are its caches
            cache = cache or self.model.new_cache(batch_size, size, static=True)
            cache.reset()
        try:
            yield cache
        finally:
            with self._lock:
                free.append(cache)


@torch.inference_mode()
def _new_cache(model: GPT, batch_size: int, slots: int) -> KVCache:
    """The eager engine's cache. A global token beyond the first window must see every earlier key,
    which a ring buffer has already dropped, so such models keep all keys (the mask still applies
    the window); other windows decode from their O(window) ring."""
    cfg = model.config
    if cfg.window == "global" and any(p >= cfg.window_size for p in cfg.global_positions):
        return model.new_cache(batch_size, slots, ring=False)
    return model.new_cache(batch_size, slots)


@torch.inference_mode()
def _step(
    forward: Forward,
    idx: Tensor,
    cache: KVCache,
    pad_mask: Tensor | None,
    config: GenerationConfig,
    gen,
    vocab: int,
) -> Tensor:
    """Feed idx (B, T) through the cache and sample the next token of every row."""
    logits = forward(idx, cache, pad_mask)[:, -1, :vocab]
    # (the model may pad its vocabulary; only the tokenizer's ids can be decoded)
    return sample(logits, config.temperature, config.top_k, config.top_p, gen)


def _run(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig,
    rows: list[Completion],
    decoder: CompiledDecoder | None = None,
    forward: Forward | None = None,
) -> Iterator[tuple[int, str]]:
    """The engine: yields (row, text piece) as text becomes final; appends a Completion per prompt to rows."""
    if decoder is not None and forward is not None:
        raise ValueError("a custom forward step decodes eagerly: pass either decoder or forward")
    if decoder is not None and decoder.model is not model:
        raise ValueError("the CompiledDecoder was built for another model")
    ids = [_prompt_ids(tokenizer, p, model.config.vocab_size) for p in prompts]
    lens = [len(p) for p in ids]
    limit = context_limit(model)
    if limit is not None and max(lens, default=0) > limit:
        raise ValueError(
            f"prompt of {max(lens)} tokens exceeds the model's context of {limit} tokens; shorten it"
        )
    # The last sampled token is never fed back, so a row may end one token past the context.
    new = config.max_new_tokens
    budgets = [new if limit is None else min(new, limit - n + 1) for n in lens]
    stop_ids = frozenset(config.stop_token_ids) | frozenset([tokenizer.eos_id] * config.stop_at_eos)
    rows += [
        Completion(tokenizer.stream_decoder(), stop_ids, config.stop_strings, b, n)
        for b, n in zip(budgets, lens, strict=True)
    ]
    if all(r.done for r in rows):
        return

    device = model.tok_emb.weight.device
    B, T = len(ids), max(lens)
    idx = torch.full((B, T), tokenizer.pad_id, dtype=torch.long)
    for i, p in enumerate(ids):
        idx[i, T - len(p) :] = torch.tensor(p)
    left_pad = torch.arange(T)[None] < T - torch.tensor(lens)[:, None]
    pad_mask = (~left_pad).to(device) if bool(left_pad.any()) else None
    gen = torch.Generator(device=device)
    if config.seed is None:
        gen.seed()
    else:
        gen.manual_seed(config.seed)
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)

    was_training = model.training
    model.eval()
    slots = T + max(budgets) - 1  # every token fed, padding included
    resources = ExitStack()  # a CompiledDecoder's cache goes back to its pool when generation ends
    try:
        eager = forward or forward_last(model)  # prefill is always eager: prompt lengths vary
        if decoder is None:
            cache, decode = _new_cache(model, B, slots), eager
        else:
            cache, decode = resources.enter_context(decoder.cache(B, slots)), decoder.step
        next_ids = _step(eager, idx.to(device), cache, pad_mask, config, gen, vocab)
        active = None  # (B, 1) bool once a row is done: finished rows are fed as padding
        while True:
            for i, token in enumerate(next_ids.tolist()):
                row = rows[i]
                if row.done:
                    continue
                if piece := row.push(token):
                    yield i, piece
                if row.done:
                    active = torch.tensor([[not r.done] for r in rows], device=device)
            if all(r.done for r in rows):
                return
            next_ids = _step(decode, next_ids[:, None], cache, active, config, gen, vocab)
    finally:
        resources.close()
        model.train(was_training)


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    decoder: CompiledDecoder | None = None,
    forward: Forward | None = None,
) -> list[GenerationResult]:
    """Complete each prompt (text, or token ids used as given); one batched pass, rows stop independently.

    decoder: a CompiledDecoder of this model for compiled decode steps (same tokens as eager).
    forward: another step of this model, e.g. `rag.llm.knnlm.knn_forward` (kNN-LM interpolation).
    """
    config = config or GenerationConfig()
    if isinstance(prompts, str):
        raise TypeError("generate takes a list of prompts; use [prompt] for one")
    rows: list[Completion] = []
    for _ in _run(model, tokenizer, prompts, config, rows, decoder, forward):
        pass
    return [row.result() for row in rows]


def stream(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    decoder: CompiledDecoder | None = None,
    forward: Forward | None = None,
) -> Generator[str, None, GenerationResult]:
    """Yield text pieces as they become final: never half a character, never part of a stop string.

    The pieces concatenate to `generate(...)[0].text` for the same arguments (and seed). The full
    result (ids, finish_reason) is the generator's return value: `result = yield from stream(...)`.
    """
    rows: list[Completion] = []
    for _, piece in _run(model, tokenizer, [prompt], config or GenerationConfig(), rows, decoder, forward):
        yield piece
    return rows[0].result()
