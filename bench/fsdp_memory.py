"""Memory per rank of a few AdamW steps: 1 process, 2 DDP ranks or 2 FSDP ranks (gloo on CPU).

What the trainer runs (`rag.llm.train.shard`, `param_groups`, AdamW, clipping, DDP or FSDP), without
its data pipeline, so the numbers are the parallelism's. Per rank it reports the tensors it holds,
counted exactly (parameters, gradients, AdamW moments; a DTensor counts its local shard), its RSS
after the steps and the peak RSS during them (VmHWM, reset once model and optimizer are built).
RSS is counted from after `import torch` and the process group. docs/scaling.md has the table.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 python -m bench.fsdp_memory ddp 1
    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc_per_node=2 \\
        -m bench.fsdp_memory fsdp 2          # or: ddp 2, fsdp 2 --no-reshard-grads

`--no-reshard-grads` keeps FSDP's gradients unsharded until the last micro-batch
(`set_requires_gradient_sync(False)`), the variant the trainer does not use because of what it costs.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from rag.llm.model import GPT, ModelConfig
from rag.llm.train import param_groups, setup_runtime, shard

VOCAB, BLOCK, STEPS, MICRO_BATCH = 8192, 128, 3, 4
MODEL = {"n_layer": 8, "n_head": 8, "n_kv_head": 8, "d_model": 512, "dropout": 0.0}  # 29.9M parameters


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def held_mb(tensors) -> float:
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def measure(mode: str, accum: int, reshard_grads: bool = True) -> list[dict]:
    rt = setup_runtime("cpu")
    base, _ = rss_mb()
    torch.manual_seed(0)
    config = ModelConfig.from_dict(
        {**ModelConfig.preset("tiny").to_dict(), "vocab_size": VOCAB, "block_size": BLOCK, **MODEL}
    )
    model = GPT(config)
    n_params = sum(p.numel() for p in model.parameters())
    sharded = mode == "fsdp" and rt.world_size > 1
    if sharded:
        model = shard(model, rt)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    run = DDP(model) if rt.world_size > 1 and not sharded else model
    batches = torch.Generator().manual_seed(rt.rank)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak below is the training steps'
    state: dict[str, float] = {}
    for step in range(STEPS):
        for micro in range(accum):
            last = micro == accum - 1
            skip_sync = contextlib.nullcontext()
            if isinstance(run, DDP) and not last:
                skip_sync = run.no_sync()
            if sharded and not reshard_grads:
                model.set_requires_gradient_sync(last)
            x = torch.randint(0, VOCAB, (MICRO_BATCH, BLOCK + 1), generator=batches)
            with skip_sync:
                (run(x[:, :-1], targets=x[:, 1:]).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == STEPS - 1:  # before zero_grad, so gradients are counted too
            params = list(model.parameters())
            state = {
                "params_mb": held_mb(params),
                "grads_mb": held_mb(p.grad for p in params if p.grad is not None),
                "adam_mb": held_mb(
                    v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
                ),
            }
        opt.zero_grad(set_to_none=True)
    current, peak = rss_mb()
    row = {
        "mode": mode if rt.world_size > 1 else "1 process",
        "ranks": rt.world_size,
        "grad_accum": accum,
        "reshard_grads": reshard_grads,
        "n_params": n_params,
        **{k: round(v, 1) for k, v in state.items()},
        "state_mb": round(sum(state.values()), 1),
        "rss_after_mb": round(current - base, 1),
        "peak_mb": round(peak - base, 1),
    }
    rows = [row]
    if rt.world_size > 1:
        rows = [None] * rt.world_size
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    return rows if rt.rank == 0 else []


if __name__ == "__main__":
    args = sys.argv[1:]
    torch.set_num_threads(1)
    rows = measure(args[0], int(args[1]), reshard_grads="--no-reshard-grads" not in args)
    if rows:
        print(json.dumps(rows))
