"""SFT (loss on answer tokens only) and DPO (frozen reference, preference margin) on a toy set."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rag.llm import checkpoint as ckpt
from rag.llm.align import (
    IGNORE,
    SFT_KEYS,
    DPOTask,
    SFTTask,
    collate,
    prompt_tokens,
    read_jsonl,
    response_tokens,
    sequence_logprobs,
    shift_and_mask,
)
from rag.llm.cli import app
from rag.llm.model import GPT, ModelConfig
from rag.llm.train import TrainConfig, Trainer, run, setup_runtime
from tests.llm.test_data import WORDS, one_thread, tokenizer  # noqa: F401  (fixtures)
from tests.llm.test_train import TINY_MODEL

ACTS = ["sings", "walks", "sleeps", "runs"]


def toy_rows() -> list[dict]:
    """Each subject has one right act (chosen) and a wrong one (rejected)."""
    rows = []
    for i, who in enumerate(WORDS[:12]):
        prompt = f"<question> What does the {who} do?\n<answer>"
        right, wrong = f" The {who} {ACTS[i % 4]}.", f" The {who} {ACTS[(i + 1) % 4]}."
        rows.append({"prompt": prompt, "answer": right, "chosen": right, "rejected": wrong})
    return rows


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):  # noqa: F811
    """A randomly initialised tiny model saved as a checkpoint: SFT/DPO's init_from."""
    path = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {**ModelConfig.preset("tiny").to_dict(), **TINY_MODEL, "block_size": 64, "vocab_size": 320}
    )
    ckpt.save_checkpoint(path, GPT(cfg), tokenizer)
    return path


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("jsonl") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()))
    return path


def answer_loss(model, tokenizer, rows) -> float:  # noqa: F811
    task = SFTTask({"all": rows}, tokenizer, max_len=64)
    assert task.size("all") == len(rows)
    with torch.no_grad():
        return task.loss(model.eval(), task.batch("all", np.arange(len(rows)), torch.device("cpu")))[0].item()


def test_sft_targets_cover_answer_tokens_only(tokenizer, start):  # noqa: F811
    row = toy_rows()[0]
    prompt, answer = prompt_tokens(tokenizer, row), response_tokens(tokenizer, row["answer"])
    assert prompt[0] == tokenizer.bos_id and answer[-1] == tokenizer.eos_id
    assert tokenizer.token_id("<answer>") in prompt  # the marker is the special token, not its characters
    short_ids = [tokenizer.bos_id, tokenizer.token_id("<question>"), *tokenizer.encode(" Who?")]
    short = prompt_tokens(tokenizer, {"prompt_ids": short_ids}), response_tokens(tokenizer, " The king.")
    assert short[0] == short_ids  # exact ids from a template are used as given
    x, y = collate([(prompt, answer), short], tokenizer.pad_id)
    assert y[0][y[0] != IGNORE].tolist() == answer  # exactly the answer (with EOS) is supervised
    assert (y[0, : len(prompt) - 1] == IGNORE).all()
    n_short = len(short[0]) + len(short[1]) - 1
    assert (x[1, n_short:] == tokenizer.pad_id).all() and (y[1, n_short:] == IGNORE).all()  # padding ignored

    # The gradient reaches no prompt or padding position: prompt targets cannot change the loss.
    model, _ = ckpt.load_checkpoint(start)
    logits = model(x).logits.detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, y != IGNORE)
    assert model(x, targets=y).loss.item() == pytest.approx(loss.item(), rel=1e-5)  # the model agrees
    # Whatever the prompt's tokens would have been as targets, the masked targets are the same.
    other_prompt = [prompt[0], *np.random.default_rng(0).integers(10, 300, len(prompt) - 1).tolist()]
    assert shift_and_mask(other_prompt, answer)[1] == shift_and_mask(prompt, answer)[1]


def test_sft_grad_accumulation_equals_one_batch_of_the_same_rows(tmp_path, tokenizer, start):  # noqa: F811
    """Answers of different lengths: two micro-batches give the gradient of their combined batch (every
    answer token weighs the same), not the mean of two per-micro-batch means."""
    rows = toy_rows()[:4]
    rows[0]["answer"] = " The king sings over the river and under the stone, slowly and bright."
    rows[2]["answer"] = rows[3]["answer"] = " Yes."
    task = SFTTask({"train": rows}, tokenizer, max_len=64)
    batches = [task.batch("train", np.arange(i, i + 2), torch.device("cpu")) for i in (0, 2)]
    assert task.n_targets(batches[0]) > 2 * task.n_targets(batches[1])  # very unequal answer lengths
    model, _ = ckpt.load_checkpoint(start)
    trainer = Trainer(TrainConfig(out_dir=str(tmp_path), device="cpu"), model, task, 64)

    def grads(micro_batches) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        metrics = trainer.accumulate(micro_batches)
        return {"loss": metrics["loss"], **{n: p.grad.clone() for n, p in model.named_parameters()}}

    one = grads([task.batch("train", np.arange(4), torch.device("cpu"))])
    two = grads(batches)
    for name, g in one.items():
        torch.testing.assert_close(two[name], g, atol=1e-6, rtol=1e-5)


def test_sft_lowers_answer_loss(tmp_path, tokenizer, start, jsonl):  # noqa: F811
    rows = toy_rows()
    before = answer_loss(ckpt.load_checkpoint(start)[0], tokenizer, rows)
    out = tmp_path / "sft"
    args = ["sft", "--data", str(jsonl), "--init", str(start), "--out", str(out), "--max-steps", "60",
            "--batch-size", "8", "--lr", "1e-2", "--device", "cpu", "--set", "warmup_steps=5",
            "--set", "eval_interval=60", "--set", "eval_iters=1", "--set", "progress=false"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    after = answer_loss(ckpt.load_checkpoint(out)[0], tokenizer, rows)
    assert after < 0.5 * before, (before, after)


def test_dpo_raises_margin_and_keeps_reference_frozen(tmp_path, tokenizer, start):  # noqa: F811
    rows = toy_rows()
    model, _ = ckpt.load_checkpoint(start)
    reference = copy.deepcopy(model)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    tasks = []

    def make_task(block):
        tasks.append(DPOTask({"train": rows, "val": rows[:4]}, tokenizer, block, reference, beta=0.1))
        return tasks[0]

    def margins(policy) -> torch.Tensor:
        """log p(chosen) - log p(rejected) per row."""
        x, y = tasks[0].batch("train", np.arange(len(rows)), torch.device("cpu"))
        with torch.no_grad():
            logp = sequence_logprobs(policy.eval()(x).logits, y)
        return logp[: len(rows)] - logp[len(rows) :]

    cfg = TrainConfig(out_dir=str(tmp_path / "dpo"), batch_size=6, lr=3e-3, warmup_steps=2, max_steps=25,
                      eval_interval=25, eval_iters=1, progress=False, device="cpu", beta=0.1)  # fmt: skip
    result = run(cfg, model, make_task, setup_runtime("cpu"))
    gain = margins(model) - margins(reference)  # the implicit DPO reward, / beta
    assert gain.mean() > 0.5 and (gain > 0).float().mean() >= 0.75, gain
    assert result.history[-1]["val_reward_acc"] > 0.5
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    assert not reference.training


def test_dpo_cli_and_bad_jsonl(tmp_path, start):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()))
    out = tmp_path / "dpo"
    args = [
        "dpo",
        "--data",
        str(data),
        "--init",
        str(start),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--device",
        "cpu",
        "--set",
        "eval_iters=1",
        "--set",
        "progress=false",
        "--set",
        "beta=0.2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    state = ckpt.load_train_state(out)
    assert state["step"] == 2 and state["config"]["beta"] == 0.2

    data.write_text(
        '{"prompt_ids": [1, 5], "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n'
    )
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: .*rejected"):
        read_jsonl(data, ("chosen", "rejected"))
    data.write_text('{"prompt_ids": [], "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: .*prompt"):
        read_jsonl(data, ("chosen", "rejected"))
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    bad = CliRunner().invoke(
        app, ["dpo", "--data", str(data), "--init", str(start), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 1 and "pairs.jsonl:2" in bad.output


def test_sft_rows_are_stored_as_int32_arrays(tmp_path, tokenizer):  # noqa: F811
    """Reader data runs to tens of thousands of prompts: int32 arrays, not Python int lists."""
    ids = [tokenizer.bos_id, tokenizer.token_id("<question>"), *tokenizer.encode(" Who?")]
    ids.append(tokenizer.token_id("<answer>"))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": ids, "answer": " The king."}) + "\n" for _ in range(3)))
    rows = read_jsonl(path, SFT_KEYS)
    assert rows[0]["prompt_ids"].dtype == np.int32 and rows[0]["prompt_ids"].tolist() == ids
    task = SFTTask({"train": rows}, tokenizer, max_len=64)
    prompt, answer = task.data["train"][0]
    assert prompt.dtype == answer.dtype == np.int32
    x, y = task.batch("train", np.array([0, 1]), torch.device("cpu"))
    assert x[0, : len(ids)].tolist() == ids and y[0][y[0] != IGNORE].tolist() == answer.tolist()
    path.write_text(json.dumps({"prompt_ids": [2**40], "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad or missing: \\['prompt'\\]"):
        read_jsonl(path, SFT_KEYS)
