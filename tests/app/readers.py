"""Tiny real reader checkpoints for the API and UI tests, saved as training saves them.

`save_parrot` trains a small GPT for a few seconds on the very prompt the server builds for
QUESTION over the test index, so over HTTP it answers ANSWER, citing the zebra source as [1].
`save_babbler` saves random weights that never emit a special token: it talks until
max_new_tokens, which a test of stopping a stream needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rag.answer import Reader
from rag.config import Settings
from rag.llm.checkpoint import save_checkpoint
from rag.llm.model import GPT, ModelConfig
from rag.llm.tokenizer import MIN_VOCAB_SIZE, Tokenizer
from rag.retrieve import open_retriever

QUESTION = "What coats do zebras have?"
ANSWER = "black-and-white striped coats [1]"
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, tie_embeddings=False)
# ~3 ms a token on one CPU core, so a whole 512-token answer takes ~1.5 s: a stream closed after
# its first event is stopped well before it would end by itself
BABBLER = dict(n_layer=8, n_head=4, n_kv_head=2, d_model=256, tie_embeddings=False)


def _tokenizer(corpus: Path) -> Tokenizer:
    texts = [p.read_text() for p in sorted((corpus / "docs").iterdir())] + [QUESTION, ANSWER]
    return Tokenizer.train(texts, vocab_size=MIN_VOCAB_SIZE + 64)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """A tiny model trains ~20x faster on one thread than on two cores shared with servers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_torch_thread()
def save_parrot(corpus: Path, out: Path, steps: int = 120) -> None:
    """Train on prompt(QUESTION, hits) -> ANSWER + EOS, the loss on the answer only."""
    torch.manual_seed(0)
    tok = _tokenizer(corpus)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=512, **TINY))
    hits = open_retriever(Settings(index_dir=corpus / "index")).search(QUESTION)  # the server's defaults
    prompt = Reader(model, tok).prompt(QUESTION, hits).ids
    seq = torch.tensor(prompt + tok.encode(ANSWER, add_eos=True))
    x, y = seq[:-1][None], seq[1:].clone()[None]
    y[0, : len(prompt) - 1] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the parrot did not learn its answer (loss {loss.item():.3f})"
    save_checkpoint(out, model.eval(), tok)


def save_babbler(corpus: Path, out: Path) -> None:
    """Random weights; the rows of the special tokens in the output layer are zero, so greedy
    decoding (random logits elsewhere, some surely positive) never picks EOS or another special."""
    torch.manual_seed(0)
    tok = _tokenizer(corpus)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=1024, **BABBLER))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # large weights: varied text rather than one repeated token
        model.lm_head.weight[sorted(tok.special_ids)] = 0.0
    save_checkpoint(out, model.eval(), tok)
