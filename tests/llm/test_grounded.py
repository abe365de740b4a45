"""Grounded decoding over per-source prompts: spans of one source with its [n], exact scores,
evidence offsets; the WordPiece tokenizer; span rows; the warm start equals sentence-transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rag.answer import Reader
from rag.llm.grounded import SourceReader, evidence_spans
from rag.llm.model import GPT, PRESETS, ModelConfig
from rag.llm.tokenizer import ANSWER, load_tokenizer
from rag.llm.warmstart import load_minilm, minilm_dir
from rag.llm.wordpiece import WordPieceTokenizer
from rag.prompt import Source, build_source_prompt

SOURCES = [
    Source(
        0, "Zürich", 1, 10, 10 + 71, "Zürich is the largest city in Switzerland, on Lake Zürich's north end."
    ),
    Source(0, "Paris", 2, 0, 64, "Paris, the capital of France, had 2,102,650 residents in 2023."),
    Source(0, "Empty", 1, 0, 3, "   "),
    Source(0, "Kyiv", 3, 5, 5 + 43, "Київ є столицею України з 1991 року. Kyiv."),
]


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_pretrained_dir(minilm_dir())


def small_copy_model(seed: int = 0) -> GPT:
    """The reader's layout (prefix mask, copy head, BERT blocks) at a test's size."""
    cfg = {
        **PRESETS["minilm-reader"],
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 4,
        "d_model": 32,
        "ffn_hidden": 64,
    }
    torch.manual_seed(seed)
    return GPT(ModelConfig(**cfg)).eval()


def test_wordpiece_specials_offsets_and_round_trip(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 30528 and len(tokenizer.special_ids) == 6
    text = "Zürich's <answer> costs 2,102 CHF."
    ids = tokenizer.encode(text)
    assert tokenizer.token_id(ANSWER) not in ids  # a document cannot fake a marker
    assert tokenizer.token_id(ANSWER) in tokenizer.encode(text, allow_special=True)
    ids2, offsets = tokenizer.encode_offsets(text)
    assert ids2 == ids
    assert [text[a:b] for a, b in offsets][:3] == ["Zürich", "'", "s"]  # original characters
    tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, WordPieceTokenizer) and again.encode(text) == ids
    pieces = tokenizer.stream_decoder()
    assert "".join(pieces.push(i) for i in ids) == tokenizer.decode(ids, skip_special=True)


def test_warm_start_equals_sentence_transformers(tokenizer):
    """With every position in the prefix (a bidirectional mask) our GPT is MiniLM's encoder."""
    from sentence_transformers import SentenceTransformer

    model, _ = load_minilm()
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    text = "Architecturally, the school has a Catholic character. Zürich, Київ and 1858."
    expected = st.encode(text, output_value="token_embeddings", convert_to_tensor=True)
    ids = torch.tensor([st.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        hidden = model.eval()(ids, prefix_len=torch.tensor([ids.size(1)]), head=False).hidden[0]
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grounded_answer_is_a_span_of_one_source_with_its_number(tokenizer, seed):
    reader = Reader(small_copy_model(seed), tokenizer, abstain_margin=-math.inf)
    answer = reader.answer_sources("Which city is the largest?", SOURCES)
    assert [s.n for s in answer.sources] == [1, 2, 3]  # the blank source is not read
    body, _, cite = answer.text.rpartition(" ")
    n = int(cite.strip("[]"))
    source = answer.sources[n - 1]
    assert body and body in source.text  # the source's own characters, case and accents kept
    assert [c.n for c in answer.citations] == [n] and answer.citations[0].source == source
    assert not answer.abstained
    assert all(e["n"] == n for e in answer.evidence)


def test_grounded_scores_equal_a_full_forward_of_the_same_answer(tokenizer):
    """The cached, batched, left-padded decode scores the span exactly as a plain forward does."""
    model = small_copy_model(3)
    prompts = [
        build_source_prompt(tokenizer, "Who lives in Paris?", s.__class__(**{**s.__dict__, "n": i}), 200)
        for i, s in enumerate(SOURCES[:2], 1)
    ]
    reads = SourceReader(model, tokenizer).read(prompts)
    for prompt, read in zip(prompts, reads, strict=True):
        first, last = read.span
        span_ids = prompt.ids[prompt.text_start + first : prompt.text_start + last + 1]
        x = torch.tensor([prompt.ids + span_ids])
        with torch.no_grad():
            out = model(x, prefix_len=torch.tensor([len(prompt.ids)]), head=False)
        hidden = out.hidden
        copyable = torch.zeros_like(x, dtype=torch.bool)
        copyable[0, prompt.text_start : prompt.text_end] = True
        keys = model.copy.key(hidden)
        total = 0.0
        for j in range(len(span_ids) + 1):
            h = hidden[:, len(prompt.ids) - 1 + j][:, None]
            log_copy, gate = model.copy.pointer(h, keys, copyable)
            lm = model.logits_of(h).float().softmax(-1)[0, 0]
            g = torch.sigmoid(gate[0, 0])
            a = log_copy[0, 0].exp()
            if j == 0:  # start: copy weight of the position + its token's vocab mass, shared by copy weight
                p = prompt.text_start + first
                same = (x[0] == x[0, p]) & copyable[0] & ~torch.tensor(tokenizer.continues)[x[0]]
                prob = (1 - g) * a[p] + g * lm[x[0, p]] * a[p] / a[same].sum()
            elif j < len(span_ids):  # continue at the next position
                p = prompt.text_start + first + j
                prob = (1 - g) * a[p] + g * lm[x[0, p]]
            else:  # stop: generate "["
                prob = g * lm[tokenizer.encode("[")[0]]
            total += float(prob.detach().log())
        assert read.span_logprob == pytest.approx(total, abs=1e-4)


def test_evidence_spans_point_into_the_page(tokenizer):
    source = SOURCES[0]
    prompt = build_source_prompt(tokenizer, "largest city?", source, 200)
    weights = [0.0] * len(prompt.offsets)
    weights[3] = 5.0  # "largest" (Zürich, is, the, largest)
    spans = evidence_spans(prompt, weights)
    page = " " * source.start + source.text  # page text: the source sits at its offsets
    assert spans[0]["text"] == "largest" and page[spans[0]["start"] : spans[0]["end"]] == "largest"
    assert spans[0]["weight"] == pytest.approx(1.0)


def test_cut_source_ends_at_a_word_and_is_reported(tokenizer):
    long = Source(0, "Long", 1, 0, 0, " ".join(["internationalization"] * 500))
    long = long.__class__(**{**long.__dict__, "end": len(long.text)})
    reader = Reader(small_copy_model(), tokenizer, abstain_margin=-math.inf)
    prompts = reader.source_prompts("What?", [long], max_new_tokens=400)
    assert prompts[0].cut and len(prompts[0].ids) <= 512 - 400
    assert prompts[0].source.text.endswith("internationalization")
    assert reader.answer_sources("What?", [long], reader._generation_config(None)).cut_sources == [1]


def test_free_decoding_runs_and_abstains_without_sources(tokenizer):
    from rag.llm.generate import GenerationConfig

    reader = Reader(small_copy_model(), tokenizer, abstain_margin=-math.inf)
    answer = reader.answer_sources("Where?", SOURCES[:2], GenerationConfig(max_new_tokens=5, grounded=False))
    assert answer.text and answer.timings["new_tokens"] <= 5
    assert reader.answer_sources("Where?", []).abstained


def test_span_rows_copy_the_gold_answer_and_negatives_do_not_name_it(tokenizer, tmp_path):
    from rag.span_data import write_span_rows
    from rag.squad import mentions_answer, normalize_answer

    paragraphs = [
        "The Broncos beat the Panthers 24–10 in Santa Clara. The game was played in February.",
        "The league announced the halftime show in the autumn of that year.",
        "Tickets sold out within hours, and prices reached record levels.",
    ]
    qas = [{"id": "q1", "question": "Who won?", "answers": [{"text": "The Broncos", "answer_start": 0}]}]
    data = {
        "data": [
            {
                "title": "Super_Bowl",
                "paragraphs": [
                    {"context": p, "qas": qas if i == 0 else []} for i, p in enumerate(paragraphs)
                ],
            }
        ]
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    stats = write_span_rows(path, tokenizer, tmp_path / "rows.jsonl", negatives=2.0)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert stats.answer_rows == 1 and stats.no_answer_rows == 2
    gold = rows[0]
    first, last = gold["span"]
    span = gold["prompt_ids"][gold["text_start"] + first : gold["text_start"] + last + 1]
    assert normalize_answer(tokenizer.decode(span)) == "broncos"
    assert f"[ {gold['n']} ]" in tokenizer.decode(gold["prompt_ids"])
    for neg in rows[1:]:
        assert neg["span"] is None
        text = tokenizer.decode(neg["prompt_ids"][neg["text_start"] : neg["text_start"] + neg["text_len"]])
        assert not mentions_answer(text, ["The Broncos"])


def test_span_task_overfits_a_few_rows(tokenizer, tmp_path):
    """A small copy model learns to point at the answers of three rows (loss and start accuracy)."""
    from rag.llm.span_train import SpanRows, SpanTask, span_loss

    lines = []
    for i, s in enumerate(SOURCES[:2] + SOURCES[3:], 1):
        p = build_source_prompt(tokenizer, "What is it?", s.__class__(**{**s.__dict__, "n": i}), 200)
        lines.append(
            {
                "prompt_ids": p.ids,
                "text_start": p.text_start,
                "text_len": len(p.offsets),
                "span": [i, i + 1],
                "n": i,
                "id": str(i),
            }
        )
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    task = SpanTask(
        SpanRows(tmp_path / "rows.jsonl"),
        tokenizer,
        batch_tokens=10_000,
        span_weight=0.5,
        val_fraction=0.0,
        seed=0,
    )
    assert task.too_long == 0
    longest = max(task._length(i) for i in range(len(task.rows)))
    short = SpanTask(SpanRows(tmp_path / "rows.jsonl"), tokenizer, batch_tokens=10_000, span_weight=0.5,
                     val_fraction=0.0, seed=0, max_len=longest - 1)  # fmt: skip
    assert short.too_long >= 1  # a prompt + answer longer than the context is left out, not a crash
    model = small_copy_model().train()
    batch = task.batch("train", np.arange(task.size("train")), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, metrics = span_loss(model, batch, 0.5)
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1 * first and float(metrics["start_acc"]) == 1.0


@pytest.mark.parametrize("grounded,starts", [(True, 1), (True, 3), (False, 1)])
def test_decoding_without_the_cache_gives_the_same_answers(tokenizer, grounded, starts):
    """The benchmark's no-cache baseline recomputes every step; answers and scores must not move."""
    model = small_copy_model(5)
    prompts = [
        build_source_prompt(tokenizer, "Who lives there?", s.__class__(**{**s.__dict__, "n": i}), 200)
        for i, s in enumerate([SOURCES[0], SOURCES[1], SOURCES[3]], 1)
    ]
    reader = SourceReader(model, tokenizer, starts=starts)
    timings: dict[str, float] = {}
    cached = reader.read(prompts, grounded, max_new_tokens=6, timings=timings)
    plain = reader.read(prompts, grounded, max_new_tokens=6, use_cache=False)
    assert set(timings) == {"prefill_ms", "decode_ms"}
    for a, b in zip(cached, plain, strict=True):
        assert (a.span, a.token_ids) == (b.span, b.token_ids)
        assert a.span_logprob == pytest.approx(b.span_logprob, abs=1e-4)
        assert a.evidence == pytest.approx(b.evidence, abs=1e-4)


def test_quote_is_the_exact_page_span_of_the_answer(tokenizer):
    reader = Reader(small_copy_model(1), tokenizer, abstain_margin=-math.inf)
    answer = reader.answer_sources("Which city?", SOURCES[:2])
    quote = answer.quote
    source = answer.sources[quote["n"] - 1]
    page = " " * source.start + source.text  # the page as far as the source goes
    assert page[quote["start"] : quote["end"]] == quote["text"]
    assert answer.text == f"{quote['text']} [{quote['n']}]" and quote["page"] == source.page


def test_more_starts_never_find_a_worse_span(tokenizer):
    """A beam over the first step keeps the greedy start among its candidates."""
    model = small_copy_model(7)
    prompts = [
        build_source_prompt(tokenizer, "Which one?", s.__class__(**{**s.__dict__, "n": i}), 200)
        for i, s in enumerate([SOURCES[0], SOURCES[1], SOURCES[3]], 1)
    ]
    greedy = SourceReader(model, tokenizer).read(prompts)
    beam = SourceReader(model, tokenizer, starts=4).read(prompts)
    for g, b in zip(greedy, beam, strict=True):
        assert b.span_logprob >= g.span_logprob - 1e-5
        assert b.abstain_logprob == pytest.approx(g.abstain_logprob)
        first, last = b.span
        assert (
            b.token_ids
            == prompts[b.row].ids[prompts[b.row].text_start + first : prompts[b.row].text_start + last + 1]
        )


def test_freeze_lower_keeps_embeddings_and_lower_blocks_fixed(tokenizer):
    from rag.llm.span_train import freeze_lower
    from rag.llm.train import param_groups

    model = small_copy_model()
    freeze_lower(model, 1)
    frozen = [model.tok_emb.weight, model.positions.table.weight, *model.blocks[0].parameters()]
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.blocks[1].parameters())
    assert all(p.requires_grad for p in model.copy.parameters())
    trained = {id(p) for g in param_groups(model, 0.01) for p in g["params"]}
    assert not trained & {id(p) for p in frozen}  # the optimizer never sees them
