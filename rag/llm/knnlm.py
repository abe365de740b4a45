"""kNN-LM (Khandelwal et al. 2020): a datastore of (final hidden state -> next token) over an index's chunks.

At each step the LM's hidden state h queries the datastore for its k nearest keys (squared L2);
their next tokens vote with weights softmax(-d / temperature), giving p_kNN, and
    p = lambda * p_kNN + (1 - lambda) * p_LM.
The datastore lives next to the index (`<index>/knnlm/`: keys in a FAISS file, next tokens and the
chunk id of every entry in .npy files, meta.json naming the model). It is keyed by chunk id, so an
update after documents were added or deleted drops the entries of chunks that are gone and encodes
only new chunks; a different model (weights hash) rebuilds it from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from rag.llm.cache import KVCache
from rag.llm.checkpoint import WEIGHTS_FILE, load_checkpoint
from rag.llm.generate import Forward
from rag.llm.model import GPT

DIR_NAME = "knnlm"
KEYS_FILE = "keys.faiss"
VALUES_FILE = "values.npy"
CHUNKS_FILE = "chunk_ids.npy"
META_FILE = "meta.json"


def read_chunks(index_dir: Path) -> list[tuple[int, int, str]]:
    """(chunk id, document id, text) of every chunk, read-only from the index's SQLite."""
    db = Path(index_dir) / "meta.sqlite"
    if not db.is_file():
        raise FileNotFoundError(f"no index at {index_dir} (missing {db.name}); run `rag ingest` first")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT id, doc_id, text FROM chunks ORDER BY id").fetchall()
    finally:
        con.close()


def model_hash(model_dir: Path) -> str:
    """The weights' sha256: keys from another model are meaningless, so they trigger a rebuild."""
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def windows(ids: list[int], block: int) -> list[list[int]]:
    """Non-overlapping windows of block + 1 tokens sharing one token (input and next-token target)."""
    return [ids[i : i + block + 1] for i in range(0, max(1, len(ids) - 1), block)]


@torch.no_grad()
def encode_text(model: GPT, tokenizer, text: str) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states, LM log-probs of the next token, and next tokens of BOS + text + EOS."""
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    hs, lps, ys = [], [], []
    for w in windows(ids, model.config.block_size):
        x = torch.tensor([w[:-1]])
        y = torch.tensor(w[1:])
        out = model(x)
        hs.append(out.hidden[0].float())
        lps.append(F.log_softmax(out.logits[0].float(), -1).gather(-1, y[:, None]).squeeze(-1))
        ys.append(y)
    return torch.cat(hs), torch.cat(lps), torch.cat(ys)


@dataclass
class Datastore:
    """FAISS keys + next-token values + the chunk each entry came from."""

    index: faiss.Index
    values: np.ndarray  # int64 (n,)
    chunk_ids: np.ndarray  # int64 (n,)
    model: str  # weights hash

    @classmethod
    def empty(cls, dim: int, model: str) -> Datastore:
        return cls(faiss.IndexFlatL2(dim), np.zeros(0, np.int64), np.zeros(0, np.int64), model)

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, keys: np.ndarray, values: np.ndarray, chunk_id: int) -> None:
        self.index.add(np.ascontiguousarray(keys, dtype=np.float32))
        self.values = np.concatenate([self.values, values.astype(np.int64)])
        self.chunk_ids = np.concatenate([self.chunk_ids, np.full(len(values), chunk_id, np.int64)])

    def keep(self, chunk_ids: set[int]) -> int:
        """Drop entries whose chunk is not in chunk_ids; returns how many chunks were dropped."""
        keep = np.isin(self.chunk_ids, np.fromiter(chunk_ids, np.int64, len(chunk_ids)))
        if keep.all():
            return 0
        dropped = len(set(self.chunk_ids[~keep].tolist()))
        keys = self.index.reconstruct_n(0, self.index.ntotal)[keep]
        self.index = faiss.IndexFlatL2(self.index.d)
        self.index.add(keys)
        self.values, self.chunk_ids = self.values[keep], self.chunk_ids[keep]
        return dropped

    def save(self, path: Path) -> None:
        """Write into a fresh folder, then swap it in: a crash leaves the old datastore or the new one."""
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        faiss.write_index(self.index, str(tmp / KEYS_FILE))
        np.save(tmp / VALUES_FILE, self.values)
        np.save(tmp / CHUNKS_FILE, self.chunk_ids)
        (tmp / META_FILE).write_text(json.dumps({"model": self.model, "entries": len(self)}))
        old = path.with_name(f".old-{path.name}-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, path: Path) -> Datastore:
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"no kNN-LM datastore at {path}; run `rag index knn` first")
        meta = json.loads((path / META_FILE).read_text())
        return cls(
            faiss.read_index(str(path / KEYS_FILE)),
            np.load(path / VALUES_FILE),
            np.load(path / CHUNKS_FILE),
            meta["model"],
        )

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Squared L2 distances (n, k) and next tokens (n, k) of the k nearest entries."""
        d, i = self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
        return torch.from_numpy(d), torch.from_numpy(self.values[np.maximum(i, 0)])


def build_datastore(
    model: GPT, tokenizer, chunks: list[tuple[int, int, str]], store: Datastore
) -> tuple[int, int]:
    """Bring `store` to exactly `chunks`: drop gone chunks, encode new ones; (added, dropped) chunks."""
    dropped = store.keep({c for c, _, _ in chunks})
    have = set(store.chunk_ids.tolist())
    new = [(c, text) for c, _, text in chunks if c not in have]
    model.eval()
    for chunk_id, text in tqdm(new, desc="kNN-LM datastore", unit="chunk", disable=None):
        h, _, y = encode_text(model, tokenizer, text)
        store.add(h.numpy(), y.numpy(), chunk_id)
    return len(new), dropped


def update_index_datastore(index_dir: Path, model_dir: Path) -> dict:
    """`rag index knn`: create or update `<index>/knnlm` for the index's current chunks."""
    path = Path(index_dir) / DIR_NAME
    model, tokenizer = load_checkpoint(model_dir)
    digest = model_hash(model_dir)
    store = Datastore.load(path) if (path / META_FILE).is_file() else None
    rebuilt = store is None or store.model != digest
    if rebuilt:
        store = Datastore.empty(model.config.d_model, digest)
    added, dropped = build_datastore(model, tokenizer, read_chunks(index_dir), store)
    store.save(path)
    return {
        "path": str(path),
        "entries": len(store),
        "added_chunks": added,
        "dropped_chunks": dropped,
        "rebuilt": rebuilt,
    }


# ---------------------------------------------------------------------------------------------
# Interpolation and evaluation


def knn_probs(dist: Tensor, tokens: Tensor, temperature: float, vocab: int) -> Tensor:
    """p_kNN (n, vocab): neighbours' next tokens weighted by softmax(-distance / temperature)."""
    w = F.softmax(-dist.double() / temperature, -1)
    return torch.zeros(len(dist), vocab, dtype=torch.float64).scatter_add_(1, tokens, w)


def interpolate(lm_logprobs: Tensor, p_knn: Tensor, lam: float) -> Tensor:
    """log(lambda * p_kNN + (1 - lambda) * p_LM) over the whole vocabulary, computed stably in log space."""
    return torch.logaddexp(
        torch.log(torch.tensor(lam, dtype=torch.float64)) + torch.log(p_knn),
        torch.log(torch.tensor(1 - lam, dtype=torch.float64)) + lm_logprobs.double(),
    )


def target_logprob(
    lm_lp: Tensor, dist: Tensor, tokens: Tensor, target: Tensor, k: int, temp: float, lam: float
):
    """Interpolated log p(target) per position, without building full distributions."""
    w = F.softmax(-dist[:, :k].double() / temp, -1)
    p_knn = (w * (tokens[:, :k] == target[:, None])).sum(-1)
    return torch.log(lam * p_knn + (1 - lam) * lm_lp.double().exp())


@dataclass
class Encoded:
    hidden: Tensor
    lm_logprob: Tensor  # log p_LM(target)
    target: Tensor
    lm_seconds: float


def encode_chunks(model: GPT, tokenizer, texts: list[str], desc: str) -> Encoded:
    hs, lps, ys = [], [], []
    t0 = time.perf_counter()
    for text in tqdm(texts, desc=desc, unit="chunk", disable=None):
        h, lp, y = encode_text(model, tokenizer, text)
        hs.append(h), lps.append(lp), ys.append(y)
    return Encoded(torch.cat(hs), torch.cat(lps), torch.cat(ys), time.perf_counter() - t0)


def ppl(logprobs: Tensor) -> float:
    return float(torch.exp(-logprobs.mean()))


GRID_K = (1, 4, 16, 64)
GRID_LAMBDA = (0.1, 0.25, 0.4, 0.55, 0.7)
GRID_TEMP_SCALE = (0.1, 0.3, 1.0, 3.0)  # times the median nearest-neighbour distance on validation


def split_docs(chunks: list[tuple[int, int, str]], seed: int, held_out: float) -> dict[str, list]:
    """Documents (not chunks) go to datastore / valid / test, so held-out pages are never in the datastore."""
    docs = sorted({d for _, d, _ in chunks})
    order = np.random.default_rng(seed).permutation(len(docs))
    n = max(1, round(len(docs) * held_out))
    if len(docs) < 3:
        raise ValueError(f"need at least 3 documents in the index for datastore/valid/test, got {len(docs)}")
    valid, test = {docs[i] for i in order[:n]}, {docs[i] for i in order[n : 2 * n]}
    part = {"valid": valid, "test": test}
    return {
        "datastore": [c for c in chunks if c[1] not in valid | test],
        **{name: [c for c in chunks if c[1] in ids] for name, ids in part.items()},
    }


def evaluate_knnlm(index_dir: Path, model_dir: Path, seed: int = 0, held_out: float = 0.1) -> dict:
    """`rag eval knnlm`: perplexity of held-out documents with and without a datastore of the rest.

    k, lambda and temperature are chosen on the valid documents, then applied once to the test ones.
    """
    model, tokenizer = load_checkpoint(model_dir)
    model.eval()
    parts = split_docs(read_chunks(index_dir), seed, held_out)
    store = Datastore.empty(model.config.d_model, model_hash(model_dir))
    build_datastore(model, tokenizer, parts["datastore"], store)
    k_max = min(max(GRID_K), len(store))
    enc, near = {}, {}
    for name in ("valid", "test"):
        enc[name] = encode_chunks(model, tokenizer, [t for _, _, t in parts[name]], name)
        t0 = time.perf_counter()
        near[name] = (*store.search(enc[name].hidden, k_max), time.perf_counter() - t0)
    v = enc["valid"]
    median = float(near["valid"][0][:, 0].median().clamp(min=1e-6))
    best = (float("inf"), 0, 0.0, 0.0)
    for k in (k for k in GRID_K if k <= k_max):
        for scale in GRID_TEMP_SCALE:
            for lam in GRID_LAMBDA:
                lp = target_logprob(v.lm_logprob, *near["valid"][:2], v.target, k, scale * median, lam)
                best = min(best, (ppl(lp), k, scale * median, lam))
    _, k, temp, lam = best
    t = enc["test"]
    with_knn = target_logprob(t.lm_logprob, *near["test"][:2], t.target, k, temp, lam)
    n_tokens = len(t.target)
    return {
        "datastore_entries": len(store),
        "datastore_mb": len(store) * model.config.d_model * 4 / 1e6,
        "chunks": {name: len(c) for name, c in parts.items()},
        "test_tokens": n_tokens,
        "k": k,
        "lambda": lam,
        "temperature": temp,
        "valid_ppl_lm": ppl(v.lm_logprob),
        "valid_ppl_knnlm": best[0],
        "test_ppl_lm": ppl(t.lm_logprob),
        "test_ppl_knnlm": ppl(with_knn),
        "test_ppl_reduction": 1 - ppl(with_knn) / ppl(t.lm_logprob),
        "lm_ms_per_token": 1e3 * t.lm_seconds / n_tokens,
        "knn_search_ms_per_token": 1e3 * near["test"][2] / n_tokens,
    }


def knn_forward(model: GPT, store: Datastore, k: int, temperature: float, lam: float) -> Forward:
    """A step for the generation engine (`generate(..., forward=...)`): the model's step through the
    KV cache, its last hidden state looked up in the datastore, and the interpolated log-probs
    returned in place of logits (sampling from them samples p; greedy takes its argmax)."""
    vocab = model.config.vocab_size

    def forward(idx: Tensor, cache: KVCache | None, pad_mask: Tensor | None) -> Tensor:
        out = model(idx, cache=cache, pad_mask=pad_mask, last_only=True)
        dist, tokens = store.search(out.hidden[:, -1].float(), k)
        lm = F.log_softmax(out.logits[:, -1].float(), -1)
        return interpolate(lm, knn_probs(dist, tokens, temperature, vocab), lam)[:, None]

    return forward


@torch.no_grad()
def next_token_logprobs(
    model: GPT, store: Datastore, idx: Tensor, k: int, temperature: float, lam: float
) -> Tensor:
    """Interpolated log-probs (B, vocab) of the token after each row of idx (no cache)."""
    return knn_forward(model, store, k, temperature, lam)(idx, None, None)[:, -1]
