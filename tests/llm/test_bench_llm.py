"""LLM benchmarks (bench.llm, bench.scaling): that they measure what they claim, on tiny real models.

Speeds are never asserted; what is checked is that the cached and uncached paths decode the same
tokens, that perplexity is computed over the right windows, that the power-law and L(N, D) fits
recover known parameters, and that a small training run actually learns.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bench.cli import app
from bench.llm import (
    ATTENTION_KINDS,
    attention_op,
    compiled_decoding,
    decode_ms,
    kv_cache_speedup,
    new_model,
    peak_bytes,
    perplexity,
    training_throughput,
    window_scaling,
    windowed_training,
)
from bench.scaling import (
    DataLaw,
    PowerLaw,
    SmallRun,
    compute_frontier,
    fit_data_law,
    fit_power_law,
    plot_scaling,
    run_data_scaling,
    train_small,
)
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


def test_data_law_fit_recovers_known_parameters_and_the_frontier_minimises_loss_at_fixed_compute():
    truth = DataLaw(E=1.8, A=60.0, alpha=0.35, B=300.0, beta=0.4)
    n, d = (g.ravel() for g in np.meshgrid([3e4, 1e5, 3e5, 1e6], [1e5, 2e5, 4e5, 8e5]))
    fit = fit_data_law(list(n), list(d), list(truth(n, d)))
    for name, value in asdict(truth).items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-2), name
    # N_opt(C) is the minimum of L along the iso-FLOP line D = C / 6N, found here by brute force.
    compute = 6 * 3e5 * 4e5
    n_opt, d_opt = truth.optimal(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute)
    line = np.geomspace(n_opt / 30, n_opt * 30, 20001)
    assert line[np.argmin(truth(line, compute / (6 * line)))] == pytest.approx(n_opt, rel=1e-3)
    rows = compute_frontier(truth, (3e4, 1e6), (1e5, 8e5), k=3)
    assert [r["compute"] for r in rows] == pytest.approx(
        [6 * 3e4 * 1e5, 6 * np.sqrt(3e4 * 1e6 * 1e5 * 8e5), 6 * 1e6 * 8e5]
    )
    for r in rows:
        assert r["tokens_per_param"] == pytest.approx(r["d_opt"] / r["n_opt"])
        inside = 3e4 <= r["n_opt"] <= 1e6 and 1e5 <= r["d_opt"] <= 8e5
        assert r["inside_grid"] is inside
    with pytest.raises(ValueError, match="2\\+ sizes"):
        fit_data_law([1e4] * 6, [1e5, 2e5, 3e5, 4e5, 5e5, 6e5], [3.0] * 6)


def test_data_scaling_miniature_fits_a_finite_law_and_plots(corpus, tmp_path):  # noqa: F811  (fixture)
    """2 sizes x 3 token budgets on the toy corpus: more tokens lower the loss, the fit is finite and
    close to the points, and the output states the grid it was fitted on."""
    base = SmallRun(block_size=32, batch_size=8, lr=5e-3, eval_iters=4)
    out = run_data_scaling(
        tmp_path / "img" / "data.png",
        budgets=(2048, 4096, 8192),
        sizes=((1, 16, 2), (1, 32, 2)),
        progress=lambda _: None,
        base=base,
        data_dir=corpus,
    )
    points = out["points"]
    assert [(p["d_model"], p["tokens"]) for p in points] == [
        (s, t) for s in (16, 32) for t in (2048, 4096, 8192)
    ]
    for size in (16, 32):
        losses = [p["val_loss"] for p in points if p["d_model"] == size]
        assert losses[-1] < losses[0], losses  # 4x the tokens: lower loss
    fit = out["fit"]
    assert all(math.isfinite(fit[k]) for k in ("E", "A", "alpha", "B", "beta", "rmse"))
    assert fit["rmse"] < 0.1 * min(p["val_loss"] for p in points)
    assert fit["n_opt_exponent"] + fit["d_opt_exponent"] == pytest.approx(1.0)
    assert out["grid"]["tokens"] == [2048, 8192] and out["grid"]["params"][0] < out["grid"]["params"][1]
    assert "extrapolation" in out["note"] and "2,048-8,192 tokens" in out["note"]
    assert len(out["frontier"]) == 5 and all(r["tokens_per_param"] > 0 for r in out["frontier"])
    assert (tmp_path / "img" / "data.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="5\\+ runs"):
        run_data_scaling(tmp_path / "x.png", budgets=(2048, 4096), sizes=((1, 16, 2), (1, 32, 2)))


def test_cli_scaling_data_passes_the_budgets_and_rejects_bad_ones(monkeypatch):
    seen = {}

    def fake(progress, **kwargs):
        seen.update(kwargs)
        return {"fit": {"alpha": 0.3}}

    monkeypatch.setattr("bench.scaling.run_data_scaling", fake)
    result = CliRunner().invoke(app, ["scaling", "--data", "--budgets", "1000,4_000", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"plot_path": "docs/img/scaling-data.png", "budgets": (1000, 4000)}
    seen.clear()
    assert CliRunner().invoke(app, ["scaling", "--data", "--json", "--plot", "p.png"]).exit_code == 0
    assert seen == {"plot_path": "p.png"}  # run_data_scaling's own default grid
    result = CliRunner().invoke(app, ["scaling", "--data", "--budgets", "1e5,x"])
    assert result.exit_code == 1 and "comma-separated integers" in result.output


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


def test_peak_bytes_counts_what_is_live_at_once_on_the_cpu():
    """The CPU peak is read from the profiler's allocation events: two tensors alive together count
    together, one freed before the next does not, and what was allocated before does not count."""
    before = torch.empty(2**20)  # 4 MiB live already

    def together():
        a, b = torch.empty(2**18), torch.empty(2**19)  # 1 + 2 MiB
        return a.numel() + b.numel()

    def one_after_the_other():
        for n in (2**18, 2**19):
            torch.empty(n)

    assert peak_bytes(together, torch.device("cpu")) == 3 * 2**20
    assert peak_bytes(one_after_the_other, torch.device("cpu")) == 2 * 2**20
    assert before.numel() == 2**20


def test_attention_op_rows_time_and_measure_the_three_kinds_on_one_input():
    """A miniature of the T=4096 attention-only rows: fused full, block-local and dense-masked
    sliding window; the two window paths give the same output, and the ratios are the rows'."""
    cfg = ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=4, n_kv_head=2, d_model=64)
    out = attention_op(cfg, seq_len=256, window_size=16, steps=1)
    rows = {r["attention"]: r for r in out["rows"]}
    assert list(rows) == list(ATTENTION_KINDS) == ["full", "block-local", "dense masked"]
    assert out["max_abs_diff_block_local_vs_dense_masked"] < 1e-5
    floor = (2 * 4 + 2 * 2) * 256 * 16 * 4 / 2**20  # output and q, k, v gradients, fp32
    for r in rows.values():
        assert 0 < r["fwd_ms"] < r["fwd_bwd_ms"]
        assert r["peak_mb"] >= floor and r["above_floor_mb"] == pytest.approx(r["peak_mb"] - floor)
    assert rows["full"]["mask_mb"] == 0 and rows["dense masked"]["mask_mb"] == 256 * 256 / 2**20  # bool
    assert rows["block-local"]["mask_mb"] > 0
    local = rows["block-local"]
    assert out["speedup_vs_full"] == pytest.approx(rows["full"]["fwd_bwd_ms"] / local["fwd_bwd_ms"])
    assert out["memory_ratio_vs_dense_masked"] == pytest.approx(
        rows["dense masked"]["peak_mb"] / local["peak_mb"]
    )
    assert "profiler" in out["memory"]
