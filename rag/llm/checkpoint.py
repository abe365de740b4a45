"""Checkpoints: model.safetensors + config.json + tokenizer.json (+ train_state.pt for exact resume).

safetensors holds only tensors (no pickle), so a checkpoint can be loaded safely and quickly; the
optimizer, step, RNG and sampler state live apart in train_state.pt, which inference never reads.
Each file is written to a temporary name and renamed, so a crash mid-save leaves the old file whole;
the step is stored in the safetensors metadata and in train_state.pt so a torn pair is detected.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from rag.llm.model import GPT, ModelConfig
from rag.llm.tokenizer import Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "train_state.pt"


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


def save_checkpoint(out_dir, model: nn.Module, tokenizer: Tokenizer, extra_state: dict | None = None) -> None:
    """Write the checkpoint files into out_dir; extra_state (if any) goes to train_state.pt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    step = str((extra_state or {}).get("step", ""))
    # save_model (not save_file) de-duplicates tied weights such as a shared embedding / lm_head.
    _replace(out_dir / WEIGHTS_FILE, lambda p: save_model(model, str(p), metadata={"step": step}))
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
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
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
