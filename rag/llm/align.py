"""Alignment after pretraining: SFT on (prompt, answer) pairs and DPO on (prompt, chosen, rejected).

Both learn only from response tokens: prompt positions get target -100, so the model is never
trained to reproduce retrieved sources or questions, only to answer them. Rows are right-padded;
with causal attention a real token never sees the padding after it, and padded targets are -100.
DPO (Rafailov et al. 2023) compares sequence log-probs of the policy with those of a frozen copy
of the starting model, which keeps the policy close to it without a separate reward model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rag.llm.checkpoint import load_checkpoint
from rag.llm.model import IGNORE_INDEX as IGNORE
from rag.llm.tokenizer import Tokenizer
from rag.llm.train import TrainConfig, TrainResult, lm_loss, n_targets, run, setup_runtime

SFT_KEYS = ("answer",)
DPO_KEYS = ("chosen", "rejected")


def read_jsonl(path, keys: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file, each with a prompt and the string fields `keys`; errors name the line.

    The prompt is a string `prompt` or, for exact agreement with the reader's prompt template, a list
    of token ids `prompt_ids` (then used as is, BOS included).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as lines:  # line by line: reader data runs to hundreds of MB
        for n, line in enumerate(lines, 1):
            if line.strip():
                rows.append(_parse_row(path, n, line, keys))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def _parse_row(path: Path, n: int, line: str, keys: tuple[str, ...]) -> dict:
    """One JSONL row, checked; prompt_ids become an int32 array (a Python int list costs ~9x more)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object")
    bad = [k for k in keys if not isinstance(row.get(k), str)]
    ids = row.get("prompt_ids")
    if not isinstance(row.get("prompt"), str) and not (
        isinstance(ids, list) and ids and all(isinstance(i, int) and abs(i) < 2**31 for i in ids)
    ):
        bad.insert(0, "prompt")
    if bad:
        raise ValueError(
            f"{path}:{n}: needs a prompt (or prompt_ids) and {list(keys)}; bad or missing: {bad}"
        )
    if isinstance(ids, list):
        row["prompt_ids"] = np.asarray(ids, dtype=np.int32)
    return row


def prompt_tokens(tokenizer: Tokenizer, row: dict) -> list[int]:
    """`prompt_ids` as given, else BOS + `prompt`, whose <source>/<question>/<answer> markers are specials."""
    ids = row.get("prompt_ids")
    if ids is not None:
        if min(ids) < 0 or max(ids) >= tokenizer.vocab_size:
            raise ValueError(f"prompt_ids must be in [0, {tokenizer.vocab_size})")
        return [int(i) for i in ids]
    return tokenizer.encode(row["prompt"], add_bos=True, allow_special=True)


def response_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """A response ends with EOS, so the model learns where to stop."""
    return tokenizer.encode(text, add_eos=True)


def shift_and_mask(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    """Inputs and next-token targets of prompt+response, targets IGNORE'd where they are prompt tokens."""
    full = prompt + response
    targets = [IGNORE] * (len(prompt) - 1) + response
    return full[:-1], targets


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad shifted (inputs, targets) rows to one length: inputs with pad_id, targets with IGNORE."""
    rows = [shift_and_mask(p, r) for p, r in pairs]
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (xi, yi) in enumerate(rows):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x, y


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(target) over non-IGNORE positions (the response tokens), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(beta * (policy margin - reference margin)), averaged; margins are chosen - rejected."""
    logits = beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected))
    loss = -F.logsigmoid(logits).mean()
    return loss, {
        "reward_margin": logits.detach().mean(),
        "reward_acc": (logits.detach() > 0).float().mean(),
        "logp_margin": (policy_chosen - policy_rejected).detach().mean(),
    }


def _split(rows: list, val_rows: list | None, val_fraction: float, seed: int) -> dict[str, list]:
    """Explicit val rows, else a seeded val_fraction (at least one row) held out of rows."""
    if val_rows is not None:
        return {"train": rows, "val": val_rows}
    if len(rows) < 2:
        raise ValueError("need at least 2 examples to hold one out for validation (or pass a val file)")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, round(len(rows) * val_fraction))
    return {"train": [rows[i] for i in order[n_val:]], "val": [rows[i] for i in order[:n_val]]}


def _fit(items: list, length: Callable[[Any], int], max_len: int, what: str) -> list:
    """Drop examples longer than the context; a clear error if none is left."""
    kept = [it for it in items if length(it) <= max_len + 1]
    if not kept:
        raise ValueError(f"no {what} example fits the context of {max_len} tokens")
    if len(kept) < len(items):
        print(f"note: dropped {len(items) - len(kept)} of {len(items)} {what} examples over {max_len} tokens")
    return kept


def _ids(tokens: list[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


class SFTTask:
    """Supervised fine-tuning: cross-entropy on answer tokens only."""

    def __init__(self, rows: dict[str, list[dict]], tokenizer: Tokenizer, max_len: int):
        self.tokenizer = tokenizer
        # int32 arrays: tens of thousands of reader prompts as Python int lists take gigabytes
        self.data = {
            split: _fit(
                [
                    (_ids(prompt_tokens(tokenizer, r)), _ids(response_tokens(tokenizer, r["answer"])))
                    for r in split_rows
                ],
                lambda pr: len(pr[0]) + len(pr[1]),
                max_len,
                split,
            )
            for split, split_rows in rows.items()
        }

    def size(self, split: str) -> int:
        return len(self.data[split])

    def batch(self, split: str, indices: np.ndarray, device: torch.device):
        pairs = [(p.tolist(), r.tolist()) for p, r in (self.data[split][i] for i in indices)]
        x, y = collate(pairs, self.tokenizer.pad_id)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss(model, *batch)

    def n_targets(self, batch) -> torch.Tensor:
        """Answer lengths vary, so accumulation weights micro-batches by their answer tokens."""
        return n_targets(batch[1])

    def n_tokens(self, batch) -> int:
        return batch[0].numel()


class DPOTask:
    """Direct preference optimisation against a frozen reference copy of the starting model."""

    perplexity = False  # the DPO loss is not a cross-entropy

    def __init__(
        self,
        rows: dict[str, list[dict]],
        tokenizer: Tokenizer,
        max_len: int,
        reference: nn.Module,
        beta: float,
    ):
        self.tokenizer, self.beta = tokenizer, beta
        self.reference = freeze(reference)

        def encode(r: dict) -> tuple:
            chosen, rejected = (response_tokens(tokenizer, r[k]) for k in DPO_KEYS)
            return prompt_tokens(tokenizer, r), chosen, rejected

        def length(t: tuple) -> int:
            return len(t[0]) + max(len(t[1]), len(t[2]))

        self.data = {
            split: _fit([encode(r) for r in rs], length, max_len, split) for split, rs in rows.items()
        }

    def size(self, split: str) -> int:
        return len(self.data[split])

    def batch(self, split: str, indices: np.ndarray, device: torch.device):
        """Chosen rows first, then rejected rows, in one padded batch (one forward pass for both)."""
        items = [self.data[split][i] for i in indices]
        pairs = [(p, c) for p, c, _ in items] + [(p, r) for p, _, r in items]
        x, y = collate(pairs, self.tokenizer.pad_id)
        return x.to(device), y.to(device)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        policy = sequence_logprobs(model(x).logits, y)
        self.reference.to(x.device)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference(x).logits, y)
        half = x.shape[0] // 2
        return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.beta)

    def n_tokens(self, batch) -> int:
        return batch[0].numel()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the DPO reference must never change."""
    model.eval()
    model.requires_grad_(False)
    return model


def _load(cfg: TrainConfig, keys: tuple[str, ...]):
    if not cfg.init_from:
        raise ValueError("SFT and DPO start from a pretrained checkpoint: set init_from")
    rt = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_checkpoint(cfg.init_from)
    val = read_jsonl(cfg.val_data, keys) if cfg.val_data else None
    rows = _split(read_jsonl(cfg.data_dir, keys), val, cfg.val_fraction, cfg.seed)
    return rt, model, tokenizer, rows


def train_sft(cfg: TrainConfig) -> TrainResult:
    """Fine-tune cfg.init_from on JSONL {"prompt", "answer"} rows in cfg.data_dir."""
    rt, model, tokenizer, rows = _load(cfg, SFT_KEYS)
    return run(cfg, model, lambda block: SFTTask(rows, tokenizer, block), rt)


def train_dpo(cfg: TrainConfig) -> TrainResult:
    """Preference-tune cfg.init_from on JSONL {"prompt", "chosen", "rejected"} rows in cfg.data_dir."""
    rt, model, tokenizer, rows = _load(cfg, DPO_KEYS)
    reference = copy.deepcopy(model)
    return run(cfg, model, lambda block: DPOTask(rows, tokenizer, block, reference, cfg.beta), rt)
