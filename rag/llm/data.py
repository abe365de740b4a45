"""Pretraining data: corpus text -> uint16 token files on disk -> random windows read through np.memmap.

Tokenizing once and memory-mapping the result (as nanoGPT does) keeps the training loop free of
tokenizer work and lets a 100M-token corpus train with almost no RAM. Batches are keyed by
(seed, draw counter), so the sampler's whole state is one integer: resume is exact, and a run on
N ranks sees the same global batches as one process with an N times larger batch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rag.llm.tokenizer import iter_text_blocks

TOKEN_DTYPE = np.uint16
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
_ENCODE_GROUP = 32  # blocks per encode_batch call (parallel in Rust)

# Short names for the public corpora in RAG_SHARED_DATA: name -> (train files, val files | val share of text).
CORPORA: dict[str, tuple[tuple[str, ...], tuple[str, ...] | float]] = {
    "tinyshakespeare": (("lm/tinyshakespeare.txt",), 0.1),
    "wikitext-2": (("lm/wikitext-2/wiki.train.tokens.permuted.gz",), ("lm/wikitext-2/wiki.valid.tokens.gz",)),
    "gutenberg": (("lm/gutenberg-en.txt.gz",), 0.01),
}
DEFAULT_VAL_FRACTION = 0.01


class DataError(ValueError):
    """Bad corpus or token files, with a message meant for the user."""


def resolve_corpus(name_or_path: str) -> tuple[list[Path], list[Path] | None, float]:
    """(train files, val files or None, val_fraction) of a corpus name (see CORPORA) or a file/folder."""
    if name_or_path in CORPORA:
        from rag.config import shared_data_dir  # here, not at the top: the GPU image has no pydantic

        train, val = CORPORA[name_or_path]
        root = shared_data_dir()
        if isinstance(val, float):
            return [root / p for p in train], None, val
        return [root / p for p in train], [root / p for p in val], DEFAULT_VAL_FRACTION
    path = Path(name_or_path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
        if not files:
            raise DataError(f"no .txt or .txt.gz files under {path}")
        return files, None, DEFAULT_VAL_FRACTION
    if path.is_file():
        return [path], None, DEFAULT_VAL_FRACTION
    raise DataError(f"unknown corpus {name_or_path!r}: not one of {sorted(CORPORA)} and not an existing path")


def tokenizer_hash(tokenizer) -> str:
    """sha256 of tokenizer.json: token files are only valid with the exact tokenizer that made them."""
    return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()


def check_vocab_fits(vocab_size: int) -> None:
    """Token ids are stored as uint16; vocab < 65536 also leaves 65535 free as a never-valid id."""
    if vocab_size >= np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"vocab size {vocab_size} does not fit uint16 token files (needs < 65536)")


def prepare_corpus(
    train_paths: list[Path],
    tokenizer,
    out_dir: Path,
    *,
    val_paths: list[Path] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    block_chars: int = 1 << 15,
) -> dict:
    """Tokenize text files (.gz allowed) into out_dir/{train,val}.bin (+ meta.json, tokenizer.json).

    Written in streaming fashion: each ~block_chars block of lines is encoded and appended, so memory
    stays flat. Without explicit val files every k-th block (k = 1/val_fraction) goes to val, which
    spreads validation text over the whole corpus; blocks shrink for small corpora so that val gets
    several of them. Each file is one document: BOS ... EOS. Files are read by iter_text_blocks, so
    a stray invalid UTF-8 byte becomes U+FFFD with a warning, and a file in another encoding stops.
    """
    check_vocab_fits(tokenizer.vocab_size)
    if val_paths is None and not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    missing = [str(p) for p in [*train_paths, *(val_paths or [])] if not Path(p).is_file()]
    if missing:
        raise DataError(f"corpus files not found: {', '.join(missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    every = max(2, round(1 / val_fraction))
    jobs = [(Path(p), "train") for p in train_paths] + [(Path(p), "val") for p in (val_paths or [])]
    counts = {"train": 0, "val": 0}
    tmp = {split: out_dir / f"{split}.bin.tmp" for split in counts}
    total = sum(p.stat().st_size for p, _ in jobs)
    if val_paths is None:
        block_chars = max(256, min(block_chars, int(total * val_fraction / 8)))
    with ExitStack() as stack:
        files = {split: stack.enter_context(open(path, "wb")) for split, path in tmp.items()}
        progress = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing"))
        block_index = 0
        for path, fixed_split in jobs:
            blocks = _with_ends(iter_text_blocks([path], block_chars=block_chars, progress=progress))
            while group := list(itertools.islice(blocks, _ENCODE_GROUP)):
                encoded = tokenizer.encode_batch([block for block, _, _ in group])
                for ids, (_, first, last) in zip(encoded, group, strict=True):
                    split = fixed_split
                    if val_paths is None:
                        split = "val" if block_index % every == every - 1 else "train"
                        block_index += 1
                    ids = [tokenizer.bos_id] * first + ids + [tokenizer.eos_id] * last
                    files[split].write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
                    counts[split] += len(ids)
                progress.set_postfix(tokens=f"{counts['train'] + counts['val']:,}")
    for split, n in counts.items():
        if n == 0:
            raise DataError(f"the {split} split is empty: corpus too small for val_fraction={val_fraction}")
        os.replace(tmp[split], out_dir / f"{split}.bin")
    tokenizer.save(out_dir / TOKENIZER_FILE)
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "n_tokens": counts,
        "sources": {"train": [str(p) for p in train_paths], "val": [str(p) for p in val_paths or []]},
        "val_fraction": None if val_paths else val_fraction,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _with_ends(blocks: Iterator[str]) -> Iterator[tuple[str, bool, bool]]:
    """(block, is_first, is_last): a file starts with BOS and ends with EOS, marking document bounds."""
    prev, first = None, True
    for block in blocks:
        if prev is not None:
            yield prev, first, False
            first = False
        prev = block
    if prev is not None:
        yield prev, first, True


def read_meta(data_dir: Path) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run `rag train prepare` first")
    return json.loads(path.read_text())


def open_tokens(data_dir: Path, split: str) -> np.memmap:
    """Read-only memmap of one split; checks its length against meta.json to catch truncated files."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found")
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if len(tokens) != meta["n_tokens"][split]:
        raise DataError(f"{path} has {len(tokens)} tokens, meta.json says {meta['n_tokens'][split]}")
    return tokens


@dataclass
class IndexSampler:
    """Random indices in [0, high), batch_size per rank per draw, for world_size ranks.

    Each draw makes one global batch of batch_size * world_size indices from an RNG keyed by
    (seed, draws); rank r keeps rows [r*batch_size, (r+1)*batch_size). Ranks thus read disjoint rows
    of the same global batch, one process with world_size * batch_size rows reads them all, and the
    whole state is the draw counter.
    """

    high: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    draws: int = 0

    def next(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.draws])
        self.draws += 1
        batch = rng.integers(0, self.high, size=self.batch_size * self.world_size)
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"sampler seed {self.seed} differs from the checkpoint's {state['seed']}")
        self.draws = state["draws"]


class TokenWindows:
    """Windows of block_size + 1 tokens of a memmapped split, as (x, y) with y = x shifted by one."""

    def __init__(self, data_dir: Path, split: str, block_size: int):
        self.tokens = open_tokens(data_dir, split)
        if len(self.tokens) < block_size + 1:
            raise DataError(
                f"{split} split has {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}"
            )
        self.block_size = block_size

    def __len__(self) -> int:
        """Number of valid window starts."""
        return len(self.tokens) - self.block_size

    def batch(self, starts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(rows)
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]
