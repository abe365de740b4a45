"""DDP: two real gloo processes under torchrun end where one process on the combined batch ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rag.llm import checkpoint as ckpt
from rag.llm.cli import app
from rag.llm.model import GPT, ModelConfig
from rag.llm.train import METRICS_FILE, TrainConfig, train_lm
from tests.conftest import ROOT
from tests.llm.test_align import toy_rows
from tests.llm.test_data import corpus, one_thread, tokenizer  # noqa: F401  (fixtures)
from tests.llm.test_train import TINY_MODEL, tiny_config


def cli_args(cfg: TrainConfig) -> list[str]:
    """The same TrainConfig as `rag train lm --set ...` options."""
    args = []
    for key, value in asdict(cfg).items():
        if key == "model_overrides":
            args += [a for k, v in value.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]
        else:
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*launch, "-m", "rag.llm.cli", "lm", *cli_args(ddp_cfg)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

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

    ddp_w, one_w = (
        load_file(tmp_path / "ddp" / ckpt.WEIGHTS_FILE),
        load_file(tmp_path / "one" / ckpt.WEIGHTS_FILE),
    )
    initial = GPT_initial_weights(single)
    for name, w in one_w.items():
        torch.testing.assert_close(ddp_w[name], w, atol=1e-5, rtol=0)
        assert not torch.equal(w, initial[name]) or "norm" in name  # every matrix actually moved
    state = ckpt.load_train_state(tmp_path / "ddp")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
    rows = (tmp_path / "ddp" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(r)["kind"] for r in rows] == ["train"] * 3 + ["eval"]  # rank 0 alone writes


def GPT_initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights train_lm starts from (it seeds with cfg.seed before building the model)."""
    torch.manual_seed(cfg.seed)
    return GPT(ckpt.load_config(cfg.out_dir)).state_dict()


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

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launch, "-m", "rag.llm.cli", *args("ddp", 2)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = CliRunner().invoke(app, args("one", 4))
    assert result.exit_code == 0, result.output
    one_w = load_file(tmp_path / "one" / ckpt.WEIGHTS_FILE)
    for name, w in load_file(tmp_path / "ddp" / ckpt.WEIGHTS_FILE).items():
        torch.testing.assert_close(w, one_w[name], atol=1e-5, rtol=0)
