"""Checkpoints: model.safetensors + config.json + tokenizer.json (+ train_state.pt for exact resume).

safetensors holds only tensors (no pickle), so a checkpoint can be loaded safely and quickly; the
optimizer, step, RNG and sampler state live apart in train_state.pt, which inference never reads.
Each file is written to a temporary name and renamed, so a crash mid-save leaves the old file whole;
the step is stored in the safetensors metadata and in train_state.pt so a torn pair is detected.
A fully sharded run (FSDP) also keeps its model and optimizer shards in sharded/ (one file per rank,
torch.distributed.checkpoint), which resume reads; model.safetensors is then the gathered copy.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from rag.llm.model import GPT, ModelConfig
from rag.llm.tokenizer import Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train_state.pt"
SHARDED_DIR = "sharded"  # FSDP runs: torch.distributed.checkpoint shards of model + optimizer


class CheckpointError(ValueError):
    """Missing or inconsistent checkpoint files, with a message meant for the user."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put folder tmp in path's place; the old one is set aside first and removed last."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def _tied_duplicates(model: nn.Module) -> set[str]:
    """Names of parameters that another name shares (tied embedding / lm_head), but for the first in
    sorted order: the one safetensors' save_model keeps, so both ways of saving write the same keys."""
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return {n for group in names.values() for n in sorted(group)[1:]}


def save_checkpoint(
    out_dir,
    model: nn.Module,
    tokenizer: Tokenizer,
    extra_state: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the checkpoint files into out_dir; extra_state (if any) goes to train_state.pt.

    weights: the model's full state dict when the model itself holds only shards (FSDP)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    meta = {"step": str((extra_state or {}).get("step", ""))}
    if weights is None:
        # save_model (not save_file) de-duplicates tied weights such as a shared embedding / lm_head.
        write = lambda p: save_model(model, str(p), metadata=meta)  # noqa: E731
    else:
        tied = _tied_duplicates(model)
        weights = {k: v.contiguous() for k, v in weights.items() if k not in tied}
        write = lambda p: save_file(weights, str(p), metadata=meta)  # noqa: E731
    _replace(out_dir / WEIGHTS_FILE, write)
    config = json.dumps(model.config.to_dict(), indent=2)
    _replace(out_dir / CONFIG_FILE, lambda p: p.write_text(config))
    _replace(out_dir / TOKENIZER_FILE, lambda p: p.write_text(tokenizer.to_json(), encoding="utf-8"))
    if extra_state is not None:
        _replace(out_dir / STATE_FILE, lambda p: torch.save(extra_state, p))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def load_config(path) -> ModelConfig:
    return ModelConfig.from_dict(json.loads(_require(Path(path) / CONFIG_FILE).read_text()))


def load_weights(model: nn.Module, path, device="cpu") -> None:
    """Load model.safetensors into an existing model (strict: every tensor must match)."""
    file = _require(Path(path) / WEIGHTS_FILE)
    try:
        load_model(unwrap(model), str(file), strict=True, device=str(device))
    except RuntimeError as e:  # missing/unexpected keys or shapes: another architecture
        raise CheckpointError(f"{file} does not fit this model configuration: {e}") from e


def load_checkpoint(path, device="cpu") -> tuple[GPT, Tokenizer]:
    """The model (eval mode, on device) and its tokenizer from a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    model = GPT(load_config(path))
    load_weights(model, path)
    tokenizer = load_tokenizer(_require(path / TOKENIZER_FILE))
    return model.to(device).eval(), tokenizer


def export_checkpoint(run_dir, out_dir, fp16: bool = True) -> int:
    """Write a run's model (weights, fp16 if asked; config; tokenizer) into out_dir, replacing the
    folder whole (written beside it, then renamed), and return the weights' size in bytes.

    fp16 halves the file; loading casts back to the model's float32 (lossless for inference here:
    bf16-trained weights fit fp16's range)."""
    model, tokenizer = load_checkpoint(run_dir)
    if fp16:
        model = model.half()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(tmp, model, tokenizer)
    _replace_dir(tmp, out_dir)
    return (out_dir / WEIGHTS_FILE).stat().st_size


def has_train_state(path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def load_train_state(path) -> dict:
    """train_state.pt, checked against the step recorded with the weights."""
    path = Path(path)
    state = torch.load(_require(path / STATE_FILE), map_location="cpu", weights_only=True)
    with safe_open(str(_require(path / WEIGHTS_FILE)), framework="pt") as f:
        weights_step = (f.metadata() or {}).get("step", "")
    if weights_step != str(state.get("step", "")):
        raise CheckpointError(
            f"{path}: weights are from step {weights_step or '?'} but train_state.pt from step "
            f"{state.get('step')} (interrupted save?)"
        )
    return state


def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full state dict on rank 0's CPU (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(out_dir, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Every rank writes its shards of the model and the AdamW state into out_dir/sharded (a collective):
    into sharded.tmp first, which rank 0 then renames, so a crash mid-save leaves the old shards whole."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(out_dir) / SHARDED_DIR
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # shards of a save that crashed
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "step": step}, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        _replace_dir(tmp, final)
    dist.barrier()


def load_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load out_dir/sharded into a sharded model and its optimizer (a collective); returns the saved step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(path) / SHARDED_DIR
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"no sharded checkpoint in {folder} (was the run trained with parallel=fsdp?)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "step": -1}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return state["step"]
