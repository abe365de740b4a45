"""A decoder-only transformer in one readable file (in the spirit of nanoGPT / gpt-fast).

Each architectural choice is a small class or function picked from a registry by `ModelConfig`:
positions (POSITIONS), norms (NORMS), feed-forward layers (FFNS) and attention windows
(`rag.llm.masks.WINDOWS`). Attention masks are computed from per-row token positions, so the same
code serves training, left-padded batches and cached decoding with ring buffers (`rag.llm.cache`).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rag.llm.cache import KVCache, eager
from rag.llm.local import LocalPlan, attend_local, local_plan
from rag.llm.masks import WINDOWS, attention_mask, row_positions

IGNORE_INDEX = -100


@dataclass
class ModelConfig:
    """Architecture hyper-parameters; every combination is validated in __post_init__.

    The defaults are our reader: 8 layers, d_model 512, 8 query heads sharing 4 KV heads (GQA),
    RoPE, RMSNorm, SwiGLU, context 1024, tied embeddings -- about 24M non-embedding parameters
    (28M with the 8192x512 token embedding). GQA halves the KV cache; RoPE/RMSNorm/SwiGLU are the
    choices of recent small LMs (Llama, Mistral) and train stably without biases.
    """

    vocab_size: int = 8192
    block_size: int = 1024  # context length the model is trained on (and the default cache length)
    n_layer: int = 8
    n_head: int = 8
    n_kv_head: int = 4  # == n_head: MHA; divides n_head: GQA; 1: MQA
    d_model: int = 512
    pos: str = "rope"  # sinusoidal | learned | rope | alibi
    norm: str = "rmsnorm"  # layernorm | rmsnorm  (pre-norm blocks + a final norm)
    ffn: str = "swiglu"  # relu | gelu | swiglu | moe
    ffn_hidden: int | None = None  # None: 4*d_model (relu/gelu), 8/3*d_model rounded up to 64 (swiglu)
    n_experts: int = 8  # moe only
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01  # load-balancing loss weight, added to the training loss
    moe_expert: str = "swiglu"  # swiglu | gelu: the MLP each expert is
    window: str = "full"  # full | sliding | dilated | global
    window_size: int = 256  # keys per query for sliding/dilated/global
    dilation: int = 2  # dilated: attend every `dilation`-th key within window_size*dilation
    global_positions: tuple[int, ...] = ()  # global: token positions that see and are seen by all
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre: x + f(norm(x)) and a final norm (GPT-2); post: norm(x + f(x)) (BERT)
    embed_norm: bool = False  # a norm right after token + position embeddings (BERT)
    mask: str = "causal"  # causal | prefix: bidirectional over a per-row prefix, causal after it (UniLM)
    head_transform: bool = False  # dense + GELU + norm before the tied LM head (BERT's MLM head)
    copy_head: bool = False  # pointer-generator: also copy source tokens by attention (CopyHead)

    def __post_init__(self) -> None:
        if isinstance(self.global_positions, list):  # from JSON
            self.global_positions = tuple(self.global_positions)
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _is_instance(value, hints[f.name], f.name):
                raise ValueError(f"ModelConfig.{f.name} must be {f.type}, got {value!r}")
        for name, choices in (
            ("pos", POSITIONS),
            ("norm", NORMS),
            ("ffn", FFNS),
            ("window", WINDOWS),
            ("moe_expert", EXPERTS),
            ("norm_position", NORM_POSITIONS),
            ("mask", MASKS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {sorted(choices)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                "(MHA: equal, GQA: a divisor, MQA: 1)"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got d_model/n_head={self.head_dim}")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden must be >= 1 or None, got {self.ffn_hidden}")
        if self.ffn == "moe" and not (self.n_experts >= 2 and 1 <= self.moe_top_k <= self.n_experts):
            raise ValueError(
                f"moe needs n_experts >= 2 and 1 <= moe_top_k <= n_experts, "
                f"got n_experts={self.n_experts}, moe_top_k={self.moe_top_k}"
            )
        if self.moe_aux_weight < 0:
            raise ValueError(f"moe_aux_weight must be >= 0, got {self.moe_aux_weight}")
        if self.window_size < 1 or self.dilation < 1:
            raise ValueError(
                f"window_size and dilation must be >= 1, got {self.window_size}, {self.dilation}"
            )
        if self.window == "global" and not self.global_positions:
            raise ValueError("window='global' needs global_positions (e.g. (0,) for the first token)")
        if self.window != "global" and self.global_positions:
            raise ValueError(f"global_positions are only used with window='global', not {self.window!r}")
        gp = self.global_positions
        if not all(isinstance(p, int) and p >= 0 for p in gp) or len(set(gp)) != len(gp):
            raise ValueError(f"global_positions must be distinct and >= 0, got {self.global_positions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def hidden_dim(self, kind: str) -> int:
        """FFN width for an MLP of `kind`; SwiGLU's 8/3 gives its 3 matrices a 4x MLP's parameters."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if kind == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["global_positions"] = list(self.global_positions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """'default' is the reader (see the class docstring); 'tiny' trains in seconds on a CPU."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


def _is_instance(value: Any, hint: Any, name: str) -> bool:
    """isinstance for the annotations config fields use (unions, tuple[X, ...], plain classes).

    JSON and CLI values arrive untyped, so a wrong type must be a clear error here rather than a
    crash deep in a layer. bool is not accepted as a number (True is an int in Python); an int is
    accepted as a float. An annotation this does not know is a clear error naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a, name) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return isinstance(value, tuple) and all(_is_instance(v, args[0], name) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is None and isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(
        f"ModelConfig.{name}: validation does not know the annotation {hint!r}; extend _is_instance"
    )


NORM_POSITIONS = ("pre", "post")
MASKS = ("causal", "prefix")

# The BERT layout of all-MiniLM-L6-v2 (rag.llm.warmstart loads its weights into it); vocab_size is
# its 30,522 WordPiece tokens plus our special tokens.
MINILM: dict[str, Any] = {
    "vocab_size": 30528,
    "block_size": 512,
    "n_layer": 6,
    "n_head": 12,
    "n_kv_head": 12,
    "d_model": 384,
    "ffn_hidden": 1536,
    "pos": "learned",
    "norm": "layernorm",
    "ffn": "gelu",
    "bias": True,
    "norm_eps": 1e-12,
    "norm_position": "post",
    "embed_norm": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {"block_size": 256, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64},
    # the CPU reader: MiniLM's encoder as a prefix-LM decoder with a copy head (rag.llm.warmstart)
    "minilm-reader": {**MINILM, "mask": "prefix", "head_transform": True, "copy_head": True},
}


@dataclass
class ModelOutput:
    """What GPT.forward returns; with a ring-buffer cache, attn's keys are in the cache's slot order."""

    logits: Tensor | None  # (B, T, vocab), or (B, 1, vocab) with last_only; None with head=False
    loss: Tensor | None  # ce_loss + moe_aux_weight * aux_loss; None without targets
    ce_loss: Tensor | None
    aux_loss: Tensor  # mean MoE load-balancing loss over MoE layers; 0 for dense models
    attn: list[Tensor] | None  # per layer (B, n_head, Tq, Tk) weights when return_attn
    hidden: Tensor | None = None  # (B, T, d_model) final hidden states (the LM head's input)


# ---------------------------------------------------------------------------------------------
# Positions: added to the input (learned, sinusoidal), rotating q/k (rope) or biasing scores (alibi)


class Positions(nn.Module):
    """No-op base: each scheme overrides the one hook it uses. Padding (position -1) maps to 0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def embed(self, pos: Tensor) -> Tensor | None:
        return None

    def rotary(self, pos: Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        return None


def _angles(pos: Tensor, dim: int, theta: float) -> Tensor:
    """(..., dim/2) angles pos * theta^(-2i/dim), computed on the fly so no length limit applies."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    return pos.clamp(min=0).float()[..., None] * inv_freq


class Learned(Positions):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.table = nn.Embedding(cfg.block_size, cfg.d_model)

    def embed(self, pos: Tensor) -> Tensor:
        # a read-back: on the CPU only (elsewhere the embedding's device-side index check catches it)
        if eager() and pos.device.type == "cpu" and int(pos.max()) >= self.cfg.block_size:
            raise ValueError(
                f"position {int(pos.max())} is beyond block_size={self.cfg.block_size}, "
                "the size of the learned position table"
            )
        return self.table(pos.clamp(min=0))


class Sinusoidal(Positions):
    # sin/cos have std 1/sqrt(2) per dimension while token embeddings start at std 0.02; unscaled,
    # position would outweigh the token ~35:1 (Vaswani et al. scale embeddings by sqrt(d) instead).
    # Matching the table to the embedding's init scale keeps both signals comparable.
    scale = 0.02 * math.sqrt(2)

    def embed(self, pos: Tensor) -> Tensor:
        ang = _angles(pos, self.cfg.d_model, 10000.0)
        return self.scale * torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)


class Rope(Positions):
    def rotary(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        ang = _angles(pos, self.cfg.head_dim, self.cfg.rope_theta)[:, None]  # (B, 1, T, hd/2)
        return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by position-dependent angles (GPT-NeoX / Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def alibi_slopes(n_head: int) -> list[float]:
    """Per-head slopes from the ALiBi paper (geometric; interleaved when n_head is not a power of 2)."""

    def pow2(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    if math.log2(n_head).is_integer():
        return pow2(n_head)
    m = 2 ** math.floor(math.log2(n_head))
    return pow2(m) + pow2(2 * m)[0::2][: n_head - m]


class Alibi(Positions):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # Built once and moved once per device: a host->device copy per forward waits on the device.
        # Not a buffer, so model.to(bfloat16) cannot round the slopes.
        self.slopes = torch.tensor(alibi_slopes(cfg.n_head))

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        if self.slopes.device != q_pos.device:
            self.slopes = self.slopes.to(q_pos.device)
        slopes = self.slopes
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # (B, Tq, Tk)
        return -slopes[None, :, None, None] * dist[:, None]


POSITIONS: dict[str, type[Positions]] = {
    "sinusoidal": Sinusoidal,
    "learned": Learned,
    "rope": Rope,
    "alibi": Alibi,
}

NORMS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "layernorm": lambda c: nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.bias),
    "rmsnorm": lambda c: nn.RMSNorm(c.d_model, eps=c.norm_eps),
}


# ---------------------------------------------------------------------------------------------
# Attention


@dataclass
class AttnContext:
    """What every layer's attention shares in one forward pass (computed once, not per layer)."""

    mask: Tensor | None  # bool (B|1, 1, Tq, Tk) or additive float (B|1, H, Tq, Tk); None = plain causal
    rope: tuple[Tensor, Tensor] | None
    cache: KVCache | None
    return_attn: bool
    local: LocalPlan | None = None  # block-local windowed attention (rag.llm.local) instead of `mask`


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, need_weights: bool):
    """SDPA (fused kernels) unless the weights are wanted, then the same math written out."""
    if mask is None and not need_weights:  # plain causal: the flash kernel reads shared KV heads itself
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True
        ), None
    # Masked kernels do not take enable_gqa. Rather than copy each KV head to its query heads, fold
    # a KV head's query heads into its query rows: (B, H, T, d) -> (B, H_kv, G*T, d). Query head h
    # uses KV head h // G, as repeat_interleave would, and K/V are read once per KV head -- which
    # is what makes GQA/MQA cheaper to decode.
    B, H, T, D = q.shape
    n_kv = k.size(1)
    G = H // n_kv
    if mask is None:
        mask = torch.ones(T, k.size(-2), dtype=torch.bool, device=q.device).tril()[None, None]
    if mask.dtype == torch.bool:  # (B|1, 1, T, Tk): the same for every head
        mask = mask.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(2, 3)
    else:  # additive per-head bias (B|1, H, T, Tk)
        mask = mask.to(q.dtype).unflatten(1, (n_kv, G)).flatten(2, 3)
    q = q.reshape(B, n_kv, G * T, D)
    if not need_weights:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        # reshape, not view: fused CUDA kernels return (B, G*T, H_kv, D) memory transposed
        return y.reshape(B, H, T, D), None
    scores = (q @ k.transpose(-2, -1)).float() * D**-0.5
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1).to(q.dtype)
    y = F.dropout(weights, dropout) @ v
    return y.view(B, H, T, D), weights.view(B, H, T, -1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = (
            layer,
            cfg.n_head,
            cfg.n_kv_head,
            cfg.head_dim,
        )
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor | None]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if ctx.local is not None:
            y, weights = attend_local(q, k, v, ctx.local, dropout), None
        else:
            y, weights = attend(q, k, v, ctx.mask, dropout, ctx.return_attn)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1)), weights


# ---------------------------------------------------------------------------------------------
# Feed-forward layers. Every one returns (output, aux_loss or None) so blocks treat MoE like any FFN.


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, act: Callable[[Tensor], Tensor]):
        super().__init__()
        hidden = cfg.hidden_dim("mlp")
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.act = act

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.proj(self.act(self.fc(x))), None


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_dim("swiglu")
        self.gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.proj(F.silu(self.gate(x)) * self.up(x)), None


class MoE(nn.Module):
    """Top-k routed experts without capacity limits (no token is dropped), plus the Switch/GShard
    load-balancing loss n_experts * sum_i f_i * P_i (f_i: share of routed slots, P_i: mean router
    probability), which is minimal (1) when experts are used uniformly."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(EXPERTS[cfg.moe_expert](cfg) for _ in range(cfg.n_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, k) gate weights and expert ids, and (N, E) router probabilities, for tokens x (N, d).

        With k > 1 the gates are renormalised over the chosen experts (Mixtral); with k = 1 the raw
        probability is kept (Switch), otherwise the router would get no gradient from the main loss.
        """
        probs = self.router(x).float().softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates, experts, probs

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(-1, x.size(-1))
        gates, chosen, probs = self.route(flat)
        n_experts = len(self.experts)
        few = flat.size(0) * self.top_k <= n_experts  # a decode step
        dense = few and (flat.device.type != "cpu" or not eager())
        out = (self.dense if dense else self.sparse)(flat, gates, chosen)
        share = F.one_hot(chosen, n_experts).float().mean(dim=(0, 1))  # f_i (sums to 1)
        aux = n_experts * (share * probs.mean(dim=0)).sum()
        return out.view_as(x), aux

    def sparse(self, flat: Tensor, gates: Tensor, chosen: Tensor) -> Tensor:
        """Each expert on its own tokens: k/E of the dense work, but `nonzero` is a host sync per expert."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # may be empty: no branch, one graph
            y, _ = expert(flat[token])
            out.index_add_(0, token, (y * gates[token, slot, None]).to(out.dtype))
        return out

    def dense(self, flat: Tensor, gates: Tensor, chosen: Tensor) -> Tensor:
        """Every expert on every token, weighted by its gate (0 where not chosen): shapes never depend
        on the routing, so no host sync and one compiled graph. Used for decode steps off the CPU,
        where a step reads (nearly) every expert's weights anyway and syncs would cost more."""
        weight = torch.zeros(flat.size(0), len(self.experts), device=flat.device, dtype=gates.dtype)
        weight = weight.scatter(1, chosen, gates)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + (expert(flat)[0] * weight[:, e, None]).to(out.dtype)
        return out


EXPERTS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "swiglu": SwiGLU,
    "gelu": partial(MLP, act=F.gelu),
}
FFNS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "relu": partial(MLP, act=F.relu),
    "gelu": partial(MLP, act=F.gelu),
    "swiglu": SwiGLU,
    "moe": MoE,
}


class Block(nn.Module):
    """Residual block. Pre-norm (GPT-2, Llama): x + attn(norm(x)), then x + ffn(norm(x)).
    Post-norm (the original Transformer, BERT): norm(x + attn(x)), then norm(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.norm2 = NORMS[cfg.norm](cfg), NORMS[cfg.norm](cfg)
        self.attn = Attention(cfg, layer)
        self.ffn = FFNS[cfg.ffn](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.post = cfg.norm_position == "post"

    def forward(self, x: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self.post:
            h, weights = self.attn(x, ctx)
            x = self.norm1(x + self.drop(h))
            h, aux = self.ffn(x)
            return self.norm2(x + self.drop(h)), weights, aux
        h, weights = self.attn(self.norm1(x), ctx)
        x = x + self.drop(h)
        h, aux = self.ffn(self.norm2(x))
        return x + self.drop(h), weights, aux


class HeadTransform(nn.Module):
    """BERT's MLM head before the tied decoder: dense, GELU, norm. The encoder's last layer is not
    trained to be read out as token embeddings; this small map is what BERT uses to do it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = NORMS[cfg.norm](cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(x)))


class CopyHead(nn.Module):
    """Pointer-generator (See et al., 2017): the next token is generated from the vocabulary with
    probability g, or copied from a source position with probability 1 - g:

        p(y) = g * softmax(lm_logits)[y] + (1 - g) * sum_{p: id_p = y} a_p,   a = softmax(q . k_p / sqrt(d))

    q is the answer step's hidden state, k_p the final hidden state of source position p (computed
    once at prefill and kept with the KV cache). Copying is what a small model does best when the
    answer is a span of its input, and `a` is a position-level pointer that grounded decoding uses
    to keep the answer a contiguous span of one source.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.query = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.key = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, 1)

    def pointer(self, h: Tensor, keys: Tensor, copyable: Tensor) -> tuple[Tensor, Tensor]:
        """Copy log-weights log a (B, Tq, Tk) over `keys` (B, Tk, d; from self.key) where copyable
        (B, Tk) is True, and the generate gate's logit (B, Tq): g = sigmoid(logit)."""
        scores = (self.query(h) @ keys.transpose(-2, -1)).float() * h.size(-1) ** -0.5
        scores = scores.masked_fill(~copyable[:, None, :], float("-inf"))
        return scores.log_softmax(dim=-1), self.gate(h).float().squeeze(-1)

    def reset_parameters(self) -> None:
        """Start as plain dot-product attention between hidden states (identity maps): a bilinear
        pointer with two small random maps starts with no signal in either and learns slowly."""
        for lin in (self.query, self.key):
            nn.init.eye_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @staticmethod
    def mix(lm_logits: Tensor, log_copy: Tensor, gate_logit: Tensor, key_ids: Tensor) -> Tensor:
        """log p(y) over the vocabulary (B, Tq, V): the gate's mixture of generating and copying."""
        log_gen = lm_logits.float().log_softmax(dim=-1) + F.logsigmoid(gate_logit)[..., None]
        index = key_ids[:, None, :].expand(-1, log_copy.size(1), -1)
        copy = torch.zeros_like(log_gen).scatter_add_(-1, index, log_copy.exp())
        return torch.logaddexp(log_gen, (copy + 1e-30).log() + F.logsigmoid(-gate_logit)[..., None])

    @staticmethod
    def log_prob(
        lm_logits: Tensor, log_copy: Tensor, gate_logit: Tensor, key_ids: Tensor, y: Tensor
    ) -> Tensor:
        """log p(y) (B, Tq) of given tokens y (B, Tq): the mixture at y only (training needs no more)."""
        log_gen = lm_logits.float().log_softmax(dim=-1).gather(-1, y[..., None]).squeeze(-1)
        copied = (log_copy.exp() * (key_ids[:, None, :] == y[..., None])).sum(-1)
        return torch.logaddexp(
            log_gen + F.logsigmoid(gate_logit), (copied + 1e-30).log() + F.logsigmoid(-gate_logit)
        )


class GPT(nn.Module):
    """Token embedding (+ input positions), n_layer pre-norm blocks, final norm, LM head (tied by default)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = POSITIONS[config.pos](config)
        self.embed_norm = NORMS[config.norm](config) if config.embed_norm else nn.Identity()
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # post-norm blocks end normalised; pre-norm ones need a final norm
        self.norm = NORMS[config.norm](config) if config.norm_position == "pre" else nn.Identity()
        self.head_transform = HeadTransform(config) if config.head_transform else nn.Identity()
        self.copy = CopyHead(config) if config.copy_head else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer)
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if self.copy is not None:
            self.copy.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self, batch_size: int, max_len: int | None = None, **options: bool) -> KVCache:
        """A KV cache on this model's device and dtype; options: static, ring (see KVCache)."""
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype, **options)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        return_attn: bool = False,
        last_only: bool = False,
        prefix_len: Tensor | None = None,
        head: bool = True,
    ) -> ModelOutput:
        """Logits for token ids `idx` (B, T); loss when `targets` (B, T) is given (-100 = ignored).

        pad_mask (B, T) bool, True = real token: positions are counted per row, padding is never
        attended. With a `cache`, the new tokens attend to the cached ones and are appended to it.
        last_only computes logits for the last position only (generation). prefix_len (B,): with
        mask="prefix", positions below it see each other both ways (a cache keeps it for later
        steps). head=False skips the LM head (logits None): callers that need logits at a few
        positions only apply `logits_of` to those `hidden` states.
        """
        valid = self._check_inputs(idx, targets, pad_mask, last_only)
        if cache is not None:
            q_pos, k_pos = cache.begin(valid)
            prefix_len = cache.prefix(prefix_len)
        elif pad_mask is None:  # the same positions for every row: masks broadcast over the batch
            q_pos = k_pos = torch.arange(idx.size(1), device=idx.device)[None]
        else:
            q_pos = k_pos = row_positions(valid)
        if (prefix_len is not None) != (self.config.mask == "prefix") and cache is None:
            raise ValueError(
                f"prefix_len is required with mask='prefix' and only then (mask={self.config.mask!r})"
            )
        plain = cache is None and pad_mask is None and not return_attn and prefix_len is None
        local = None
        if cache is None and not return_attn and prefix_len is None:  # O(T * w) for windows
            local = local_plan(q_pos, self.config, lambda q, k: self._mask(q, k, False, None))
        mask = None if local is not None else self._mask(q_pos, k_pos, plain, prefix_len)
        ctx = AttnContext(mask, self.positions.rotary(q_pos), cache, return_attn, local)

        x = self.tok_emb(idx)
        pe = self.positions.embed(q_pos)
        if pe is not None:
            x = x + pe.to(x.dtype)
        x = self.drop(self.embed_norm(x))
        attn, aux = [], []
        for block in self.blocks:
            x, weights, block_aux = block(x, ctx)
            attn.append(weights)
            if block_aux is not None:
                aux.append(block_aux)
        x = self.norm(x)
        logits = self.logits_of(x[:, -1:] if last_only else x) if head else None

        aux_loss = torch.stack(aux).mean() if aux else x.new_zeros((), dtype=torch.float32)
        ce_loss = loss = None
        if targets is not None:
            if logits is None:
                raise ValueError("targets need the LM head: head=False computes no logits")
            flat = targets.reshape(-1)
            total = F.cross_entropy(
                logits.float().flatten(0, 1), flat, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            ce_loss = total / (flat != IGNORE_INDEX).sum().clamp(min=1)  # all-ignored gives 0, not NaN
            loss = ce_loss + self.config.moe_aux_weight * aux_loss if aux else ce_loss
        return ModelOutput(logits, loss, ce_loss, aux_loss, attn if return_attn else None, x)

    def logits_of(self, hidden: Tensor) -> Tensor:
        """LM head logits for final hidden states (any leading shape)."""
        return self.lm_head(self.head_transform(hidden))

    def _mask(self, q_pos: Tensor, k_pos: Tensor, plain: bool, prefix_len: Tensor | None) -> Tensor | None:
        bias = self.positions.bias(q_pos, k_pos)
        if plain and bias is None and self.config.window == "full":
            return None  # lets SDPA use its causal flash kernel
        allowed = attention_mask(q_pos, k_pos, self.config, prefix_len)
        # A padding query has no key; letting it see all keeps softmax finite (its output is unused).
        allowed = (allowed | ~allowed.any(dim=-1, keepdim=True))[:, None]
        return allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))

    def _check_inputs(self, idx: Tensor, targets: Tensor | None, pad_mask: Tensor | None, last_only: bool):
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64) or idx.size(1) == 0:
            raise ValueError(
                f"idx must be a non-empty (B, T) integer tensor, got {tuple(idx.shape)} {idx.dtype}"
            )
        V = self.config.vocab_size
        # Value checks read the tensor back: on a GPU that is a sync per forward (eval, DPO reference,
        # every decode step), so there out-of-range ids are left to the device-side index check.
        values = eager() and idx.device.type == "cpu"
        lo, hi = torch.stack([idx.min(), idx.max()]).tolist() if values else (0, 0)
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must be in [0, {V}), got [{lo}, {hi}]")
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
            if values and bool(((targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))).any()):
                raise ValueError(f"targets must be in [0, {V}) or {IGNORE_INDEX} (ignored)")
            if last_only:
                raise ValueError("last_only computes one position's logits; it cannot be used with targets")
        if pad_mask is None:
            return torch.ones_like(idx, dtype=torch.bool)
        if pad_mask.shape != idx.shape:
            raise ValueError(f"pad_mask shape {tuple(pad_mask.shape)} != idx shape {tuple(idx.shape)}")
        return pad_mask.bool()

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters; non_embedding leaves out the token and learned position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.positions, Learned):
                n -= self.positions.table.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in nanoGPT/PaLM: 6N + 12 * L * d * T.

        N counts the weights a token is multiplied by: non-embedding parameters with only the
        top-k experts of each MoE layer, plus the (tied) output projection.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += cfg.vocab_size * cfg.d_model
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                per_expert = sum(p.numel() for p in block.ffn.experts[0].parameters())
                n -= (cfg.n_experts - cfg.moe_top_k) * per_expert
        return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * seq_len
