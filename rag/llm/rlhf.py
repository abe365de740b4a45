"""RLHF as in InstructGPT: a reward model trained on preference pairs, then PPO against it.

Reward model: our GPT without its LM head; a linear scalar head reads the final hidden state of the
last real token. Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r), loss -log of that.

PPO (Schulman et al. 2017; Ziegler et al. 2019 for language): sample responses from the policy, score
them, and give every response token the reward
    r_t = -kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))   (+ the whitened score on the last token)
so the policy stays close to the SFT reference token by token. A value head on the policy's hidden
states estimates V(s_t); GAE turns rewards and values into advantages
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}
which are whitened per batch. The policy loss is the clipped surrogate
    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A),  ratio = pi / pi_old
and the value loss the clipped squared error to the returns A_t + V_t.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from rag.llm.align import DPO_KEYS, freeze, prompt_tokens, read_jsonl, response_tokens
from rag.llm.checkpoint import load_checkpoint, save_checkpoint
from rag.llm.model import GPT
from rag.llm.tokenizer import Tokenizer
from rag.llm.train import context_length

REWARD_HEAD_FILE = "reward_head.pt"
PPO_CURVE_FILE = "ppo_curve.png"


# ---------------------------------------------------------------------------------------------
# Formulas (each checked against hand-computed values in tests/llm/test_rlhf.py)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over positions where mask is 1; responses differ in length, padding must not count."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over masked positions; keeps the scale of advantages/scores fixed across batches."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> tuple[Tensor, Tensor]:
    """-log sigmoid(r_c - r_r), averaged, and the pairwise accuracy (r_c > r_r)."""
    margin = r_chosen - r_rejected
    return -F.logsigmoid(margin).mean(), (margin.detach() > 0).float().mean()


def kl_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward: -kl_coef * (logp - ref_logp) on every response token, + score on the last one."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.sum(1).long() - 1  # responses are left-aligned in the response window
    rewards[torch.arange(len(score)), last.clamp(min=0)] += score
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns (A + V) by generalised advantage estimation; V after the last token is 0."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def policy_loss(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate -min(ratio A, clip(ratio) A), masked mean; and the fraction of clipped tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    return loss, masked_mean((clipped != unclipped).float(), mask)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2): the value may move at most `clip` from the rollout's."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) at each position, float32."""
    return F.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Models


def zero_head(d_model: int) -> nn.Linear:
    """Linear(d_model, 1) starting at 0: a fresh reward or value head says nothing until trained."""
    head = nn.Linear(d_model, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ScalarHead(nn.Module):
    """GPT trunk (no LM head) + Linear(d_model, 1): a scalar per position; reward model and value head."""

    def __init__(self, trunk: GPT):
        super().__init__()
        self.trunk = trunk
        self.head = zero_head(trunk.config.d_model)

    def forward(
        self, idx: Tensor, pad_mask: Tensor | None = None, prefix_len: Tensor | None = None
    ) -> Tensor:
        hidden = self.trunk(idx, pad_mask=pad_mask, prefix_len=prefix_len, head=False).hidden
        return self.head(hidden.float()).squeeze(-1)

    def score(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Reward of each right-padded row: the scalar at its last real token. A prefix-LM trunk
        (the warm-started reader) reads the whole row as its prefix, bidirectionally, as the
        encoder it was pretrained as."""
        pad_mask = torch.arange(idx.shape[1], device=idx.device)[None] < lengths[:, None]
        prefix_len = lengths if self.trunk.config.mask == "prefix" else None
        out = self(idx, pad_mask if not bool(pad_mask.all()) else None, prefix_len)
        return out[torch.arange(len(idx)), lengths - 1]


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
    return x, torch.tensor([len(r) for r in rows])


def save_reward_model(out_dir: Path, model: ScalarHead, tokenizer: Tokenizer) -> None:
    """The trunk as a normal checkpoint (loadable by load_checkpoint) + the scalar head beside it."""
    save_checkpoint(out_dir, model.trunk, tokenizer)
    torch.save(model.head.state_dict(), Path(out_dir) / REWARD_HEAD_FILE)


def load_reward_model(path: str | Path) -> tuple[ScalarHead, Tokenizer]:
    trunk, tokenizer = load_checkpoint(path)
    model = ScalarHead(trunk)
    model.head.load_state_dict(torch.load(Path(path) / REWARD_HEAD_FILE, weights_only=True))
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Reward model training


@dataclass
class RewardConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    # The head starts at zero and must grow from nothing, while a pretrained trunk should move
    # little: a larger rate for the head (None: `lr`) is the usual fine-tuning split.
    head_lr: float | None = None


def encode_pairs(rows: list[dict], tokenizer: Tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt + chosen, prompt + rejected) token rows, dropping pairs longer than the context."""
    pairs = []
    for r in rows:
        p = prompt_tokens(tokenizer, r)
        c, rej = (p + response_tokens(tokenizer, r[k]) for k in DPO_KEYS)
        if max(len(c), len(rej)) <= max_len:
            pairs.append((c, rej))
    if not pairs:
        raise ValueError(f"no preference pair fits the context of {max_len} tokens")
    return pairs


def pair_scores(model: ScalarHead, pairs: list, pad_id: int) -> tuple[Tensor, Tensor]:
    """Rewards of chosen and rejected rows, in one forward pass."""
    x, lengths = _pad([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    s = model.score(x, lengths)
    return s[: len(pairs)], s[len(pairs) :]


def pairwise_accuracy(model: ScalarHead, pairs: list, pad_id: int, batch: int = 32) -> float:
    """Share of held-out pairs where the chosen answer scores higher."""
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            c, r = pair_scores(model, pairs[i : i + batch], pad_id)
            right += int((c > r).sum())
    model.train()
    return right / len(pairs)


def fit_reward_model(model: ScalarHead, train: list, val: list, pad_id: int, cfg: RewardConfig) -> list[dict]:
    """Bradley-Terry training with AdamW; returns metric rows (train loss/acc, val accuracy)."""
    groups = [
        {"params": list(model.trunk.parameters()), "lr": cfg.lr},
        {"params": list(model.head.parameters()), "lr": cfg.head_lr or cfg.lr},
    ]
    opt = torch.optim.AdamW(groups)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    model.train()
    for step in tqdm(range(1, cfg.steps + 1), desc="reward model", disable=None):
        batch = [train[i] for i in rng.choice(len(train), min(cfg.batch_size, len(train)), replace=False)]
        loss, acc = bradley_terry_loss(*pair_scores(model, batch, pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = {"step": step, "loss": loss.item(), "acc": acc.item()}
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            row["val_acc"] = pairwise_accuracy(model, val, pad_id)
        rows.append(row)
    return rows


def train_reward(
    data: Path, init: Path, out_dir: Path, cfg: RewardConfig, val_data: Path | None = None
) -> dict:
    """`rag train reward`: a reward model from init's trunk on {"prompt","chosen","rejected"} JSONL."""
    torch.manual_seed(cfg.seed)
    trunk, tokenizer = load_checkpoint(init)
    model = ScalarHead(trunk)
    max_len = context_length(trunk.config)
    rows = read_jsonl(data, DPO_KEYS)
    if val_data:
        train, val = rows, read_jsonl(val_data, DPO_KEYS)
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(rows))
        n_val = max(1, round(len(rows) * cfg.val_fraction))
        train, val = [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]
    train_p, val_p = (encode_pairs(r, tokenizer, max_len) for r in (train, val))
    before = pairwise_accuracy(model, val_p, tokenizer.pad_id)
    metrics = fit_reward_model(model, train_p, val_p, tokenizer.pad_id, cfg)
    out_dir = Path(out_dir)
    save_reward_model(out_dir, model, tokenizer)
    plot_curves(metrics, ("loss", "acc", "val_acc"), out_dir / "loss_curve.png", "reward model")
    result = {
        "train_pairs": len(train_p),
        "val_pairs": len(val_p),
        "val_acc_before": before,
        "val_acc": metrics[-1]["val_acc"],
        "config": asdict(cfg),
    }
    _write_json(out_dir, metrics, result)
    return result


def _write_json(out_dir: Path, metrics: list[dict], result: dict) -> None:
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))


def plot_curves(rows: list[dict], keys: tuple[str, ...], path: Path, title: str) -> None:
    """One panel per metric against step (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), dpi=110)
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "-" if len(pts) > 20 else "o-", markersize=3)
        ax.set(xlabel="step", title=key)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# PPO


@dataclass
class PPOConfig:
    iterations: int = 50
    batch_size: int = 16  # prompts sampled per iteration
    response_len: int = 8
    epochs: int = 2  # optimisation passes over each rollout
    lr: float = 1e-4
    kl_coef: float = 0.05
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    whiten_scores: bool = True
    seed: int = 0


class ActorCritic(nn.Module):
    """The policy GPT plus a value head on its final hidden states (one forward gives both)."""

    def __init__(self, policy: GPT):
        super().__init__()
        self.policy = policy
        self.value = zero_head(policy.config.d_model)

    def forward(self, seq: Tensor, n_prompt: int) -> tuple[Tensor, Tensor]:
        """log-probs of seq's response tokens and the values of the states that chose them."""
        out = self.policy(seq)
        h = out.hidden[:, n_prompt - 1 : -1]
        logits = out.logits[:, n_prompt - 1 : -1]
        return token_logprobs(logits, seq[:, n_prompt:]), self.value(h.float()).squeeze(-1)


@torch.no_grad()
def sample_responses(
    policy: GPT, prompt: Tensor, n: int, eos_id: int | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """Sample n tokens after equal-length prompts; the mask is 1 up to and including the first EOS."""
    seq = prompt
    for _ in range(n):
        logits = policy(seq, last_only=True).logits[:, -1].float() / temperature
        nxt = torch.multinomial(F.softmax(logits, -1), 1)
        seq = torch.cat([seq, nxt], 1)
    resp = seq[:, prompt.shape[1] :]
    mask = torch.ones_like(resp, dtype=torch.float32)
    if eos_id is not None:
        after_eos = (resp == eos_id).long().cumsum(1) - (resp == eos_id).long()
        mask = (after_eos == 0).float()
    return seq, mask


def ppo(
    policy: GPT,
    prompts: list[list[int]],
    score_fn: Callable[[Tensor, Tensor, int], Tensor],
    cfg: PPOConfig,
    eos_id: int | None = None,
) -> tuple[ActorCritic, list[dict]]:
    """PPO from `policy` (the SFT model, also copied as the frozen reference).

    score_fn(seq, mask, n_prompt) -> (B,) scores of sampled sequences (a reward model or a checkable
    rule). Prompts in one batch must share a length (drawn from groups of equal length).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    reference = freeze(copy.deepcopy(policy))
    ac = ActorCritic(policy)
    opt = torch.optim.AdamW(ac.parameters(), lr=cfg.lr, weight_decay=0.0)
    room = policy.config.block_size - cfg.response_len
    prompts = [p for p in prompts if len(p) <= room]
    if not prompts:
        raise ValueError(f"no prompt leaves room for {cfg.response_len} response tokens in the context")
    by_len: dict[int, list[list[int]]] = {}
    for p in prompts:
        by_len.setdefault(len(p), []).append(p)
    groups = list(by_len.values())
    rows = []
    for it in tqdm(range(1, cfg.iterations + 1), desc="ppo", disable=None):
        group = groups[rng.integers(len(groups))]
        prompt = torch.tensor([group[i] for i in rng.integers(len(group), size=cfg.batch_size)])
        n_prompt = prompt.shape[1]
        ac.eval()
        seq, mask = sample_responses(policy, prompt, cfg.response_len, eos_id, cfg.temperature)
        with torch.no_grad():
            old_logp, old_values = ac(seq, n_prompt)
            ref_logp = token_logprobs(reference(seq).logits[:, n_prompt - 1 : -1], seq[:, n_prompt:])
            raw = score_fn(seq, mask, n_prompt).float()
            score = whiten(raw, torch.ones_like(raw)) if cfg.whiten_scores else raw
            rewards = kl_rewards(score, old_logp, ref_logp, mask, cfg.kl_coef)
            adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            adv = whiten(adv, mask)
        ac.train()
        for _ in range(cfg.epochs):
            logp, values = ac(seq, n_prompt)
            pl, clipfrac = policy_loss(logp, old_logp, adv, mask, cfg.clip)
            vl = value_loss(values, old_values, returns, mask, cfg.value_clip)
            opt.zero_grad(set_to_none=True)
            (pl + cfg.value_coef * vl).backward()
            torch.nn.utils.clip_grad_norm_(ac.parameters(), 1.0)
            opt.step()
        kl = ((old_logp - ref_logp) * mask).sum(1).mean()
        rows.append(
            {
                "step": it,
                "reward": raw.mean().item(),
                "kl": kl.item(),
                "policy_loss": pl.item(),
                "value_loss": vl.item(),
                "clipfrac": clipfrac.item(),
            }
        )
    return ac, rows


def read_prompts(path: Path, tokenizer: Tokenizer) -> list[list[int]]:
    """Prompt token rows from JSONL {"prompt"} (or {"prompt_ids"}) rows."""
    rows = read_jsonl(path, ())
    return [prompt_tokens(tokenizer, r) for r in rows]


def reward_model_scorer(reward: ScalarHead) -> Callable[[Tensor, Tensor, int], Tensor]:
    """score_fn for ppo(): the reward model's scalar at each sequence's last response token."""
    freeze(reward)

    def score(seq: Tensor, mask: Tensor, n_prompt: int) -> Tensor:
        lengths = n_prompt + mask.sum(1).long()
        return reward.score(seq, lengths)

    return score


def train_ppo(prompts: Path, init: Path, reward: Path, out_dir: Path, cfg: PPOConfig) -> dict:
    """`rag train ppo`: PPO of init (the SFT policy) against a `rag train reward` model."""
    policy, tokenizer = load_checkpoint(init)
    rm, rm_tok = load_reward_model(reward)
    if rm_tok.to_json() != tokenizer.to_json():
        raise ValueError("the reward model and the policy must share a tokenizer")
    return run_ppo(policy, tokenizer, read_prompts(prompts, tokenizer), reward_model_scorer(rm), out_dir, cfg)


def run_ppo(
    policy: GPT,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    score_fn: Callable[[Tensor, Tensor, int], Tensor],
    out_dir: Path,
    cfg: PPOConfig,
) -> dict:
    """ppo() against any scorer, then the policy checkpoint, metrics and ppo_curve.png in out_dir."""
    ac, rows = ppo(policy, prompts, score_fn, cfg, tokenizer.eos_id)
    out_dir = Path(out_dir)
    save_checkpoint(out_dir, ac.policy, tokenizer)
    plot_curves(rows, ("reward", "kl", "value_loss"), out_dir / PPO_CURVE_FILE, "PPO")
    k = max(1, len(rows) // 10)
    result = {
        "reward_first": float(np.mean([r["reward"] for r in rows[:k]])),
        "reward_last": float(np.mean([r["reward"] for r in rows[-k:]])),
        "kl_first": float(np.mean([r["kl"] for r in rows[:k]])),
        "kl_last": float(np.mean([r["kl"] for r in rows[-k:]])),
        "config": asdict(cfg),
    }
    _write_json(out_dir, rows, result)
    return result
