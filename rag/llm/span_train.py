"""Fine-tuning the warm-started reader on span rows (rag.span_data): the CPU recipe.

Each row is one (question, source) prompt; the target is the answer span copied from the source,
then "[n]" and EOS, or EOS alone when the source does not hold the answer. The loss is the
pointer-generator's negative log-likelihood of the target tokens (rag.llm.model.CopyHead) plus,
weighted by `span_weight`, the cross-entropy of the copy pointer against the exact source position
of each span token: at the first answer step that is the start pointer of an extractive reader,
the signal that teaches a warm-started encoder to find answers fastest.

Cheap where it can be: the 30k-word LM head runs only at answer steps (a handful per row, not
every position), batches are built from rows of similar length (length bucketing: little padding),
and the embeddings plus the lowest `freeze_layers` blocks can be frozen. Everything else (AdamW,
schedule, checkpoints with exact resume, metrics, loss curve) is the shared Trainer's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rag.llm.checkpoint import load_checkpoint
from rag.llm.model import GPT
from rag.llm.train import TrainConfig, TrainResult, run, setup_runtime
from rag.llm.warmstart import load_minilm

WARM_START = "minilm"  # init_from value that loads all-MiniLM-L6-v2 (rag.llm.warmstart)
VAL_SPLIT_SEED = 1337  # the held-out rows do not depend on the run's seed: a continued run (new
# seed, new draws) keeps the same validation rows


class SpanRows:
    """Rows as int32 arrays (prompt ids) plus their span fields, read line by line."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"span rows not found: {path} (build them with `rag train reader-data`)")
        self.prompts: list[np.ndarray] = []
        self.meta: list[tuple[int, int, int, int, int]] = []  # text_start, text_len, first, last, n
        with path.open(encoding="utf-8") as lines:
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    first, last = r["span"] if r["span"] else (-1, -1)
                    self.meta.append((int(r["text_start"]), int(r["text_len"]), first, last, int(r["n"])))
                    self.prompts.append(np.asarray(r["prompt_ids"], dtype=np.int32))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{i}: not a span row ({e})") from None
        if not self.prompts:
            raise ValueError(f"{path}: no rows")

    def __len__(self) -> int:
        return len(self.prompts)


class SpanTask:
    """The Trainer's Task for span rows: an index is a whole length bucket (a micro-batch)."""

    def __init__(
        self,
        rows: SpanRows,
        tokenizer,
        *,
        batch_tokens: int,
        span_weight: float,
        val_fraction: float,
        seed: int,
        max_len: int | None = None,
    ):
        """max_len: the model's context; rows whose prompt and answer are longer are left out
        (counted in `too_long`): a long answer after a prompt near the budget can overflow it."""
        self.tokenizer, self.rows, self.span_weight = tokenizer, rows, span_weight
        self.cite = {n: tokenizer.encode(f"[{n}]") for n in range(1, 100)}
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_val = max(1, int(len(order) * val_fraction))
        splits = {"val": order[:n_val], "train": order[n_val:]}  # split first: the same held-out rows
        fits = {k: [i for i in v if max_len is None or self._length(i) <= max_len] for k, v in splits.items()}
        self.too_long = sum(len(splits[k]) - len(fits[k]) for k in splits)
        self.buckets = {k: self._bucket(v, batch_tokens) for k, v in fits.items()}

    def _target(self, i: int) -> tuple[np.ndarray, list[int], list[int]]:
        """(prompt, target tokens, copy position per target: -1 = generated, not copied)."""
        prompt = self.rows.prompts[i]
        text_start, _, first, last, n = self.rows.meta[i]
        if first < 0:
            return prompt, [self.tokenizer.eos_id], [-1]
        span = list(range(text_start + first, text_start + last + 1))
        target = [int(prompt[p]) for p in span] + self.cite[n] + [self.tokenizer.eos_id]
        return prompt, target, span + [-1] * (len(target) - len(span))

    def _length(self, i: int) -> int:
        _, _, first, last, n = self.rows.meta[i]
        return len(self.rows.prompts[i]) + (last - first + 1 + len(self.cite[n]) if first >= 0 else 1)

    def _bucket(self, indices: list[int], batch_tokens: int) -> list[list[int]]:
        """Rows sorted by length, cut into micro-batches of at most batch_tokens padded tokens."""
        indices = sorted(indices, key=self._length)
        buckets, current = [], []
        for i in indices:
            if current and (len(current) + 1) * self._length(i) > batch_tokens:
                buckets.append(current)
                current = []
            current.append(i)
        return buckets + [current] if current else buckets

    def size(self, split: str) -> int:
        return len(self.buckets[split])

    def batch(self, split: str, indices: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        rows = [r for b in indices for r in self.buckets[split][int(b)]]
        items = [self._target(i) for i in rows]
        T = max(len(p) + len(t) - 1 for p, t, _ in items)
        x = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        copyable = torch.zeros(len(rows), T, dtype=torch.bool)
        prefix = torch.empty(len(rows), dtype=torch.long)
        step_row, step_pos, target, copy_pos = [], [], [], []
        for r, (i, (prompt, tgt, cp)) in enumerate(zip(rows, items, strict=True)):
            seq = np.concatenate([prompt, np.asarray(tgt[:-1], dtype=np.int32)])
            x[r, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
            text_start, text_len = self.rows.meta[i][:2]
            copyable[r, text_start : text_start + text_len] = True
            prefix[r] = len(prompt)
            for j, (y, p) in enumerate(zip(tgt, cp, strict=True)):
                step_row.append(r)
                step_pos.append(len(prompt) - 1 + j)
                target.append(y)
                copy_pos.append(p)
        pad_mask = torch.arange(T)[None] < torch.tensor([len(p) + len(t) - 1 for p, t, _ in items])[:, None]
        batch = {
            "x": x,
            "pad_mask": pad_mask,
            "prefix_len": prefix,
            "copyable": copyable,
            "step_row": torch.tensor(step_row),
            "step_pos": torch.tensor(step_pos),
            "target": torch.tensor(target),
            "copy_pos": torch.tensor(copy_pos),
        }
        return {k: v.to(device) for k, v in batch.items()}

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return span_loss(model, batch, self.span_weight)

    def n_targets(self, batch) -> torch.Tensor:
        return torch.tensor(batch["target"].numel())

    def n_tokens(self, batch) -> int:
        return int(batch["pad_mask"].sum())


def span_loss(model: nn.Module, batch: dict[str, torch.Tensor], span_weight: float):
    """Pointer-generator NLL of the targets + span_weight * CE of the pointer at copy targets."""
    raw = model.module if hasattr(model, "module") else model
    hidden = model(batch["x"], pad_mask=batch["pad_mask"], prefix_len=batch["prefix_len"], head=False).hidden
    rows, pos = batch["step_row"], batch["step_pos"]
    h = hidden[rows, pos][:, None]  # (N, 1, d): the answer steps
    keys = raw.copy.key(hidden)[rows]  # (N, T, d); one key per source position of the step's row
    log_copy, gate = raw.copy.pointer(h, keys, batch["copyable"][rows])
    y = batch["target"][:, None]
    nll = -raw.copy.log_prob(raw.logits_of(h), log_copy, gate, batch["x"][rows], y)[:, 0]
    copied = batch["copy_pos"] >= 0
    pointer = -log_copy[:, 0].gather(1, batch["copy_pos"].clamp(min=0)[:, None]).squeeze(1)
    pointer_ce = torch.where(copied, pointer, 0.0).sum() / copied.sum().clamp(min=1)
    loss = nll.mean() + span_weight * pointer_ce
    first = batch["step_pos"] == batch["prefix_len"][rows] - 1  # the first answer step of each row
    start_ok = (log_copy[:, 0].argmax(-1) == batch["copy_pos"]) & first & copied
    metrics = {
        "nll": nll.mean().detach(),
        "pointer_ce": pointer_ce.detach(),
        "start_acc": start_ok.sum() / (first & copied).sum().clamp(min=1),
    }
    return loss, metrics


def freeze_lower(model: GPT, layers: int) -> None:
    """Freeze the embeddings (tokens, positions, their norm) and the lowest `layers` blocks.

    The tied LM head shares the token embedding, so it is frozen with it; the head transform and
    copy head above stay trainable. Frozen layers need no gradients: a cheaper backward pass.
    """
    if layers <= 0:
        return
    for module in (model.tok_emb, model.positions, model.embed_norm, *model.blocks[:layers]):
        module.requires_grad_(False)


def train_reader(cfg: TrainConfig, data: str | Path) -> TrainResult:
    """Fine-tune the warm start (cfg.init_from = "minilm", or a checkpoint folder) on span rows."""
    rt = setup_runtime(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.init_from in (None, WARM_START):
        model, tokenizer = load_minilm()
    else:
        model, tokenizer = load_checkpoint(cfg.init_from)
    if model.copy is None or model.config.mask != "prefix":
        raise ValueError("the span reader needs a prefix-LM model with a copy head (preset minilm-reader)")
    freeze_lower(model, cfg.freeze_layers)
    rows = SpanRows(data)

    def task(block: int) -> SpanTask:
        return SpanTask(
            rows,
            tokenizer,
            batch_tokens=cfg.batch_tokens,
            span_weight=cfg.span_weight,
            val_fraction=cfg.val_fraction,
            seed=VAL_SPLIT_SEED,
            max_len=block,
        )

    return run(cfg, model, task, rt)
