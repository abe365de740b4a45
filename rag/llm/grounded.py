"""Reading sources one prompt each and answering with a span of one of them (grounded decoding).

The warm-started reader (a prefix-LM with a copy head, rag.llm.model.CopyHead) reads every source in
a prompt of its own (rag.prompt.build_source_prompt); the rows are prefilled together, left-padded,
into one KV cache, and decoded token by token. At each step the model gives p(next token) as a
mixture of generating from the vocabulary and copying a source position.

Grounded decoding constrains that choice, so the answer is a span copied from the source:

    first step:  start at any word-initial text position p, or EOS (= "not in this source")
    later steps: continue with position p + 1, or stop ("[", the start of the citation) where a
                 word ends

The position-level pointer is the suffix structure: the state of a row is the position its span
ends at, so the allowed next tokens are exactly one continuation plus the stop. An item's
probability is the model's: copying position q, plus generating its token id (shared among the
allowed positions with that id in proportion to their copy weights). A row's span score is the
sum of its items' log-probabilities (stop included); its abstention score is log p(EOS) at the
first step. Spans are compared across sources by score, and the reader abstains when the best
span's score, against the abstention path, is below a threshold calibrated on SQuAD dev
(rag.eval: `rag eval reader --calibrate`).

Free decoding (grounded=False) samples the full mixture greedily instead, as a plain LM would.
The attention of every answer step, summed over heads and layers, is kept per source token as
the answer's evidence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rag.llm.model import GPT
from rag.prompt import SourcePrompt

MAX_SPAN_TOKENS = 30  # SQuAD answers are short; a longer span is cut at the next word end after this
DEFAULT_STARTS = 1  # span starts per source continued to a whole span (a beam over the first step)


@dataclass
class RowRead:
    """What the reader made of one source: its best span (or free text) and the scores."""

    row: int
    abstain_logprob: float  # log p(EOS) at the first step: "the answer is not in this source"
    span: tuple[int, int] | None = None  # text tokens [first, last]; None: free text or nothing
    span_logprob: float = -math.inf  # sum of the answer's step log-probabilities, stop included
    token_ids: list[int] = field(default_factory=list)  # the generated answer tokens (no stop)
    evidence: list[float] = field(default_factory=list)  # attention per text token, answer steps

    @property
    def margin(self) -> float:
        """The span's score against the abstention path (what the abstention threshold compares)."""
        return self.span_logprob - self.abstain_logprob


class SourceReader:
    """Batched prefill of per-source prompts and grounded (or free) greedy decoding."""

    def __init__(
        self, model: GPT, tokenizer, max_span_tokens: int = MAX_SPAN_TOKENS, starts: int = DEFAULT_STARTS
    ):
        """starts: how many of each source's likeliest start positions are continued to a whole
        span (the best whole span wins): a beam over the first step, the one hard choice."""
        if model.copy is None:
            raise ValueError("grounded decoding needs a model with a copy head (preset minilm-reader)")
        if starts < 1:
            raise ValueError(f"starts must be >= 1, got {starts}")
        self.model, self.tokenizer, self.max_span, self.starts = model, tokenizer, max_span_tokens, starts
        self.stop_id = tokenizer.encode("[")[0]
        self.continues = torch.tensor(tokenizer.continues)

    @torch.inference_mode()
    def read(
        self,
        prompts: list[SourcePrompt],
        grounded: bool = True,
        max_new_tokens: int = 48,
        use_cache: bool = True,
        timings: dict[str, float] | None = None,
    ) -> list[RowRead]:
        """Read every prompt and decode its answer; `timings` (if given) gets prefill_ms and decode_ms.

        use_cache=False recomputes the whole sequence at every answer step (the benchmark's
        baseline) instead of appending one token to the KV cache; the answers are the same."""
        model, tok = self.model, self.tokenizer
        device = model.tok_emb.weight.device
        B, lens = len(prompts), [len(p.ids) for p in prompts]
        T = max(lens)
        idx = torch.full((B, T), tok.pad_id, dtype=torch.long)
        copyable = torch.zeros(B, T, dtype=torch.bool)
        shift = [T - n for n in lens]
        for r, p in enumerate(prompts):
            idx[r, shift[r] :] = torch.tensor(p.ids)
            copyable[r, shift[r] + p.text_start : shift[r] + p.text_end] = True
        word_start = copyable & ~self.continues[idx]
        pad_mask = torch.arange(T)[None] >= torch.tensor(shift)[:, None]
        idx, copyable, word_start, pad_mask = (t.to(device) for t in (idx, copyable, word_start, pad_mask))

        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            prefix_len = torch.tensor(lens, device=device)
            cache = model.new_cache(B, T + max(max_new_tokens, self.max_span) + 2) if use_cache else None
            out = model(idx, cache=cache, pad_mask=pad_mask, prefix_len=prefix_len, head=False)
            forward = None if use_cache else _Forward(model, idx, pad_mask, prefix_len)
            step = _Step(model, model.copy.key(out.hidden), copyable, idx, cache, forward)
            dist = step(out.hidden[:, -1:])
            reads = [RowRead(r, float(dist.log_gen(r, tok.eos_id))) for r in range(B)]
            prefilled = time.perf_counter()
            decode = self._grounded if grounded else self._free
            decode(reads, dist, step, word_start, shift, prompts, max_new_tokens)
        finally:
            model.train(was_training)
        if timings is not None:
            timings["prefill_ms"] = round((prefilled - start) * 1000, 3)
            timings["decode_ms"] = round((time.perf_counter() - prefilled) * 1000, 3)
        return reads

    def _grounded(self, reads, dist, step, word_start, shift, prompts, max_new_tokens) -> None:
        first = dist.start_scores(word_start)  # (B, T) log p of starting at each position
        top = first.topk(min(self.starts, first.size(1)), dim=-1)
        cands = [  # (row, start position, its log p): finite only (a row may have no text)
            (r, int(p), float(v))
            for r in range(len(reads))
            for v, p in zip(top.values[r], top.indices[r], strict=True)
            if math.isfinite(float(v))
        ]
        if not cands:
            return
        rows = [r for r, _, _ in cands]
        step.select(torch.tensor(rows, device=step.ids.device))
        word_start = word_start[rows]
        current = torch.tensor([p for _, p, _ in cands], device=step.ids.device)
        spans = [[p, p] for _, p, _ in cands]  # padded positions, first and last
        scores = [v for _, _, v in cands]
        active = [True] * len(cands)
        evidence = torch.zeros(step.ids.shape, device=step.ids.device)
        while any(active):
            feed = step.ids.gather(1, current[:, None])
            mask = torch.tensor(active, device=feed.device)[:, None]
            hidden, attn = step.advance(feed, mask, want_attn=True)
            evidence += sum(a[:, :, -1, : evidence.size(1)].float().sum(1) for a in attn) * mask
            dist = step(hidden)
            for c, r in enumerate(rows):
                if not active[c]:
                    continue
                p = int(current[c])
                nxt = p + 1 if p + 1 < shift[r] + prompts[r].text_end else None
                boundary = nxt is None or bool(word_start[c, nxt])
                stop = dist.log_gen(c, self.stop_id) if boundary else -math.inf
                cont = dist.log_copy_or_gen(c, nxt) if nxt is not None else -math.inf
                if cont > stop and not (boundary and spans[c][1] - spans[c][0] + 1 >= self.max_span):
                    current[c] = nxt
                    spans[c][1] = nxt
                    scores[c] += cont
                else:
                    scores[c] += stop
                    active[c] = False
        for c, r in enumerate(rows):
            read = reads[r]
            if scores[c] <= read.span_logprob:
                continue
            a, b = spans[c]
            offset = shift[r] + prompts[r].text_start
            read.span = (a - offset, b - offset)
            read.span_logprob = scores[c]
            read.token_ids = step.ids[c, a : b + 1].tolist()
            read.evidence = evidence[c, offset : shift[r] + prompts[r].text_end].tolist()

    def _free(self, reads, dist, step, word_start, shift, prompts, max_new_tokens) -> None:
        """Greedy decoding of the full mixture (no constraint): the model writes its own citation."""
        eos = self.tokenizer.eos_id
        log_p = dist.log_probs()
        nxt = log_p.argmax(dim=-1)
        active = []
        for r, read in enumerate(reads):
            t = int(nxt[r])
            read.span_logprob = float(log_p[r, t])
            active.append(t != eos)
            if t != eos:
                read.token_ids.append(t)
        while any(active) and max(len(r.token_ids) for r in reads) < max_new_tokens:
            mask = torch.tensor(active, device=nxt.device)[:, None]
            log_p = step(step.advance(nxt[:, None], mask)[0]).log_probs()
            nxt = log_p.argmax(dim=-1)
            for r, read in enumerate(reads):
                if active[r]:
                    t = int(nxt[r])
                    read.span_logprob += float(log_p[r, t])
                    if t == eos:
                        active[r] = False
                    else:
                        read.token_ids.append(t)


class _Forward:
    """Decoding without a KV cache (the benchmark's baseline): every step runs the prompts and all
    answer tokens so far through the model again; finished rows are fed padding, as with a cache."""

    def __init__(self, model: GPT, idx: Tensor, pad_mask: Tensor, prefix_len: Tensor):
        self.model, self.idx, self.pad_mask, self.prefix_len = model, idx, pad_mask, prefix_len

    def select(self, index: Tensor) -> None:
        self.idx, self.pad_mask, self.prefix_len = (
            t.index_select(0, index) for t in (self.idx, self.pad_mask, self.prefix_len)
        )

    def __call__(self, feed: Tensor, mask: Tensor, want_attn: bool) -> tuple[Tensor, list[Tensor] | None]:
        self.idx = torch.cat([self.idx, feed], dim=1)
        self.pad_mask = torch.cat([self.pad_mask, mask], dim=1)
        out = self.model(
            self.idx, pad_mask=self.pad_mask, prefix_len=self.prefix_len, head=False, return_attn=want_attn
        )
        return out.hidden[:, -1:], out.attn


class _Step:
    """Keys and ids of the prefilled sources; called with answer-step hidden states (B, 1, d)."""

    def __init__(
        self, model: GPT, keys: Tensor, copyable: Tensor, ids: Tensor, cache, forward: _Forward | None
    ):
        self.model, self.keys, self.copyable, self.ids = model, keys, copyable, ids
        self.cache, self.forward = cache, forward

    def select(self, index: Tensor) -> None:
        """Keep rows `index` (repeats allowed): candidates continued from the same prefill."""
        self.keys, self.copyable, self.ids = (
            t.index_select(0, index) for t in (self.keys, self.copyable, self.ids)
        )
        if self.cache is not None:
            self.cache.select_rows(index)
        if self.forward is not None:
            self.forward.select(index)

    def advance(
        self, feed: Tensor, mask: Tensor, want_attn: bool = False
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Feed one token per row (mask False: a finished row, fed as padding): the new hidden state
        (B, 1, d) and, if wanted, each layer's attention of that step."""
        if self.forward is not None:
            return self.forward(feed, mask, want_attn)
        out = self.model(feed, cache=self.cache, pad_mask=mask, head=False, return_attn=want_attn)
        return out.hidden, out.attn

    def __call__(self, hidden: Tensor) -> _Dist:
        log_copy, gate = self.model.copy.pointer(hidden, self.keys, self.copyable)
        lm = self.model.logits_of(hidden).float().log_softmax(dim=-1)
        return _Dist(self, lm[:, 0], log_copy[:, 0], gate[:, 0])


@dataclass
class _Dist:
    """One step's distribution: log p_vocab (B, V), log a (B, T) over positions, gate logit (B,)."""

    step: _Step
    lm: Tensor
    log_copy: Tensor
    gate: Tensor

    def log_gen(self, r: int, token: int) -> float:
        """log of generating `token` (not copying it)."""
        return float(self.lm[r, token] + torch.nn.functional.logsigmoid(self.gate[r]))

    def log_copy_or_gen(self, r: int, p: int) -> float:
        """log p of continuing at position p, the only allowed position: copy it or generate its id."""
        g = torch.sigmoid(self.gate[r])
        prob = (1 - g) * self.log_copy[r, p].exp() + g * self.lm[r, self.step.ids[r, p]].exp()
        return float(prob.clamp(min=1e-45).log())

    def start_scores(self, allowed: Tensor) -> Tensor:
        """(B, T) log p of starting the span at each allowed position (-inf elsewhere); the
        vocabulary's mass for a token is shared among its allowed positions by copy weight."""
        ids = self.step.ids
        g = torch.sigmoid(self.gate)[:, None]
        a = self.log_copy.exp() * allowed
        total = torch.zeros_like(self.lm).scatter_add_(1, ids, a)  # (B, V): copy weight per token id
        share = a / total.gather(1, ids).clamp(min=1e-30)
        prob = (1 - g) * a + g * self.lm.exp().gather(1, ids) * share
        return prob.clamp(min=1e-45).log().masked_fill(~allowed, -math.inf)

    def log_probs(self) -> Tensor:
        """(B, V) log p of every next token under the full mixture (free decoding)."""
        return self.step.model.copy.mix(
            self.lm[:, None], self.log_copy[:, None], self.gate[:, None], self.step.ids
        )[:, 0]


EVIDENCE_SPANS = 3  # spans returned per answer
EVIDENCE_WORDS = 6  # words picked before merging neighbours into spans
EVIDENCE_FLOOR = 0.25  # ... each with at least this share of the heaviest word's attention


def evidence_spans(prompt: SourcePrompt, weights: list[float], top: int = EVIDENCE_SPANS) -> list[dict]:
    """The source spans the answer steps attended to most: attention per text token summed into
    words; the EVIDENCE_WORDS heaviest words with at least EVIDENCE_FLOOR of the top one's weight;
    neighbours (a word apart at most) merged into spans; the `top` heaviest spans. Offsets are the
    document page's (source.start + char offset), so a span can be highlighted in the source as
    shown; weight is the span's share of the attention the answer steps paid to the source text."""
    if not weights or not prompt.offsets:
        return []
    total = sum(weights) or 1.0
    words: list[list[int]] = []  # token indices per word
    text = prompt.source.text
    for i, (a, _) in enumerate(prompt.offsets):
        glued = i > 0 and prompt.offsets[i - 1][1] == a and text[a : a + 1].isalnum()
        if glued and text[a - 1 : a].isalnum():
            words[-1].append(i)
        else:
            words.append([i])
    weight = [sum(weights[i] for i in w) for w in words]
    floor = EVIDENCE_FLOOR * max(weight)
    heaviest = sorted(range(len(words)), key=lambda w: -weight[w])[:EVIDENCE_WORDS]
    picked = sorted(w for w in heaviest if weight[w] > 0 and weight[w] >= floor)
    spans: list[list[int]] = []
    for w in picked:
        if spans and w - spans[-1][-1] <= 2:
            spans[-1].append(w)
        else:
            spans.append([w])
    result = []
    for span in spans:
        first, last = words[span[0]][0], words[span[-1]][-1]
        a, b = prompt.char_span(first, last)
        share = sum(weight[w] for w in range(span[0], span[-1] + 1)) / total
        result.append(
            {
                "n": prompt.source.n,
                "start": prompt.source.start + a,
                "end": prompt.source.start + b,
                "text": text[a:b],
                "weight": round(share, 4),
            }
        )
    return sorted(result, key=lambda e: -e["weight"])[:top]
