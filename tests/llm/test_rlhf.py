"""RLHF: formulas against hand-computed values, a reward model learning a preference, PPO raising reward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rag.llm import checkpoint as ckpt
from rag.llm.cli import app
from rag.llm.model import GPT, ModelConfig
from rag.llm.rlhf import (
    PPOConfig,
    RewardConfig,
    ScalarHead,
    bradley_terry_loss,
    encode_pairs,
    fit_reward_model,
    gae,
    kl_rewards,
    load_reward_model,
    pairwise_accuracy,
    policy_loss,
    ppo,
    value_loss,
    whiten,
)
from tests.llm.test_data import WORDS, tokenizer  # noqa: F401  (fixture)

T = torch.tensor


def test_gae_by_hand():
    adv, ret = gae(T([[1.0, 0.0, 2.0]]), T([[0.5, 1.0, 0.0]]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    # t=2: 2; t=1: 0 + 0.9*0 - 1 + 0.45*2 = -0.1; t=0: 1 + 0.9*1 - 0.5 + 0.45*(-0.1) = 1.355
    assert adv.tolist()[0] == pytest.approx([1.355, -0.1, 2.0])
    assert ret.tolist()[0] == pytest.approx([1.855, 0.9, 2.0])
    # a padded step contributes nothing: neither its reward nor its value
    adv, ret = gae(T([[1.0, 2.0, 5.0]]), T([[0.5, 1.0, 3.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([2.5, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([3.0, 2.0, 0.0])


def test_clipped_policy_loss_by_hand():
    logp = torch.log(T([[1.5, 0.5, 1.0]]))
    loss, clipfrac = policy_loss(logp, torch.zeros(1, 3), T([[1.0, -1.0, 2.0]]), torch.ones(1, 3), clip=0.2)
    # ratios 1.5, 0.5, 1: -min(1.5, 1.2), -min(-0.5, -0.8), -min(2, 2) -> -1.2, 0.8, -2
    assert loss.item() == pytest.approx(-0.8)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_per_token_kl_penalty_and_score_on_last_token():
    r = kl_rewards(T([3.0]), T([[-1.0, -2.0, -0.5]]), T([[-1.5, -1.0, -0.5]]), T([[1.0, 1.0, 0.0]]), 0.1)
    assert r.tolist()[0] == pytest.approx([-0.05, 3.1, 0.0])


def test_value_loss_whiten_and_bradley_terry_by_hand():
    v = value_loss(T([1.0, 0.0]), T([0.5, 0.5]), T([2.0, 0.0]), torch.ones(2), clip=0.2)
    assert v.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)  # the clipped error is larger for both
    w = whiten(T([1.0, 2.0, 3.0, 9.0]), T([1.0, 1.0, 1.0, 0.0]))
    assert w.tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], abs=1e-4)
    loss, acc = bradley_terry_loss(T([2.0, 0.0]), T([0.0, 1.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2)
    assert acc.item() == 0.5


def tiny(vocab: int, block: int = 64) -> GPT:
    cfg = {**ModelConfig.preset("tiny").to_dict(), "block_size": block, "vocab_size": vocab}
    return GPT(ModelConfig.from_dict({**cfg, "n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1}))


def test_ppo_raises_reward_on_a_toy_task_and_tracks_kl():
    """Reward: the share of response tokens equal to 3 (a rule, ~1/16 at random init)."""
    torch.manual_seed(0)
    policy = tiny(16)
    prompts = [[1, 2, i % 16] for i in range(32)]

    def score(seq, mask, n_prompt):
        return ((seq[:, n_prompt:] == 3).float() * mask).sum(1) / mask.sum(1)

    cfg = PPOConfig(iterations=40, batch_size=16, response_len=6, lr=3e-3, kl_coef=0.01, epochs=2)
    ac, rows = ppo(policy, prompts, score, cfg)
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert first < 0.2 and last > 0.5, (first, last)
    assert rows[-1]["kl"] > rows[0]["kl"]  # moving away from the reference is measured
    assert ac.policy is policy


def pref_rows() -> list[dict]:
    """Chosen answers name the right act, rejected ones a wrong act: a rule the reward model must learn."""
    rows = []
    for who in WORDS * 2:
        prompt = f"<question> What does the {who} do?\n<answer>"
        rows.append({"prompt": prompt, "chosen": f" The {who} sings.", "rejected": f" The {who} sleeps."})
    return rows[:40]


def test_reward_model_learns_preferences_then_ppo_cli(tmp_path, tokenizer):  # noqa: F811
    torch.manual_seed(0)
    init = tmp_path / "init"
    ckpt.save_checkpoint(init, tiny(tokenizer.vocab_size), tokenizer)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pref_rows()))
    rm = tmp_path / "rm"
    args = ["reward", "--data", str(data), "--init", str(init), "--out", str(rm), "--steps", "60"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((rm / "result.json").read_text())
    assert result["val_pairs"] == round(0.2 * len(pref_rows())) and result["val_acc"] == 1.0
    assert (rm / "loss_curve.png").stat().st_size > 0
    model, _ = load_reward_model(rm)
    assert model.head.weight.abs().sum() > 0

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in pref_rows()))
    out = tmp_path / "ppo"
    args = ["ppo", "--prompts", str(prompts), "--init", str(init), "--reward", str(rm), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--iterations", "3", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert (out / "ppo_curve.png").stat().st_size > 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    ckpt.load_checkpoint(out)


def test_reward_model_on_a_prefix_lm_trunk_reads_the_whole_row():
    """A prefix-LM trunk (the warm-started reader's mask) scores a row as an encoder: the first
    token's state sees the answer at the end, and right padding does not change the score."""
    torch.manual_seed(0)
    cfg = {**ModelConfig.preset("tiny").to_dict(), "vocab_size": 50, "mask": "prefix"}
    model = ScalarHead(GPT(ModelConfig.from_dict(cfg))).eval()
    torch.nn.init.normal_(model.head.weight)
    row = torch.randint(1, 50, (1, 12))
    other_end = row.clone()
    other_end[0, -1] = (row[0, -1] + 1) % 50
    with torch.no_grad():
        first = [model(x, prefix_len=torch.tensor([12]))[0, 0] for x in (row, other_end)]
        assert not torch.isclose(first[0], first[1])  # bidirectional: position 0 sees the last token
        padded = torch.cat([row, torch.zeros(1, 5, dtype=torch.long)], 1)
        both = torch.cat([padded, torch.cat([other_end, row[:, :5]], 1)])
        scores = model.score(both, torch.tensor([12, 17]))
        assert torch.allclose(scores[0], model.score(row, torch.tensor([12]))[0], atol=1e-5)


def test_reward_head_has_its_own_learning_rate(tokenizer):  # noqa: F811
    """--head-lr: the fresh head can learn fast while a pretrained trunk barely moves (here: not at
    all, trunk rate 0), and the pairs are still learnt through the head alone."""
    torch.manual_seed(0)
    model = ScalarHead(tiny(tokenizer.vocab_size))
    trunk_before = [p.detach().clone() for p in model.trunk.parameters()]
    pairs = encode_pairs(pref_rows(), tokenizer, 64)
    cfg = RewardConfig(steps=40, batch_size=4, lr=0.0, head_lr=1e-2)
    fit_reward_model(model, pairs, pairs, tokenizer.pad_id, cfg)
    assert all(torch.equal(a, b) for a, b in zip(trunk_before, model.trunk.parameters(), strict=True))
    assert model.head.weight.abs().sum() > 0
    assert pairwise_accuracy(model, pairs, tokenizer.pad_id) > 0.5
