"""kNN-LM: interpolation is a distribution; the datastore follows the index and lowers perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rag.cli import app as rag_app
from rag.config import Settings
from rag.ingest.job import ingest
from rag.llm import checkpoint as ckpt
from rag.llm.generate import GenerationConfig, generate
from rag.llm.knnlm import (
    DIR_NAME,
    Datastore,
    encode_text,
    interpolate,
    knn_forward,
    knn_probs,
    next_token_logprobs,
    read_chunks,
    target_logprob,
    update_index_datastore,
)
from rag.llm.model import GPT, ModelConfig
from tests.llm.test_data import WORDS, tokenizer  # noqa: F401  (fixture)


def test_interpolation_sums_to_one_and_matches_the_target_shortcut():
    torch.manual_seed(0)
    lm = F.log_softmax(torch.randn(5, 11), -1)
    dist, tokens = torch.rand(5, 4) * 3, torch.randint(0, 11, (5, 4))
    p = interpolate(lm, knn_probs(dist, tokens, 0.7, 11), 0.3).exp()
    assert torch.allclose(p.sum(-1), torch.ones(5, dtype=torch.float64))
    target = torch.randint(0, 11, (5,))
    short = target_logprob(lm.gather(-1, target[:, None])[:, 0], dist, tokens, target, 4, 0.7, 0.3)
    assert torch.allclose(short, p.log().gather(-1, target[:, None])[:, 0])
    # a single neighbour at distance 0 puts all of p_kNN on its token
    one = knn_probs(torch.zeros(1, 1), torch.tensor([[7]]), 1.0, 11)
    assert one[0, 7] == 1 and one.sum() == 1


def sentences(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(WORDS), (n, 5), generator=g).tolist()
    return " ".join(" ".join(WORDS[i] for i in row) + "." for row in pick)


def test_datastore_follows_the_index_and_lowers_perplexity(tmp_path, tokenizer, embedder):  # noqa: F811
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.md").write_text(sentences(i, 30))
    settings = Settings(index_dir=tmp_path / "index")
    ingest([docs], settings, embedder=embedder)
    torch.manual_seed(0)
    cfg = {**ModelConfig.preset("tiny").to_dict(), "block_size": 128, "vocab_size": tokenizer.vocab_size}
    model_dir = tmp_path / "lm"
    model = GPT(ModelConfig.from_dict(cfg)).eval()
    ckpt.save_checkpoint(model_dir, model, tokenizer)

    knn = ["index", "knn", "--index", str(settings.index_dir), "--model", str(model_dir)]
    res = CliRunner().invoke(rag_app, knn)
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)
    chunks = read_chunks(settings.index_dir)
    assert first["rebuilt"] and first["added_chunks"] == len(chunks) and first["dropped_chunks"] == 0
    store = Datastore.load(settings.index_dir / DIR_NAME)
    assert set(store.chunk_ids.tolist()) == {c for c, _, _ in chunks}

    # in-domain text already in the datastore: its own contexts are found at distance ~0
    h, lm_lp, y = encode_text(model, tokenizer, chunks[0][2])
    dist, tok = store.search(h, 4)
    assert float(dist[:, 0].max()) < 1e-3
    knn_lp = target_logprob(lm_lp, dist, tok, y, 4, 1.0, 0.5)
    assert math.exp(-knn_lp.mean()) < 0.5 * math.exp(-lm_lp.mean())
    step = next_token_logprobs(model, store, torch.tensor([[tokenizer.bos_id]]), 4, 1.0, 0.5)
    assert torch.allclose(step.exp().sum(-1), torch.ones(1, dtype=torch.float64))

    unchanged = update_index_datastore(settings.index_dir, model_dir)
    assert unchanged["added_chunks"] == unchanged["dropped_chunks"] == 0 and not unchanged["rebuilt"]

    gone = {c for c, d, _ in chunks if d == chunks[0][1]}
    (docs / "d0.md").unlink()
    (docs / "d4.md").write_text(sentences(9, 10))
    ingest([docs], settings, embedder=embedder, prune=True)
    later = update_index_datastore(settings.index_dir, model_dir)
    now = read_chunks(settings.index_dir)
    assert later["dropped_chunks"] == len(gone) and later["added_chunks"] == len(now) - (
        len(chunks) - len(gone)
    )
    ids = set(Datastore.load(settings.index_dir / DIR_NAME).chunk_ids.tolist())
    assert ids == {c for c, _, _ in now} and not ids & gone

    args = ["eval", "knnlm", "--index", str(settings.index_dir), "--model", str(model_dir), "--json"]
    res = CliRunner().invoke(rag_app, [*args, "--held-out", "0.25"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["chunks"]["test"] > 0 and report["datastore_entries"] > 0
    assert report["valid_ppl_knnlm"] <= report["valid_ppl_lm"]
    assert math.isfinite(report["test_ppl_knnlm"]) and report["knn_search_ms_per_token"] > 0


def test_generation_with_the_datastore_recites_what_it_holds(tokenizer):  # noqa: F811
    """The engine's step through the KV cache queries the datastore: with lambda 1 and k 1 greedy
    decoding follows the stored text (its contexts are found at distance ~0); the LM alone does not."""
    torch.manual_seed(0)
    cfg = {**ModelConfig.preset("tiny").to_dict(), "block_size": 128, "vocab_size": tokenizer.vocab_size}
    model = GPT(ModelConfig.from_dict(cfg)).eval()
    text = sentences(7, 8)
    keys, _, next_tokens = encode_text(model, tokenizer, text)
    store = Datastore.empty(keys.shape[1], "test")
    store.add(keys.numpy(), next_tokens.numpy(), chunk_id=1)
    ids = tokenizer.encode(text, add_bos=True)
    config = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    recited = generate(model, tokenizer, [ids[:8]], config, forward=knn_forward(model, store, 1, 1.0, 1.0))
    assert recited[0].token_ids == ids[8:32]
    assert generate(model, tokenizer, [ids[:8]], config)[0].token_ids != ids[8:32]
    with pytest.raises(ValueError, match="either decoder or forward"):
        generate(
            model, tokenizer, [ids[:8]], config, decoder=object(), forward=knn_forward(model, store, 1, 1, 1)
        )
