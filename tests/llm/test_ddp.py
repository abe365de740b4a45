"""DDP: two real gloo processes under torchrun end where one process on the combined batch ends."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rag.llm import checkpoint as ckpt
from rag.llm.cli import app
from rag.llm.model import GPT, ModelConfig
from rag.llm.train import METRICS_FILE, train_lm
from tests.llm.test_align import toy_rows
from tests.llm.test_data import corpus, one_thread, tokenizer  # noqa: F401  (fixtures)
from tests.llm.test_train import TINY_MODEL, tiny_config
from tests.llm.torchrun import assert_same_weights, cli_args, initial_weights, torchrun

# MoE without its balancing loss (computed per rank, it differs by design): DDP also needs no
# unused-parameter search, since every expert runs (on zero tokens if none are routed to it).
MOE = {"ffn": "moe", "n_experts": 4, "moe_top_k": 1, "moe_aux_weight": 0.0}


@pytest.mark.parametrize("model", [{}, MOE], ids=["dense", "moe"])
def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(tmp_path, corpus, model):  # noqa: F811
    """grad_accum=2 runs both paths: a no_sync() micro-step, then the all-reducing one (the only one at 1)."""
    grad_accum = 2
    overrides = {"model_overrides": {**TINY_MODEL, **model}}
    ddp_cfg = tiny_config(
        corpus,
        tmp_path / "ddp",
        batch_size=2,
        grad_accum=grad_accum,
        max_steps=3,
        eval_interval=3,
        **overrides,
    )
    torchrun(["lm", *cli_args(ddp_cfg)], tmp_path)

    single = tiny_config(
        corpus,
        tmp_path / "one",
        batch_size=4,
        grad_accum=grad_accum,
        max_steps=3,
        eval_interval=3,
        **overrides,
    )
    train_lm(single)

    assert_same_weights(tmp_path / "ddp", tmp_path / "one", initial_weights(single))
    state = ckpt.load_train_state(tmp_path / "ddp")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
    rows = (tmp_path / "ddp" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(r)["kind"] for r in rows] == ["train"] * 3 + ["eval"]  # rank 0 alone writes


def test_sft_on_two_gloo_ranks_weights_answer_tokens_as_one_process_does(tmp_path, tokenizer):  # noqa: F811
    """Answers of very different lengths: each micro-batch's weight needs the target count of the whole
    step on every rank (all-reduced), else two ranks would not end where one process ends."""
    rows = toy_rows()
    for i, row in enumerate(rows):
        row["answer"] = row["answer"] * (1 + 3 * (i % 3))  # 1x, 4x or 7x the tokens
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    init = tmp_path / "init"
    ckpt.save_checkpoint(
        init, GPT(ModelConfig(vocab_size=320, **{**TINY_MODEL, "block_size": 128})), tokenizer
    )

    def args(out: str, batch_size: int) -> list[str]:
        return ["sft", "--data", str(data), "--init", str(init), "--out", str(tmp_path / out),
                "--max-steps", "3", "--batch-size", str(batch_size), "--device", "cpu",
                "--set", "grad_accum=2", "--set", "eval_iters=1", "--set", "progress=false"]  # fmt: skip

    torchrun(args("ddp", 2), tmp_path)
    result = CliRunner().invoke(app, args("one", 4))
    assert result.exit_code == 0, result.output
    assert_same_weights(tmp_path / "ddp", tmp_path / "one")
