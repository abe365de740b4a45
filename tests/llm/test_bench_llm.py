"""LLM benchmarks (bench.llm, bench.scaling): that they measure what they claim, on tiny real models.

Speeds are never asserted; what is checked is that the cached and uncached paths decode the same
tokens, that perplexity is computed over the right windows, that the power-law fit recovers known
parameters, and that a small training run actually learns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bench.cli import app
from bench.llm import (
    compiled_decoding,
    decode_ms,
    kv_cache_speedup,
    new_model,
    perplexity,
    training_throughput,
    window_scaling,
    windowed_training,
)
from bench.scaling import PowerLaw, SmallRun, fit_power_law, plot_scaling, train_small
from rag.llm.data import open_tokens
from rag.llm.model import ModelConfig
from tests.llm.test_data import corpus, one_thread, tokenizer  # noqa: F401  (fixtures)

TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=32)


def test_cached_and_uncached_decoding_produce_the_same_tokens():
    rows = kv_cache_speedup(TINY, contexts=(20, 48), new_tokens=3, warmup=1)
    assert [r["context"] for r in rows] == [20, 48]
    for r in rows:
        assert r["same_tokens"] is True  # the baseline recomputes exactly what the cache computes
        assert r["cached_ms"] > 0 and r["uncached_ms"] > 0
        assert r["speedup"] == pytest.approx(r["uncached_ms"] / r["cached_ms"])


def test_decode_ms_keeps_one_independent_sequence_per_position():
    model = new_model(TINY)
    ms, ids = decode_ms(model, (20, 48), new_tokens=2, warmup=1)
    assert sorted(ms) == [20, 48] and all(len(v) == 3 for v in ids.values())
    _, alone = decode_ms(model, (48,), new_tokens=2, warmup=1)
    assert alone[48] == ids[48]  # interleaving the positions' steps does not mix their caches
    with pytest.raises(ValueError, match="exceed warmup"):
        decode_ms(model, (3,), new_tokens=2, warmup=1)


def test_window_rows_compare_sliding_and_full_at_the_same_positions():
    rows = window_scaling(TINY, positions=(40, 120), window_size=16, new_tokens=2)
    assert [r["attention"] for r in rows] == ["sliding 16", "full"]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["ms@120"] / r["ms@40"])


def test_perplexity_of_an_untrained_model_is_near_uniform_and_learned_positions_stop_at_block_size():
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 600)
    rope = new_model(TINY)
    ppl = perplexity(rope, tokens, length=64, n_tokens=512)
    assert 0.7 * TINY.vocab_size < ppl < 1.3 * TINY.vocab_size  # random init: close to uniform
    assert perplexity(rope, tokens, 64, 512, last=64, stride=64) == pytest.approx(ppl)  # the defaults
    assert math.isfinite(perplexity(rope, tokens, 128, 512))  # rope has no length limit
    # Windows of 32 ending at 64 and 128; only their last 8 positions are scored.
    x = torch.tensor(np.stack([tokens[32:64], tokens[96:128]]), dtype=torch.long)
    y = torch.tensor(np.stack([tokens[33:65], tokens[97:129]]), dtype=torch.long)
    with torch.inference_mode():
        logits = rope(x).logits[:, -8:]
    expected = math.exp(float(F.cross_entropy(logits.flatten(0, 1), y[:, -8:].flatten())))
    assert perplexity(rope, tokens, 32, 128, last=8, stride=64) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="last <= length <= stride"):
        perplexity(rope, tokens, 128, 512, last=16, stride=64)
    learned = new_model(ModelConfig(**{**TINY.to_dict(), "pos": "learned"}))
    with pytest.raises(ValueError, match="block_size"):
        perplexity(learned, tokens, length=128, n_tokens=512)
    with pytest.raises(ValueError, match="at least"):
        perplexity(rope, tokens[:50], length=64, n_tokens=512)


def test_power_law_fit_recovers_known_parameters_and_plots(tmp_path):
    n = [3e4, 1e5, 3e5, 1e6, 3e6]
    truth = PowerLaw(a=40.0, alpha=0.3, c=2.5)
    fit = fit_power_law(n, [truth(x) for x in n])
    assert fit.alpha == pytest.approx(0.3, rel=1e-3) and fit.c == pytest.approx(2.5, rel=1e-3)
    assert fit.a == pytest.approx(40.0, rel=1e-2)
    path = tmp_path / "img" / "scaling.png"
    plot_scaling([int(x) for x in n], [truth(x) for x in n], fit, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law(n[:2], [1.0, 2.0])


def test_small_training_run_learns(corpus, tmp_path):  # noqa: F811  (fixture)
    run = SmallRun(block_size=32, tokens=30_000, batch_size=8, lr=5e-3, warmup_steps=5, eval_iters=4)
    loss = train_small(
        corpus, {"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 2}, run, tmp_path / "r"
    )
    counts = np.bincount(open_tokens(corpus, "train"))
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # the best loss without looking at context
    assert loss < 0.5 * unigram, (loss, unigram)


def test_training_throughput_runs_the_train_loop_step():
    out = training_throughput(
        "cpu", "tiny", steps=2, warmup=1, batch_size=2, model_overrides={"block_size": 32}
    )
    assert out["tokens_per_step"] == 2 * 32 and out["tok_per_s"] > 0
    assert out["mfu"] is None and out["device"] == "cpu"  # no peak FLOP/s for a CPU


def test_compiled_decoding_decodes_the_eager_tokens():
    """The compiled static-cache step (inductor on the CPU) and the eager engine agree token for token."""
    torch._dynamo.reset()
    r = compiled_decoding(TINY, "cpu", torch.float32, position=40, new_tokens=6)
    assert r["token_agreement"] == 1.0 and r["mode"] == "default" and r["dtype"] == "float32"
    assert r["speedup"] == pytest.approx(r["compiled_tok_per_s"] / r["eager_tok_per_s"])


def test_cli_bad_preset_is_one_line_error():
    result = CliRunner().invoke(app, ["llm", "--model", "huge"])
    assert result.exit_code == 1
    assert "unknown model preset 'huge'" in result.output


def test_windowed_training_rows_compare_full_and_sliding_on_one_model():
    """A miniature of the T=4096 run: each window's step in its own process, timed and its peak
    memory read (which is smaller is the T=4096 run's question, not a miniature's)."""
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=8, n_kv_head=8, d_model=64)
    out = windowed_training(cfg, seq_len=512, window_size=16, steps=1)
    assert [r["attention"] for r in out["rows"]] == ["full", "sliding 16"]
    assert all(r["train_step_ms"] > 0 for r in out["rows"])
    assert out["speedup"] == pytest.approx(out["rows"][0]["train_step_ms"] / out["rows"][1]["train_step_ms"])
    assert all(r["step_peak_mb"] > 0 for r in out["rows"])  # a step allocates; sizes are for the bench
