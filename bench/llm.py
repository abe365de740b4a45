"""`rag bench llm` and `rag bench extrapolation`: decoding speed and length extrapolation of our GPT.

Speed is always a ratio of two measurements taken in the same process a moment apart (the CPU is
shared, so absolute milliseconds drift): KV-cache decoding against recomputing the whole forward
for each new token, and a sliding-window ring-buffer cache at a late position against an early
one. Timings use torch.inference_mode, drop warmup steps and take the median. Decoding speed does
not depend on the weights, so these runs use freshly initialised models and random prompt ids.
Compiled decoding (static cache, torch.compile) is measured against the eager engine on the CPU
and, on CUDA, in bf16 with CUDA graphs; on CUDA the command also measures training tok/s and MFU.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.scaling import SmallRun, bench_data, train_small
from rag.llm.cache import KVCache
from rag.llm.generate import CompiledDecoder
from rag.llm.local import attend_local, local_plan
from rag.llm.model import GPT, ModelConfig, attend

KV_CONTEXTS = (128, 512, 1024)
WINDOW_POSITIONS = (512, 4096)
WINDOW_SIZE = 256
PREFILL_CHUNK = 512  # untimed prefill goes in chunks, so a 4096-token prompt never builds a 4096^2 mask

Step = Callable[[Tensor, object], Tensor]  # (token (1, 1), cache) -> logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cached_step(model: GPT) -> Step:
    return lambda tok, cache: model(tok, cache=cache, last_only=True).logits


@torch.inference_mode()
def decode_ms(
    model: GPT,
    positions: tuple[int, ...],
    new_tokens: int = 8,
    warmup: int = 2,
    *,
    cached: bool = True,
    step: Step | None = None,
    new_cache: Callable[[int], KVCache] | None = None,
    seed: int = 0,
) -> tuple[dict[int, float], dict[int, list[int]]]:
    """Median milliseconds per greedy decode step, for steps that end at each context length in `positions`,
    and the token ids decoded at each (equal with and without the cache: both compute the same thing).

    Each position gets its own sequence of random tokens (seeded by seed and position), filled (untimed) up to
    `p - warmup - new_tokens`; then the positions take turns, one timed step each, so a change in the
    load of a shared CPU hits every position alike. The first `warmup` steps are dropped.
    cached=True keeps a KV cache per sequence and feeds one token per step (`step` may replace the
    model call, e.g. a compiled one, and `new_cache(p)` the cache, e.g. a static one);
    cached=False is the baseline that recomputes the forward over the whole sequence for every new token.
    """
    device = model.tok_emb.weight.device
    span = warmup + new_tokens
    if min(positions) <= span:
        raise ValueError(f"positions must exceed warmup + new_tokens = {span}, got {min(positions)}")
    step = step or _cached_step(model)
    new_cache = new_cache or (lambda p: model.new_cache(1, p))
    seqs, caches = {}, {}
    for p in positions:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + p)
        seqs[p] = torch.randint(0, model.config.vocab_size, (1, p - span), generator=gen).to(device)
        if cached:  # the cache holds all but the last token, which the first step feeds
            caches[p] = new_cache(p)
            for chunk in seqs[p][:, :-1].split(PREFILL_CHUNK, dim=1):
                model(chunk, cache=caches[p], last_only=True)
    times: dict[int, list[float]] = {p: [] for p in positions}
    decoded: dict[int, list[int]] = {p: [] for p in positions}
    for _ in range(span):
        for p in positions:
            seq = seqs[p]
            t0 = time.perf_counter()
            # a fresh (1, 1) tensor: a slice of the growing sequence would change strides every
            # step, and torch.compile would recompile for each new stride
            logits = (
                step(seq[:, -1:].clone(memory_format=torch.contiguous_format), caches[p])
                if cached
                else model(seq, last_only=True).logits
            )
            tok = logits[:, -1].argmax(dim=-1, keepdim=True)
            _sync(device)
            times[p].append(time.perf_counter() - t0)
            seqs[p] = torch.cat([seq, tok], dim=1)
            decoded[p].append(int(tok))
    return {p: 1e3 * statistics.median(t[warmup:]) for p, t in times.items()}, decoded


def new_model(config: ModelConfig, device: str | torch.device = "cpu", dtype=torch.float32) -> GPT:
    torch.manual_seed(0)
    return GPT(config).to(device=device, dtype=dtype).eval()


def kv_cache_speedup(
    config: ModelConfig, contexts=KV_CONTEXTS, new_tokens: int = 8, warmup: int = 2
) -> list[dict]:
    """ms/token with and without the KV cache at each context length, and their ratio."""
    model = new_model(config)
    cached, cached_ids = decode_ms(model, contexts, new_tokens, warmup, cached=True)
    full, full_ids = decode_ms(model, contexts, new_tokens, warmup, cached=False)
    return [
        {
            "context": c,
            "cached_ms": cached[c],
            "uncached_ms": full[c],
            "speedup": full[c] / cached[c],
            "same_tokens": cached_ids[c] == full_ids[c],
        }
        for c in contexts
    ]


def window_scaling(
    config: ModelConfig, positions=WINDOW_POSITIONS, window_size: int = WINDOW_SIZE, new_tokens: int = 16
) -> list[dict]:
    """Cached ms/token at a late vs an early position: sliding window (ring buffer) and full attention.

    A sliding-window cache holds window_size keys whatever the position, so its ratio should be ~1;
    full attention reads every earlier key, so its cost grows with the position.
    """
    early, late = positions
    rows = []
    for name, cfg in (
        (f"sliding {window_size}", replace(config, window="sliding", window_size=window_size)),
        ("full", replace(config, window="full")),
    ):
        ms, _ = decode_ms(new_model(cfg), positions, new_tokens, warmup=4)
        rows.append(
            {
                "attention": name,
                f"ms@{early}": ms[early],
                f"ms@{late}": ms[late],
                "ratio": ms[late] / ms[early],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Training throughput / MFU (CUDA) and compiled decoding (CPU and CUDA)


class RandomTokens:
    """A training Task of uniformly random token windows: throughput does not depend on the text,
    and the device machine has no corpus on it."""

    tokenizer = None

    def __init__(self, vocab_size: int, block_size: int):
        self.vocab_size, self.block_size = vocab_size, block_size

    def size(self, split: str) -> int:
        return 1 << 30

    def batch(self, split: str, indices: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(int(indices[0]))
        xy = torch.randint(0, self.vocab_size, (len(indices), self.block_size + 1), generator=gen)
        xy = xy.to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def loss(self, model, batch):
        from rag.llm.train import lm_loss

        return lm_loss(model, *batch)

    def n_tokens(self, batch) -> int:
        return batch[0].numel()


def training_throughput(
    device: str = "cuda", preset: str = "default", steps: int = 10, warmup: int = 3, **overrides
) -> dict:
    """Tokens/s and MFU of the training loop's own step (bf16 autocast, fused AdamW, torch.compile on
    CUDA, as the preset says) on `preset`; MFU uses the loop's FLOP count and peak-FLOPs table."""
    from rag.llm.train import TRAIN_PRESETS, TrainConfig, Trainer, model_config, peak_flops

    with tempfile.TemporaryDirectory(prefix="rag-bench-train-") as tmp:
        cfg = TrainConfig(**{**TRAIN_PRESETS[preset], **overrides, "out_dir": tmp, "device": device})
        cfg.progress = False
        model = GPT(model_config(cfg.model, ModelConfig.preset(cfg.model).vocab_size, cfg.model_overrides))
        block = cfg.block_size or model.config.block_size
        trainer = Trainer(cfg, model, RandomTokens(model.config.vocab_size, block), block)
        times, tokens = [], 0
        for _ in range(warmup + steps):
            _sync(trainer.rt.device)
            t0 = time.perf_counter()
            _, _, tokens = trainer.train_step()
            _sync(trainer.rt.device)
            times.append(time.perf_counter() - t0)
    tok_s = tokens / statistics.median(times[warmup:])
    peak = peak_flops(trainer.rt.device)
    return {
        "preset": preset,
        "params": model.num_params(),
        "tokens_per_step": tokens,
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile": cfg.compile,
        "tok_per_s": tok_s,
        "mfu": model.flops_per_token(block) * tok_s / peak if peak else None,
        "device": torch.cuda.get_device_name(trainer.rt.device)
        if trainer.rt.device.type == "cuda"
        else "cpu",
    }


def compiled_decoding(
    config: ModelConfig,
    device: str = "cuda",
    dtype=torch.bfloat16,
    position: int = 512,
    new_tokens: int = 128,
) -> dict:
    """Decode tokens/s at `position`: the eager engine (a cache read up to the last written slot)
    vs `CompiledDecoder` (torch.compile'd step over a static cache of the full context; on CUDA
    replayed as a CUDA graph). Compilation falls in the warmup steps; its time is reported."""
    model = new_model(config, device, dtype)
    eager, eager_ids = decode_ms(model, (position,), new_tokens, warmup=8)
    t0 = time.perf_counter()
    decoder = CompiledDecoder(model)
    with decoder.cache(1) as static_cache:
        compiled, compiled_ids = decode_ms(
            model,
            (position,),
            new_tokens,
            warmup=8,
            step=lambda tok, cache: decoder.step(tok, cache, None),
            new_cache=lambda p: static_cache,
        )
    total_s = time.perf_counter() - t0
    eager, compiled = eager[position], compiled[position]
    eager_ids, compiled_ids = eager_ids[position], compiled_ids[position]
    return {
        "position": position,
        "eager_tok_per_s": 1e3 / eager,
        "compiled_tok_per_s": 1e3 / compiled,
        "speedup": eager / compiled,
        "mode": decoder.mode,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled_total_s": total_s,  # the compiled run incl. compiling, if not done before
        # bf16 kernels may round differently and flip a near-tie, after which the sequences part
        "token_agreement": np.mean([a == b for a, b in zip(eager_ids, compiled_ids, strict=True)]).item(),
    }


# ---------------------------------------------------------------------------------------------
# Windowed attention in training: block-local O(T * w) attention against full O(T^2)

TRAIN_SEQ_LEN = 4096


def _memory_now(device: torch.device) -> int:
    """Bytes in use now, and the peak counter reset to it (CPU: the process's RSS and VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM (peak RSS) to the current RSS
    return _proc_status_kb("VmRSS") * 1024


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kb("VmHWM") * 1024


def _proc_status_kb(key: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))
    return int(line.split()[1])


def train_step_stats(
    config: dict, seq_len: int, batch: int = 1, steps: int = 3, warmup: int = 1, device: str = "cpu"
) -> dict:
    """Median ms of one training step (forward, backward, AdamW) and its peak memory above the
    memory at rest (model, gradients and optimizer state, allocated by the warmup steps).

    The model's weights, batch and optimizer are the same whatever the attention, so the
    difference in peak memory between two windows is the attention's."""
    dev = torch.device(device)
    cfg = ModelConfig.from_dict(config)
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xy = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = xy[:, :-1].to(dev), xy[:, 1:].to(dev)
    times, rest = [], 0
    for i in range(warmup + steps):
        if i == warmup:
            rest = _memory_now(dev)
        _sync(dev)
        t0 = time.perf_counter()
        loss = model(x, targets=y).loss
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return {
        "train_step_ms": 1e3 * statistics.median(times[warmup:]),
        "step_peak_mb": (_memory_peak(dev) - rest) / 2**20,
    }


def _in_fresh_process(fn: Callable[..., dict], *args, **kwargs) -> dict:
    """Run fn in a new interpreter: a CPU process's peak RSS is its own, and freed blocks are given
    back to the OS (a fixed mmap threshold), so the peak of one run is not hidden by another's."""
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # read by the child's malloc at start
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_with_threads, (torch.get_num_threads(), fn, args, kwargs))
    finally:
        if before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before


def _with_threads(threads: int, fn: Callable[..., dict], args: tuple, kwargs: dict) -> dict:
    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def windowed_training(
    config: ModelConfig,
    seq_len: int = TRAIN_SEQ_LEN,
    window_size: int = WINDOW_SIZE,
    device: str = "cpu",
    steps: int = 3,
) -> dict:
    """Training step time and peak memory at seq_len, full attention vs a sliding window (the
    block-local path, rag.llm.local), same model and batch; each in a fresh process on the CPU."""
    rows = []
    for window in ("full", "sliding"):
        cfg = replace(
            config, block_size=max(config.block_size, seq_len), window=window, window_size=window_size
        )
        args = (cfg.to_dict(), seq_len)
        if device == "cpu":
            stats = _in_fresh_process(train_step_stats, *args, steps=steps, device=device)
        else:
            stats = train_step_stats(*args, steps=steps, device=device)
        rows.append({"attention": "full" if window == "full" else f"sliding {window_size}", **stats})
    full, sliding = rows
    return {
        "seq_len": seq_len,
        "device": device,
        "rows": rows,
        "speedup": full["train_step_ms"] / sliding["train_step_ms"],
        "memory_ratio": full["step_peak_mb"] / max(sliding["step_peak_mb"], 1e-9),
    }


# ---------------------------------------------------------------------------------------------
# The attention op alone at T=4096: fused causal vs block-local window vs dense masked window

ATTENTION_KINDS = ("full", "block-local", "dense masked")
PEAK_MEMORY = {
    "cpu": "peak bytes live in torch's CPU allocator during fwd + bwd (torch.profiler memory events), "
    "above those live before it",
    "cuda": "torch.cuda.max_memory_allocated during fwd + bwd, above the bytes allocated before it",
}
AttentionOp = Callable[[Tensor, Tensor, Tensor], Tensor]


def attention_ops(config: ModelConfig, seq_len: int, window_size: int, device: torch.device):
    """{kind: (op(q, k, v) -> y, () -> bytes of the masks the op reads, which a forward makes once
    for all layers)}: full attention's fused causal SDPA (no mask); the sliding window by blocks
    (rag.llm.local: its plan); the same window as one SDPA over the dense (T, T) mask, the path
    block-local replaced and what attention costs where no fused kernel takes the mask."""
    window = replace(
        config, block_size=max(config.block_size, seq_len), window="sliding", window_size=window_size
    )
    masks = GPT(replace(window, n_layer=1, vocab_size=8)).to(device)._mask  # positions' bias, if any
    pos = torch.arange(seq_len, device=device)[None]
    plan = local_plan(pos, window, lambda q, k: masks(q, k, False, None))
    dense = masks(pos, pos, False, None)
    ops = {
        "full": (lambda q, k, v: attend(q, k, v, None, 0.0, False)[0], lambda: 0),
        # the bool block mask and the additive one the first layer makes for SDPA
        "block-local": (
            lambda q, k, v: attend_local(q, k, v, plan, 0.0),
            lambda: _nbytes(plan.mask, *plan._sdpa_masks.values()),
        ),
        "dense masked": (lambda q, k, v: attend(q, k, v, dense, 0.0, False)[0], lambda: _nbytes(dense)),
    }
    return {kind: ops[kind] for kind in ATTENTION_KINDS}


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fwd_bwd(
    op: AttentionOp, qkv: tuple[Tensor, ...], dy: Tensor, device: torch.device
) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of one call, from no input gradients."""
    _sync(device)
    t0 = time.perf_counter()
    y = op(*qkv)
    _sync(device)
    t1 = time.perf_counter()
    y.backward(dy)
    _sync(device)
    return 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn runs, above those allocated before (`PEAK_MEMORY`)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # + allocated, - freed, in order
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def attention_op_stats(
    config: ModelConfig,
    seq_len: int = TRAIN_SEQ_LEN,
    window_size: int = WINDOW_SIZE,
    batch: int = 1,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
) -> dict:
    """One attention layer's op (the model's q, k, v shapes, after RoPE) forward + backward at
    seq_len: ms (median; the kinds take turns each step, so load changes hit them alike) and peak
    memory, for full attention (fused causal), the sliding window by blocks and by a dense mask."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    H, n_kv, D = config.n_head, config.n_kv_head, config.head_dim
    shapes = ((batch, H, seq_len, D), (batch, n_kv, seq_len, D), (batch, n_kv, seq_len, D))
    qkv = tuple(torch.randn(s, generator=gen).to(dev).requires_grad_() for s in shapes)
    dy = torch.randn(shapes[0], generator=gen).to(dev)
    ops = attention_ops(config, seq_len, window_size, dev)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ops}
    for _ in range(warmup + steps):
        for kind, (op, _) in ops.items():
            _no_grads(qkv)
            times[kind].append(_fwd_bwd(op, qkv, dy, dev))
    floor = _nbytes(dy, *qkv)  # the output and the inputs' gradients, which every kind holds
    rows = []
    for kind, (op, masks) in ops.items():
        _no_grads(qkv)
        peak = peak_bytes(lambda op=op: _fwd_bwd(op, qkv, dy, dev), dev)
        fwd, both = (statistics.median(t[i] for t in times[kind][warmup:]) for i in (0, 1))
        rows.append(
            {
                "attention": kind,
                "fwd_ms": fwd,
                "fwd_bwd_ms": both,
                "peak_mb": peak / 2**20,
                "above_floor_mb": (peak - floor) / 2**20,
                "mask_mb": masks() / 2**20,
            }
        )
    with torch.no_grad():  # the window two ways: the same numbers
        diff = (ops["block-local"][0](*qkv) - ops["dense masked"][0](*qkv)).abs().max().item()
    return {
        "seq_len": seq_len,
        "window_size": window_size,
        "batch": batch,
        "device": device,
        "rows": rows,
        "max_abs_diff_block_local_vs_dense_masked": diff,
    }


def _no_grads(tensors: tuple[Tensor, ...]) -> None:
    for t in tensors:
        t.grad = None


def attention_op(config: ModelConfig, device: str = "cpu", **kwargs) -> dict:
    """`attention_op_stats` with the ratios of full and dense masked to block-local, and what was measured."""
    out = attention_op_stats(config, device=device, **kwargs)
    by = {r["attention"]: r for r in out["rows"]}
    local = by["block-local"]
    for kind in ("full", "dense masked"):
        key = kind.replace(" ", "_")
        out[f"speedup_vs_{key}"] = by[kind]["fwd_bwd_ms"] / local["fwd_bwd_ms"]
        out[f"memory_ratio_vs_{key}"] = by[kind]["peak_mb"] / local["peak_mb"]
        out[f"working_memory_ratio_vs_{key}"] = by[kind]["above_floor_mb"] / max(
            local["above_floor_mb"], 1e-9
        )
    out["memory"] = PEAK_MEMORY["cuda" if device.startswith("cuda") else "cpu"]
    out["floor"] = "above_floor_mb: peak_mb less the output and the q, k, v gradients (held by every kind)"
    out["mask"] = "mask_mb: masks a forward makes once for all layers (not in peak_mb)"
    return out


# ---------------------------------------------------------------------------------------------
# The command


def run_llm_bench(
    model: str = "default", new_tokens: int = 8, progress: Callable[[str], None] = print
) -> dict:
    """Every part of `rag bench llm`; the CUDA part is skipped (with a reason) on a CPU-only machine."""
    config = ModelConfig.preset(model)
    progress(f"KV cache vs full recompute, {model} model, contexts {KV_CONTEXTS} ...")
    kv = kv_cache_speedup(config, new_tokens=new_tokens)
    progress(f"sliding window {WINDOW_SIZE} vs full attention at positions {WINDOW_POSITIONS} ...")
    window = window_scaling(config, new_tokens=2 * new_tokens)
    result = {
        "model": model,
        "threads": torch.get_num_threads(),
        "kv_cache": kv,
        "kv_speedup_512": next(r["speedup"] for r in kv if r["context"] == 512),
        "window": window,
        "window_ratio_sliding": window[0]["ratio"],
        "window_ratio_full": window[1]["ratio"],
    }
    progress(f"CPU: training step at T={TRAIN_SEQ_LEN}, full vs sliding {WINDOW_SIZE} ...")
    result["window_training"] = windowed_training(config)
    result["train_step_ms"] = {r["attention"]: r["train_step_ms"] for r in result["window_training"]["rows"]}
    progress(
        f"CPU: attention op at T={TRAIN_SEQ_LEN}, full vs sliding {WINDOW_SIZE} by blocks / dense mask ..."
    )
    result["attention_op"] = attention_op(config)
    progress("CPU: decoding, eager vs compiled static cache (fp32) ...")
    result["cpu_decode"] = compiled_decoding(config, "cpu", torch.float32, new_tokens=4 * new_tokens)
    if torch.cuda.is_available():
        progress("CUDA: training throughput (default preset, bf16, fused AdamW, torch.compile) ...")
        result["cuda_training"] = training_throughput("cuda", "default")
        progress("CUDA: decoding, eager vs compiled ...")
        result["cuda_decode"] = compiled_decoding(config, "cuda")
        progress(f"CUDA: training step at T={TRAIN_SEQ_LEN}, full vs sliding {WINDOW_SIZE} ...")
        result["cuda_window_training"] = windowed_training(config, device="cuda")
        progress(f"CUDA: attention op at T={TRAIN_SEQ_LEN} ...")
        result["cuda_attention_op"] = attention_op(config, device="cuda")
    else:
        skipped = {"skipped": "no CUDA"}
        result["cuda_training"] = result["cuda_decode"] = result["cuda_window_training"] = skipped
        result["cuda_attention_op"] = skipped
    return result


# ---------------------------------------------------------------------------------------------
# Length extrapolation: train at 256 positions, evaluate at 256 / 512 / 1024

POSITION_TYPES = ("sinusoidal", "learned", "rope", "alibi")
EVAL_LENGTHS = (256, 512, 1024)
EXTRAPOLATION_MODEL = {"n_layer": 3, "d_model": 96, "n_head": 4, "n_kv_head": 4}


@torch.inference_mode()
def perplexity(
    model: GPT,
    tokens: np.ndarray,
    length: int,
    n_tokens: int,
    *,
    last: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token loss) of the `last` positions of windows of `length` tokens that end every
    `stride` tokens over the first n_tokens (defaults: every position of non-overlapping windows).

    The default is Press et al.'s non-overlapping evaluation, the same tokens at every length.
    With a fixed stride and `last`, every length scores the same final `last` tokens of each stride
    and only the context before them grows, so a model that extrapolates gets the same or a lower
    perplexity as `length` goes past its training length, and one that does not gets a higher one.
    """
    stride, last = stride or length, last or length
    if not last <= length <= stride:
        raise ValueError(f"need last <= length <= stride, got {last}, {length}, {stride}")
    n_windows = n_tokens // stride
    if n_windows < 1 or len(tokens) < n_windows * stride + 1:
        raise ValueError(f"need at least {stride + 1} tokens for windows of {length}, have {len(tokens)}")
    starts = np.arange(1, n_windows + 1) * stride - length
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)[starts[:, None] + np.arange(length + 1)])
    total = 0.0
    for rows in ids.split(batch_size):
        logits = model(rows[:, :-1]).logits[:, -last:].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), rows[:, -last:].flatten(), reduction="sum"))
    return float(np.exp(total / (n_windows * last)))


def run_extrapolation(
    tokens: int = 250_000,
    positions=POSITION_TYPES,
    lengths=EVAL_LENGTHS,
    eval_tokens: int = 16384,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train one small model per position scheme on the same tokens at context run.block_size, then
    measure perplexity at each of `lengths`. A learned table has no rows past block_size: n/a."""
    from rag.llm.checkpoint import load_checkpoint
    from rag.llm.data import open_tokens

    run = SmallRun(block_size=256, tokens=tokens, batch_size=8)
    data_dir = bench_data()
    val = open_tokens(data_dir, "val")
    table = []
    with tempfile.TemporaryDirectory(prefix="rag-extrapolation-") as tmp:
        for pos in positions:
            progress(f"training with {pos} positions on {tokens:,} tokens at context {run.block_size} ...")
            out = Path(tmp) / pos
            train_small(data_dir, {**EXTRAPOLATION_MODEL, "pos": pos}, run, out)
            model, _ = load_checkpoint(out)
            model.eval()
            row, note = {}, ""
            # all positions of non-overlapping windows; then the same final block of every
            # max(lengths) tokens, read with a growing window before it
            block, stride = run.block_size, max(lengths)
            columns = [(str(n), n, {}) for n in lengths]
            columns += [(f"last {block} of {n}", n, {"last": block, "stride": stride}) for n in lengths]
            for name, length, how in columns:
                try:
                    row[name] = perplexity(model, val, length, eval_tokens, **how)
                except ValueError as e:  # learned positions past block_size: the model refuses
                    row[name], note = None, str(e)
            table.append({"pos": pos, **row, "note": note})
    return {
        "train_length": run.block_size,
        "run": asdict(run),
        "model": EXTRAPOLATION_MODEL,
        "eval_tokens": eval_tokens,
        "perplexity": table,
    }
