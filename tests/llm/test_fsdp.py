"""FSDP: two gloo ranks holding half of every parameter, gradient and AdamW moment end where one process
on the combined batch ends, also when stopped and resumed from their sharded checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from rag.llm import checkpoint as ckpt
from rag.llm.cli import app
from rag.llm.train import METRICS_FILE, train_lm
from tests.llm.test_data import corpus, one_thread, tokenizer  # noqa: F401  (fixtures)
from tests.llm.test_train import tiny_config
from tests.llm.torchrun import assert_same_weights, cli_args, initial_weights, torchrun


def test_fsdp_two_gloo_ranks_resumed_from_shards_end_where_one_process_ends(tmp_path, corpus):  # noqa: F811
    """grad_accum=2: each micro-batch's gradient is reduce-scattered into the sharded .grad, where they
    add up as one process's gradients accumulate. The two ranks stop after step 2, each writing its
    shards (torch.distributed.checkpoint), and a new launch resumes from them to step 4; one process
    runs the 4 steps on the combined batch (2 x 2 rows per micro-batch).

    Mutation run once: load_sharded reading only the model from the shards (AdamW restarting from
    zero moments) fails the weight comparison (max difference 6e-3)."""
    common = dict(grad_accum=2, max_steps=4, eval_interval=2)
    fsdp = tiny_config(corpus, tmp_path / "fsdp", batch_size=2, parallel="fsdp", stop_step=2, **common)
    torchrun(["lm", *cli_args(fsdp)], tmp_path)
    shards = sorted(p.name for p in (tmp_path / "fsdp" / ckpt.SHARDED_DIR).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    state = ckpt.load_train_state(tmp_path / "fsdp")
    assert state["step"] == 2 and state["sharded"] and "optimizer" not in state  # AdamW is in the shards
    torchrun(["lm", *cli_args(replace(fsdp, resume=True, stop_step=None))], tmp_path)

    single = tiny_config(corpus, tmp_path / "one", batch_size=4, **common)
    train_lm(single)
    assert_same_weights(tmp_path / "fsdp", tmp_path / "one", initial_weights(single))
    rows = [json.loads(r) for r in (tmp_path / "fsdp" / METRICS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)
    ]  # fmt: skip
    one_rows = [json.loads(r) for r in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    for got, want in zip(rows, one_rows, strict=True):  # losses and grad norms gathered over the shards
        for key in ("loss", "grad_norm", "val_loss"):
            if key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)


def test_parallel_option_reaches_the_trainer(tmp_path, corpus):  # noqa: F811
    args = ["lm", "--data", str(corpus), "--out", str(tmp_path), "--device", "cpu", "--parallel", "zero3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "parallel must be one of ('ddp', 'fsdp')" in result.output


def test_fsdp_memory_bench_counts_each_ranks_tensors():
    """bench.fsdp_memory (the docs/scaling.md table) in one process: fp32 parameters and gradients of 4
    bytes each plus AdamW's two 4-byte moments are 16 bytes per parameter, counted exactly."""
    from bench.fsdp_memory import measure

    (row,) = measure("ddp", 1)
    assert row["ranks"] == 1 and row["n_params"] > 29_000_000
    assert row["state_mb"] == pytest.approx(16 * row["n_params"] / 2**20, abs=0.2)
    assert row["adam_mb"] == pytest.approx(2 * row["params_mb"], abs=0.2)
    assert row["peak_mb"] >= row["rss_after_mb"] > 0
