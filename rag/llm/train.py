"""The training loop shared by pretraining (`rag train lm`), SFT and DPO (see align.py).

nanoGPT-style: AdamW with decay only on 2-D weight matrices, linear warmup then cosine decay,
gradient accumulation and clipping, bf16 autocast + fused AdamW + optional torch.compile on CUDA,
and, when launched by torchrun, DDP (every rank holds the whole model) or FSDP (`parallel="fsdp"`:
parameters, gradients and AdamW state split over the ranks, see docs/scaling.md). What differs
between objectives (batches, loss, eval metrics) is a `Task`; everything else -- checkpoints with
exact resume, metrics JSONL, loss-curve PNG, tokens/s and MFU -- lives here once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from rag.llm import checkpoint as ckpt
from rag.llm.data import IndexSampler, TokenWindows, read_meta, tokenizer_hash
from rag.llm.model import GPT, IGNORE_INDEX, ModelConfig
from rag.llm.tokenizer import Tokenizer

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"

# Dense bf16 tensor-core peak, TFLOPS, by a substring of torch.cuda.get_device_name(); first match wins,
# so the more specific names come first (an "H100 PCIe" must not match the SXM entry "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (reported as "H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def peak_flops_for(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a torch.cuda.get_device_name() string; None for GPUs not in the table."""
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def peak_flops(device: torch.device) -> float | None:
    """Peak of this device; None on CPU or an unknown GPU, and then MFU is not reported."""
    return peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@dataclass
class TrainConfig:
    """Everything a run needs; saved into train_state.pt and out_dir/train_config.json."""

    data_dir: str = ".data/tinyshakespeare"  # `rag train prepare` output (lm) or a JSONL file (sft/dpo)
    val_data: str | None = None  # sft/dpo: a held-out JSONL; else val_fraction of data_dir
    out_dir: str = "runs/lm"
    init_from: str | None = None  # checkpoint to start from (sft/dpo; lm starts from scratch)
    model: str = "tiny"  # ModelConfig preset
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields that replace the preset's
    block_size: int | None = None  # training sequence length; default: the model's context length
    batch_size: int = 16  # micro-batch per rank
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    max_steps: int = 300
    max_tokens: int | None = None  # token budget: sets max_steps from tokens per optimizer step
    stop_step: int | None = (
        None  # end this invocation early (checkpointed; the schedule still uses max_steps)
    )
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    eval_interval: int = 50
    eval_iters: int = 10
    log_interval: int = 10
    val_fraction: float = 0.05  # sft/dpo without val_data
    beta: float = 0.1  # DPO temperature
    compile: bool = False
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    device: str = "auto"
    parallel: str = "ddp"  # under torchrun: ddp (whole model on every rank) or fsdp (sharded over ranks)
    seed: int = 1337
    resume: bool = False
    progress: bool = True
    # span reader (rag.llm.span_train) only
    batch_tokens: int = 4096  # padded tokens per length-bucketed micro-batch
    span_weight: float = 0.5  # weight of the copy pointer's position cross-entropy
    freeze_layers: int = 0  # freeze the embeddings and this many lowest blocks (0: train everything)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**d)


# Training presets: "tiny" trains in seconds on a CPU (tests, smoke runs); "default" is the reader on a GPU.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model="tiny", batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20, max_steps=300),
    # 64 x 1024 = 65k tokens a step; 3000 steps ~ 200M tokens, about 12 passes over gutenberg (~17M tokens).
    "default": dict(
        model="default",
        batch_size=32,
        grad_accum=2,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=200,
        max_steps=3000,
        eval_interval=250,
        eval_iters=40,
        log_interval=20,
        compile=True,
    ),
    # The CPU reader: MiniLM warm start on span rows (rag.llm.span_train). bf16 autocast runs on CPUs
    # with AVX512-BF16/AMX at ~1.7x fp32's speed; a micro-batch is one length bucket of ~4k tokens.
    "minilm-reader": dict(
        model="minilm-reader",
        init_from="minilm",
        batch_size=1,
        batch_tokens=4096,
        grad_accum=2,
        lr=1e-4,
        min_lr=1e-5,
        weight_decay=0.01,
        beta2=0.999,
        warmup_steps=100,
        max_steps=2600,
        eval_interval=200,
        eval_iters=20,
        log_interval=10,
        val_fraction=0.01,
        dtype="bfloat16",
    ),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only 2-D weight matrices; norms, biases and embedding tables (tied lm_head too) are exempt.

    Decaying an embedding pulls rare tokens' rows to zero, and decaying gains/biases fights the
    normalisation they implement, so only the matmul weights are regularised.
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, other, seen = [], [], set()
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when RANK/WORLD_SIZE are set: NCCL on GPU, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, local_rank, world_size)


PARALLEL = ("ddp", "fsdp")


def shard(model: GPT, rt: Runtime) -> GPT:
    """FSDP2 in place: each block is one unit, gathered whole only for its own forward and backward; the
    root unit holds the rest (token embedding tied to lm_head, positions, final norm, heads). Every
    parameter becomes a DTensor split along dim 0 over the ranks, and so do its gradient and, once the
    optimizer is built on these parameters, its AdamW moments. A model still on the CPU is moved to the
    device one unit at a time, so the device never holds all of it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # imported here: half a second that DDP runs skip

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shutdown_runtime() -> None:
    """Leave the process group (torchrun entry points call this when training ends)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    choices = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if cfg.dtype not in choices:
        raise ValueError(f"dtype must be auto, bfloat16 or float32, got {cfg.dtype!r}")
    return choices[cfg.dtype]


Batch = Any


class Task(Protocol):
    """What an objective supplies to the loop: batches by sampled index, and a loss with metrics.

    A metric "aux" (with grad) is an additive regulariser inside the loss, such as the MoE balance
    term: it is weighted per micro-batch, not per target. A task whose micro-batches hold different
    numbers of targets (SFT masks prompts) also defines `n_targets(batch) -> Tensor`, so that
    accumulation weights each micro-batch by its share of the step's targets (see Trainer.accumulate).
    """

    tokenizer: Tokenizer

    def size(self, split: str) -> int: ...  # number of items IndexSampler draws from

    def batch(self, split: str, indices: np.ndarray, device: torch.device) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def n_tokens(self, batch: Batch) -> int: ...


class LMTask:
    """Next-token prediction on memmapped token windows."""

    def __init__(self, data_dir: Path, tokenizer: Tokenizer, block_size: int):
        self.tokenizer = tokenizer
        self.windows = {s: TokenWindows(data_dir, s, block_size) for s in ("train", "val")}

    def size(self, split: str) -> int:
        return len(self.windows[split])

    def batch(self, split: str, indices: np.ndarray, device: torch.device) -> Batch:
        return self.windows[split].batch(indices, device)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss(model, *batch)

    def n_tokens(self, batch: Batch) -> int:
        return batch[0].numel()


def lm_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's loss; with an MoE aux term, the cross-entropy and the aux term are reported apart."""
    out = model(x, targets=y)
    if out.loss is out.ce_loss:
        return out.loss, {}
    return out.loss, {"ce": out.ce_loss.detach(), "aux": out.loss - out.ce_loss}


def n_targets(y: torch.Tensor) -> torch.Tensor:
    """Targets a cross-entropy is averaged over (the non-ignored ones), as a tensor: no host sync."""
    return (y != IGNORE_INDEX).sum()


def model_config(preset: str, vocab_size: int, overrides: dict) -> ModelConfig:
    """A ModelConfig preset with the tokenizer's vocab size and any field overrides."""
    cfg = ModelConfig.preset(preset).to_dict()
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"unknown ModelConfig fields in overrides: {unknown}")
    return ModelConfig.from_dict({**cfg, **overrides, "vocab_size": vocab_size})


def context_length(config: ModelConfig) -> int:
    return config.block_size


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    out_dir: Path
    history: list[dict] = field(default_factory=list)


# Settings that may change on resume without breaking exactness (others are reported).
_RESUMABLE = {"resume", "stop_step", "progress", "device", "eval_interval", "log_interval"}


class Trainer:
    """Runs cfg.max_steps optimizer steps of `task` on `model`, resuming from cfg.out_dir if asked."""

    def __init__(self, cfg: TrainConfig, model: GPT, task: Task, seq_len: int, rt: Runtime | None = None):
        self.cfg, self.task, self.seq_len = cfg, task, seq_len
        self.rt = rt or setup_runtime(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        if cfg.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {cfg.parallel!r}")
        self.sharded = cfg.parallel == "fsdp" and self.rt.ddp  # one process has nothing to shard over
        # FSDP: shard before building the optimizer, so that its state is made of the shards too.
        self.raw_model = shard(model, self.rt) if self.sharded else model.to(self.rt.device)
        self.dtype = autocast_dtype(cfg, self.rt.device)
        fused = self.rt.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            param_groups(self.raw_model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=fused,
        )
        self.sampler = IndexSampler(
            task.size("train"), cfg.batch_size, cfg.seed, self.rt.rank, self.rt.world_size
        )
        self.step = 0
        if cfg.resume:
            self._resume()
        elif ckpt.has_train_state(self.out_dir):
            raise FileExistsError(
                f"{self.out_dir} already holds a run: pass --resume or choose another out_dir"
            )
        # Same init everywhere (DDP also broadcasts), but each rank gets its own dropout stream.
        if not cfg.resume:
            torch.manual_seed(cfg.seed + self.rt.rank)
        if cfg.compile and getattr(self.raw_model.config, "ffn", None) == "moe":
            # MoE picks each expert's tokens with nonzero(), whose output size depends on the data;
            # without this dynamo splits the graph there and runs the experts eagerly.
            torch._dynamo.config.capture_dynamic_output_shape_ops = True
        self.model: nn.Module = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        if self.rt.ddp and not self.sharded:
            ids = [self.rt.local_rank] if self.rt.device.type == "cuda" else None
            # Every expert runs every step (on zero tokens if none are routed to it), so all
            # parameters get a gradient and DDP needs no search for unused ones.
            self.model = DDP(self.model, device_ids=ids)

    # ---- state ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.rt.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        rngs = [rng]
        if self.rt.ddp:  # every rank's stream, so a resumed rank k continues exactly where it was
            rngs = [None] * self.rt.world_size
            dist.all_gather_object(rngs, rng)
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "world_size": self.rt.world_size,
            "sharded": self.sharded,
            "config": asdict(self.cfg),
        }
        if not self.sharded:  # FSDP's optimizer state is in the shards (ckpt.save_sharded)
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _resume(self) -> None:
        if not ckpt.has_train_state(self.out_dir):
            raise FileNotFoundError(f"--resume: no checkpoint with train state in {self.out_dir}")
        state = ckpt.load_train_state(self.out_dir)
        if state["world_size"] != self.rt.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} ranks, this run has {self.rt.world_size}"
            )
        changed = sorted(
            k for k, v in asdict(self.cfg).items() if k not in _RESUMABLE and state["config"].get(k) != v
        )
        if changed and self.rt.main:
            print(f"warning: resuming with changed settings {changed}: not an exact continuation")
        was_sharded = state.get("sharded", False)
        if was_sharded != self.sharded:
            raise ValueError(
                f"checkpoint in {self.out_dir} was written {'with' if was_sharded else 'without'} FSDP "
                "sharding: resume it with the same parallel setting and number of ranks"
            )
        if self.sharded:
            step = ckpt.load_sharded(self.out_dir, self.raw_model, self.optimizer)
            if step != state["step"]:
                raise ckpt.CheckpointError(
                    f"{self.out_dir}: shards are from step {step}, train_state.pt from step {state['step']}"
                )
        else:
            ckpt.load_weights(self.raw_model, self.out_dir, self.rt.device)
            self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        rng = state["rng"][self.rt.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.rt.device)

    def save(self) -> None:
        state = self._state()  # collective under DDP: every rank must call it
        weights = None
        if self.sharded:  # collectives: each rank writes its shards, then rank 0 gathers the full weights
            ckpt.save_sharded(self.out_dir, self.raw_model, self.optimizer, self.step)
            weights = ckpt.gather_weights(self.raw_model)
        if self.rt.main:
            ckpt.save_checkpoint(self.out_dir, self.raw_model, self.task.tokenizer, state, weights)
            (self.out_dir / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        if self.rt.ddp:
            dist.barrier()

    # ---- loop ----------------------------------------------------------------------------------

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.rt.device.type, dtype=self.dtype)

    def _mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Average metrics over ranks (one all_reduce)."""
        keys = sorted(values)
        t = torch.stack([values[k].float() for k in keys]).to(self.rt.device)
        if self.rt.ddp:
            dist.all_reduce(t, op=dist.ReduceOp.AVG if self.rt.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.rt.device.type != "cuda":  # gloo has no AVG
                t /= self.rt.world_size
        return dict(zip(keys, t.tolist(), strict=True))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean val metrics over eval_iters fixed batches (same windows every time, so curves compare)."""
        self.model.eval()
        sampler = IndexSampler(
            self.task.size("val"), self.cfg.batch_size, self.cfg.seed + 1, self.rt.rank, self.rt.world_size
        )
        totals: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.eval_iters):
            with self._autocast():
                loss, metrics = self.task.loss(
                    self.raw_model, self.task.batch("val", sampler.next(), self.rt.device)
                )
            for k, v in {"loss": loss.detach(), **metrics}.items():
                totals[k] = totals.get(k, 0) + v / self.cfg.eval_iters
        self.model.train()
        out = {f"val_{k}": v for k, v in self._mean(totals).items()}
        if getattr(self.task, "perplexity", True):  # a cross-entropy loss (not DPO's)
            ce = out.get("val_ce", out["val_loss"])  # without the MoE aux term
            out["val_ppl"] = math.exp(min(ce, 50.0))
        return out

    def micro_divisors(self, batches: list[Batch]) -> list[torch.Tensor | int]:
        """What each micro-batch's mean loss is divided by, so the step's gradient is the mean over all its
        targets on all ranks: N / n_i, over world_size because DDP and FSDP average gradients over ranks.
        Tasks without n_targets have the same count in every micro-batch: the divisor is just grad_accum."""
        count = getattr(self.task, "n_targets", None)
        if count is None:
            return [len(batches)] * len(batches)
        counts = [count(b).float() for b in batches]
        total = torch.stack(counts).sum()
        if self.rt.ddp:
            dist.all_reduce(total)
        total = total.clamp(min=1) / self.rt.world_size
        return [total / c.clamp(min=1) for c in counts]  # a micro-batch with no targets has a zero loss

    def _no_sync(self):
        """DDP: skip the gradient all-reduce of a micro-batch, the gradients accumulate in place. FSDP
        reduce-scatters every micro-batch instead: skipping it (set_requires_gradient_sync(False)) would
        keep every parameter's whole gradient on every rank until the last one, which is the memory
        that sharding exists to save (docs/scaling.md measures both)."""
        return self.model.no_sync() if self.rt.ddp and not self.sharded else nullcontext()

    def accumulate(self, batches: list[Batch]) -> dict[str, torch.Tensor]:
        """Backward over the micro-batches (DDP all-reduces only on the last); the step's metrics.
        The MoE aux term is averaged per micro-batch, as it is a mean over all positions, not targets."""
        divisors = self.micro_divisors(batches)
        totals: dict[str, torch.Tensor] = {}
        for micro, (batch, div) in enumerate(zip(batches, divisors, strict=True)):
            last = micro == len(batches) - 1
            with nullcontext() if last else self._no_sync():
                with self._autocast():
                    loss, metrics = self.task.loss(self.model, batch)
                aux = metrics.get("aux", 0.0)
                ((loss - aux) / div + aux / len(batches)).backward()
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0) + v.detach() / (len(batches) if k == "aux" else div)
        if "aux" in totals:  # the weighted cross-entropy plus the mean aux term
            totals["loss"] = totals["ce"] + totals["aux"]
        return totals

    def train_step(self) -> tuple[dict[str, torch.Tensor], float, int]:
        """One optimizer step over grad_accum micro-batches."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [
            self.task.batch("train", self.sampler.next(), self.rt.device) for _ in range(self.cfg.grad_accum)
        ]
        totals = self.accumulate(batches)
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
            totals["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return totals, lr, sum(self.task.n_tokens(b) for b in batches) * self.rt.world_size

    def fit(self) -> TrainResult:
        cfg, rt = self.cfg, self.rt
        log = MetricsLog(
            self.out_dir / METRICS_FILE, keep_until=self.step if cfg.resume else 0, enabled=rt.main
        )
        if rt.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        peak = peak_flops(rt.device)
        flops_per_token = self.raw_model.flops_per_token(self.seq_len) if peak else 0.0
        self.model.train()
        end = min(cfg.stop_step or cfg.max_steps, cfg.max_steps)
        bar = tqdm(total=end, initial=self.step, disable=not (rt.main and cfg.progress), desc="train")
        window_start, window_tokens = time.perf_counter(), 0.0
        train_loss, val_loss = float("nan"), None
        while self.step < end:
            metrics, lr, tokens = self.train_step()
            window_tokens += tokens
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == end:
                row = self._mean(metrics)
                if rt.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                row.update(step=self.step, lr=lr, tok_per_s=window_tokens / elapsed)
                if peak:  # achieved model FLOP/s per GPU over the peak of that GPU
                    row["mfu"] = flops_per_token * row["tok_per_s"] / (peak * rt.world_size)
                train_loss = row["loss"]
                log.write({"kind": "train", **row})
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_per_s']:,.0f}"
                )
                window_start, window_tokens = time.perf_counter(), 0.0
            if self.step % cfg.eval_interval == 0 or self.step == end:
                row = self.evaluate()
                val_loss = row["val_loss"]
                log.write({"kind": "eval", "step": self.step, **row})
                self.save()
                if rt.main:
                    plot_loss_curve(log.rows, self.out_dir / CURVE_FILE)
                    summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
                    bar.write(f"step {self.step}: {summary}", file=sys.stderr)  # stdout stays for --json
                window_start, window_tokens = time.perf_counter(), 0.0  # eval/save time is not throughput
        bar.close()
        return TrainResult(self.step, train_loss, val_loss, self.out_dir, log.rows)


class MetricsLog:
    """Append-only JSONL of train/eval rows; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.rows: list[dict] = []
        if enabled and path.is_file() and keep_until > 0:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= keep_until]
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        if self.enabled:
            self.rows.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def plot_loss_curve(rows: list[dict], path: Path) -> None:
    """Train and val loss against step as a PNG; the Agg backend works without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    for points, label, style in ((train, "train", "-"), (val, "val", "o-")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label, markersize=4)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss curve")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def steps_for_budget(cfg: TrainConfig, tokens_per_step: int) -> int:
    return max(1, math.ceil(cfg.max_tokens / tokens_per_step))


def train_lm(cfg: TrainConfig, rt: Runtime | None = None) -> TrainResult:
    """Pretrain from scratch on a `rag train prepare` folder (token .bin files + tokenizer.json)."""
    rt = rt or setup_runtime(cfg.device)
    data_dir = Path(cfg.data_dir)
    meta = read_meta(data_dir)
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    if tokenizer_hash(tokenizer) != meta["tokenizer_sha256"]:
        raise ValueError(f"{data_dir}/tokenizer.json does not match the tokenizer that made the token files")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and across resume
    model = GPT(model_config(cfg.model, tokenizer.vocab_size, cfg.model_overrides))
    return run(cfg, model, lambda block: LMTask(data_dir, tokenizer, block), rt)


def run(cfg: TrainConfig, model: GPT, make_task: Callable[[int], Task], rt: Runtime) -> TrainResult:
    """Resolve block size and token budget, then train; shared by lm, sft and dpo."""
    block = cfg.block_size or context_length(model.config)
    if block > context_length(model.config):
        raise ValueError(f"block_size {block} exceeds the model context {context_length(model.config)}")
    if cfg.max_tokens:
        cfg.max_steps = steps_for_budget(cfg, cfg.batch_size * cfg.grad_accum * rt.world_size * block)
    return Trainer(cfg, model, make_task(block), block, rt).fit()
