"""Reader evaluation on SQuAD-format data: EM / F1, citations and abstention, next to a baseline.

The reader alone, on SQuAD questions with the gold paragraph among distractors, prompts built by
the training-data builder (rag.reader_data) with a fixed seed: the model sees exactly the kind of
prompt it was trained on, and retrieval errors do not blur the reader's own numbers. The answer
metrics are the official SQuAD v1.1 ones.

A per-source reader (rag.llm.grounded) reads each example once (`read_examples`); what it
answers is decided afterwards (`decide`: which source, abstain or not), so the choice can be
calibrated: `calibrate_choice` picks the source-choice weight (Reader.choose) and the abstention
margin that maximise the SQuAD 2.0-style score (F1 on answerable rows, 1 for abstaining on
unanswerable ones) on questions the evaluation does not use.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rag.answer import Reader, is_abstention
from rag.citations import STOP_WORDS, parse_citations
from rag.llm.generate import GenerationConfig, generate
from rag.llm.grounded import RowRead
from rag.prompt import ABSTAIN, Source
from rag.reader_data import (
    DEFAULT_ABSTAIN,
    DEFAULT_BATCH_SIZE,
    DEFAULT_SOURCES,
    ExampleBuilder,
    ReaderExample,
    load_reader,
    load_squad,
)
from rag.squad import answer_text, contains_answer, exact_match, f1_score, normalize_answer


def score_reader_output(text: str, example: ReaderExample) -> dict:
    """Per-example counts for summarize_reader: EM/F1 (answerable rows), citations, abstention.

    A valid citation is precise when its source contains a gold answer; on abstention rows no source
    does, so any citation there is imprecise.
    """
    citations = parse_citations(text, example.prompt.sources)
    valid = [c for c in citations if c.source is not None]
    row = {
        "id": example.id,
        "gold": example.gold,
        "output": text,
        "abstained": is_abstention(text),
        "citations": len(citations),
        "invalid": len(citations) - len(valid),
        "precise": sum(contains_answer(c.source.text, example.answers) for c in valid),
        "gold_cited": any(c.n == example.gold for c in valid),
    }
    if example.gold is not None:
        said = answer_text(text)
        row["em"] = exact_match(said, example.answers)
        row["f1"] = f1_score(said, example.answers)
    return row


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize_reader(rows: Sequence[dict]) -> dict[str, float | None]:
    """Means over scored rows (None where a metric has nothing to count).

    em, f1: answerable rows (an abstention there scores 0). citation_precision: precise / valid
    citations, all rows. gold_citation_rate: answerable rows citing the gold source.
    invalid_citation_rate: citations pointing at no source / all citations. abstention_accuracy:
    abstention rows answered with ABSTAIN; false_abstention_rate: answerable rows answered so.
    """
    answerable = [r for r in rows if r["gold"] is not None]
    unanswerable = [r for r in rows if r["gold"] is None]
    citations = sum(r["citations"] for r in rows)
    invalid = sum(r["invalid"] for r in rows)
    return {
        "em": _ratio(sum(r["em"] for r in answerable), len(answerable)),
        "f1": _ratio(sum(r["f1"] for r in answerable), len(answerable)),
        "citation_precision": _ratio(sum(r["precise"] for r in rows), citations - invalid),
        "gold_citation_rate": _ratio(sum(r["gold_cited"] for r in answerable), len(answerable)),
        "invalid_citation_rate": _ratio(invalid, citations),
        "abstention_accuracy": _ratio(sum(r["abstained"] for r in unanswerable), len(unanswerable)),
        "false_abstention_rate": _ratio(sum(r["abstained"] for r in answerable), len(answerable)),
    }


_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")


def overlap_baseline(question: str, sources: Sequence[Source]) -> str:
    """A non-model reader: the source sentence sharing the most content words with the question,
    cited with its source number (the first such sentence on ties; ABSTAIN without sources).

    It shows what word matching alone achieves: a fair bar for citation precision, a low one for
    EM/F1 (a whole sentence is not a short answer), and it never abstains when there are sources.
    """
    asked = {w for w in normalize_answer(question).split() if w not in STOP_WORDS}
    best, best_n, best_score = "", 0, -1
    for source in sources:
        for sentence in _SENTENCE_RE.split(answer_text(source.text)):
            score = len(asked.intersection(normalize_answer(sentence).split()))
            if sentence and score > best_score:
                best, best_n, best_score = sentence, source.n, score
    return f"{best} [{best_n}]" if best else ABSTAIN


def decode_and_score(
    reader: Reader,
    examples: Sequence[ReaderExample],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    grounded: bool = True,
    show_progress: bool = False,
) -> Iterator[tuple[ReaderExample, dict, dict]]:
    """(example, model row, baseline row) per example, each output scored with score_reader_output.

    Whole-prompt readers decode greedy batches (rows stop independently at EOS). A reader that reads
    sources one prompt each answers as it would serve (its calibrated choice and margin); to
    calibrate that choice, decode once with `read_examples` and decide with `decide`."""
    if reader.source_reader is not None:
        for ex, decoded in zip(
            examples, read_examples(reader, examples, grounded, show_progress), strict=True
        ):
            yield ex, decide(reader, decoded, ex), _baseline(ex)
        return
    config = GenerationConfig(max_new_tokens=reader.max_new_tokens, grounded=grounded)
    with tqdm(total=len(examples), desc="reader eval", unit="q", disable=not show_progress) as bar:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            outputs = generate(reader.model, reader.tokenizer, [ex.prompt.ids for ex in batch], config)
            for ex, out in zip(batch, outputs, strict=True):
                model = score_reader_output(out.text.strip(), ex) | {"finish": out.finish_reason}
                yield ex, model, _baseline(ex)
            bar.update(len(batch))


@dataclass
class Decoded:
    """One example read by a per-source reader: every source's answer and scores, before choosing."""

    reads: list[RowRead]
    texts: list[str]  # each source's answer as it would be shown ("" without a span)
    ms: float  # answer time: prefill + decode of all its sources


def read_examples(
    reader: Reader, examples: Sequence[ReaderExample], grounded: bool = True, show_progress: bool = False
) -> list[Decoded]:
    config = GenerationConfig(max_new_tokens=reader.max_new_tokens, grounded=grounded)
    decoded = []
    for ex in tqdm(examples, desc="reader eval", unit="q", disable=not show_progress):
        prompts = reader.source_prompts(ex.question, ex.prompt.sources, config.max_new_tokens)
        start = time.perf_counter()
        reads = reader.source_reader.read(prompts, grounded, config.max_new_tokens) if prompts else []
        ms = (time.perf_counter() - start) * 1000
        texts = [reader.render(prompts, r, grounded)[0] if r.token_ids else "" for r in reads]
        decoded.append(Decoded(reads, texts, ms))
    return decoded


def decide(
    reader: Reader,
    decoded: Decoded,
    example: ReaderExample,
    select_weight: float | None = None,
    margin: float | None = None,
) -> dict:
    """The scored row of the answer the reader gives with these choice settings (default: its own)."""
    best = reader.choose(decoded.reads, select_weight, margin)
    chosen = best or reader.choose(decoded.reads, select_weight, -math.inf)
    text = ABSTAIN if best is None else decoded.texts[best.row]
    return score_reader_output(text, example) | {
        "finish": "stop",
        "margin": chosen.margin if chosen else -math.inf,
        "ms": decoded.ms,
    }


SELECT_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # source-choice weights tried by calibrate_choice


def calibrate_choice(
    reader: Reader, decoded: Sequence[Decoded], examples: Sequence[ReaderExample]
) -> tuple[float, float, float]:
    """(select_weight, abstain_margin, score): the source-choice weight (Reader.choose) and the
    abstention margin that maximise abstention_score on these examples."""
    best = (reader.select_weight, reader.abstain_margin, -math.inf)
    for weight in SELECT_WEIGHTS:
        rows = [decide(reader, d, ex, weight, -math.inf) for d, ex in zip(decoded, examples, strict=True)]
        margin = calibrate_margin(rows, examples)
        score = abstention_score([apply_margin(r, ex, margin) for r, ex in zip(rows, examples, strict=True)])
        if score > best[2]:
            best = (weight, margin, score)
    return best


def _baseline(ex: ReaderExample) -> dict:
    return score_reader_output(overlap_baseline(ex.prompt.question, ex.prompt.sources), ex)


def apply_margin(row: dict, example: ReaderExample, margin: float) -> dict:
    """The row as the reader would have answered with abstention threshold `margin`."""
    if row.get("margin", math.inf) >= margin:
        return row
    return score_reader_output(ABSTAIN, example) | {k: row[k] for k in ("finish", "margin", "ms") if k in row}


def _value(row: dict) -> float:
    """A row's SQuAD 2.0-style credit: F1 on answerable rows, abstaining on the others."""
    return row["f1"] if row["gold"] is not None else float(row["abstained"])


def abstention_score(rows: Sequence[dict]) -> float:
    """SQuAD 2.0-style: F1 on answerable rows (0 when abstaining), 1 for abstaining on the others."""
    return sum(map(_value, rows)) / max(len(rows), 1)


def calibrate_margin(rows: Sequence[dict], examples: Sequence[ReaderExample]) -> float:
    """The abstention threshold that maximises abstention_score over these rows (rows from
    decode_and_score of a grounded reader, which keep every margin): one sweep over the sorted
    margins, each row counted as answered above its margin and as abstaining below it."""
    answered = [_value(r) for r in rows]
    abstained = [_value(apply_margin(r, ex, math.inf)) for r, ex in zip(rows, examples, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["margin"])
    score = best_score = sum(answered)  # threshold -inf: every row answered
    best = -math.inf
    for k, i in enumerate(order):  # threshold just above row i's margin: rows up to i abstain
        score += abstained[i] - answered[i]
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is not None and rows[nxt]["margin"] == rows[i]["margin"]:
            continue  # tied margins switch together
        if score > best_score and math.isfinite(rows[i]["margin"]):
            following = rows[nxt]["margin"] if nxt is not None else rows[i]["margin"] + 1.0
            best, best_score = (rows[i]["margin"] + following) / 2, score
    return best


def latency(rows: Sequence[dict]) -> dict[str, float] | None:
    """p50 / p95 of the reader's answer time per question (prefill + decode of all its sources)."""
    ms = sorted(r["ms"] for r in rows if "ms" in r)
    if not ms:
        return None
    return {"p50_ms": ms[len(ms) // 2], "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}


def by_gold_position(rows: Sequence[dict]) -> dict[int, dict]:
    """Per gold source number: rows, EM and gold-citation rate (does the reader handle [4], [5]?)."""
    positions = sorted({r["gold"] for r in rows if r["gold"] is not None})
    result = {}
    for n in positions:
        at = [r for r in rows if r["gold"] == n]
        summary = summarize_reader(at)
        result[n] = {
            "rows": len(at),
            "em": summary["em"],
            "gold_citation_rate": summary["gold_citation_rate"],
        }
    return result


def evaluate_reader(
    model_dir: str | Path,
    squad_path: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    sources: int = DEFAULT_SOURCES,
    abstain: float = DEFAULT_ABSTAIN,
    max_new_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    predictions: str | Path | None = None,
    show_progress: bool = False,
    grounded: bool = True,
    calibrate: int | None = None,
    abstain_margin: float | None = None,
    starts: int | None = None,
    select_weight: float | None = None,
) -> dict:
    """EM, F1, citation and abstention metrics of a reader checkpoint and of overlap_baseline.

    Prompts: rag.reader_data's builder with the model's budget (load_reader: block_size -
    max_new_tokens, None = the reader's default, as for training data) and `seed`.
    `predictions`: a JSONL file to write every example's outputs and scores to (opened first, so a
    bad path fails before anything is loaded). Grounded readers: `calibrate` N first chooses the
    abstention margin on N other questions of the same file (the seeded sample after the evaluated
    ones); `abstain_margin` sets it; else the checkpoint's calibrated margin is used.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with ExitStack() as stack:
        out = None
        if predictions is not None:
            Path(predictions).parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(Path(predictions).open("w", encoding="utf-8"))
        reader, max_tokens = load_reader(model_dir, device, max_new_tokens)
        if starts is not None and reader.source_reader is not None:
            reader.source_reader.starts = starts
        if select_weight is not None:
            reader.select_weight = select_weight
        squad = load_squad(squad_path)

        def builder() -> ExampleBuilder:
            return ExampleBuilder(
                squad,
                reader.tokenizer,
                sources=sources,
                abstain=abstain,
                max_tokens=max_tokens,
                seed=seed,
                per_source=reader.source_reader is not None,
            )

        def run(examples: list[ReaderExample]) -> tuple[list[dict], list[dict]]:
            rows = list(
                decode_and_score(
                    reader, examples, batch_size=batch_size, grounded=grounded, show_progress=show_progress
                )
            )
            return [m for _, m, _ in rows], [b for _, _, b in rows]

        calibrated = None
        if calibrate and reader.source_reader is not None:
            cal_examples = list(builder()(calibrate, offset=limit or 0))
            decoded = read_examples(reader, cal_examples, grounded, show_progress)
            reader.select_weight, calibrated, _ = calibrate_choice(reader, decoded, cal_examples)
        if abstain_margin is not None or calibrated is not None:
            reader.abstain_margin = abstain_margin if abstain_margin is not None else calibrated
        main = builder()
        examples = list(main(limit))
        if not examples:
            raise ValueError(
                f"no example could be built from {squad_path}: skipped {dict(main.stats.skipped)}"
            )
        model_rows, baseline_rows = run(examples)
        if out is not None:
            for ex, m, b in zip(examples, model_rows, baseline_rows, strict=True):
                row = {"id": ex.id, "question": ex.question, "answers": ex.answers, "model": m, "baseline": b}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats = main.stats.to_dict()
    result = {
        "model": summarize_reader(model_rows),
        "baseline": summarize_reader(baseline_rows),
        "model_by_gold_position": by_gold_position(model_rows),
        "examples": len(examples),
        "answerable": stats["answerable"],
        "abstain": stats["abstain"],
        "cut_at_max_new_tokens": sum(r["finish"] == "length" for r in model_rows),
        "build": stats,
        "squad": str(squad_path),
        "model_dir": str(model_dir),
        "seed": seed,
        "device": device,
        "sources": sources,
        "max_tokens": max_tokens,
        "max_new_tokens": reader.max_new_tokens,
    }
    if reader.source_reader is not None:
        result |= {
            "grounded": grounded,
            "abstain_margin": reader.abstain_margin,
            "select_weight": reader.select_weight,
            "starts": reader.source_reader.starts,
            "calibrated_on": calibrate if calibrated is not None else None,
            "latency": latency(model_rows),
            "abstention_score": abstention_score(model_rows),
        }
    return result


def save_reader_calibration(model_dir: str | Path, result: dict) -> Path:
    """Write the calibrated abstention margin next to the checkpoint (rag.answer.CALIBRATION_FILE),
    where Reader.load finds it, with what it was chosen on."""
    from rag.answer import CALIBRATION_FILE

    path = Path(model_dir) / CALIBRATION_FILE
    record = {
        "abstain_margin": result["abstain_margin"],
        "select_weight": result["select_weight"],
        "starts": result["starts"],
        "calibrated_on_questions": result["calibrated_on"],
        "squad": Path(result["squad"]).name,
        "seed": result["seed"],
        "objective": "SQuAD 2.0-style score: F1 on answerable rows, 1 for abstaining on unanswerable ones",
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------ open mode
# The whole pipeline: every paragraph of the file is ingested (rag.eval.squad_corpus, as the
# paragraph-retrieval evaluation does), each question is answered over the real retriever's top-k,
# and `unanswerable` of the questions are asked with their gold paragraph (and every paragraph naming
# a gold answer) taken out of the results, so the right answer is to abstain.


def evaluate_reader_open(
    model_dir: str | Path,
    squad_path: str | Path,
    settings,
    *,
    limit: int | None = None,
    seed: int = 0,
    k: int = DEFAULT_SOURCES,
    mode: str = "hybrid",
    unanswerable: float = 0.0,
    device: str = "cpu",
    grounded: bool = True,
    abstain_margin: float | None = None,
    predictions: str | Path | None = None,
    show_progress: bool = False,
) -> dict:
    """EM, F1, citations, abstention and retrieval_hit@k of the reader over retrieved chunks."""
    import random
    import tempfile

    from rag.embed import get_embedder
    from rag.eval import squad_corpus
    from rag.ingest.job import ingest
    from rag.prompt import Prompt
    from rag.reader_data import select_questions
    from rag.retrieve import Retriever
    from rag.squad import mentions_answer
    from rag.store import Store

    if not 0.0 <= unanswerable <= 1.0:
        raise ValueError(f"unanswerable must be in [0, 1], got {unanswerable}")
    reader, _ = load_reader(model_dir, device)
    if abstain_margin is not None:
        reader.abstain_margin = abstain_margin
    squad = load_squad(squad_path)
    docs, _ = squad_corpus(squad)
    config = GenerationConfig(max_new_tokens=reader.max_new_tokens, grounded=grounded)
    model_rows, baseline_rows, hits_at_k, ms = [], [], [], []
    with ExitStack() as stack:
        out = None
        if predictions is not None:
            Path(predictions).parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(Path(predictions).open("w", encoding="utf-8"))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rag-open-")))
        (tmp / "docs").mkdir()
        for stem, text in docs.items():
            (tmp / "docs" / f"{stem}.txt").write_text(text, encoding="utf-8")
        settings = settings.model_copy(update={"index_dir": tmp / "index"})
        ingest([tmp / "docs"], settings)
        store = stack.enter_context(
            Store(settings.index_dir, embedding_model=settings.embedding_model, readonly=True)
        )
        retriever = Retriever(store, get_embedder(settings.embedding_model, settings.device))
        chosen = select_questions(len(squad.questions), limit, seed)
        for i in tqdm(chosen, desc="open reader eval", unit="q", disable=not show_progress):
            q = squad.questions[i]
            if not q.answers:
                continue
            gold_stem = f"a{q.article:04d}-p{q.paragraph:04d}"
            drop = random.Random(f"{seed}:{q.id}:open").random() < unanswerable
            hits = retriever.search(q.question, k + (4 * k if drop else 0), mode)
            if drop:  # as if those paragraphs were not in the index
                hits = [
                    h
                    for h in hits
                    if Path(h.path).stem != gold_stem and not mentions_answer(h.text, q.answers)
                ]
                hits = hits[:k]
            stems = [Path(h.path).stem for h in hits]
            answer = reader.answer(q.question, hits, config)
            gold = None if drop else (stems.index(gold_stem) + 1 if gold_stem in stems else 0)
            ex = ReaderExample(
                q.id, q.question, q.answers, Prompt([], answer.sources, q.question), gold, "", k
            )
            model_rows.append(score_reader_output(answer.text, ex))
            baseline_rows.append(_baseline(ex))
            ms.append({"ms": answer.timings["generate_ms"] + answer.timings.get("retrieve_ms", 0.0)})
            if not drop:
                hits_at_k.append(gold_stem in stems)
            if out is not None:
                row = {
                    "id": q.id,
                    "question": q.question,
                    "answers": q.answers,
                    "model": model_rows[-1],
                    "baseline": baseline_rows[-1],
                    "unanswerable": drop,
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {
        "model": summarize_reader(model_rows),
        "baseline": summarize_reader(baseline_rows),
        f"retrieval_hit@{k}": sum(hits_at_k) / max(len(hits_at_k), 1),
        "examples": len(model_rows),
        "unanswerable": sum(r["gold"] is None for r in model_rows),
        "paragraphs": len(docs),
        "mode": mode,
        "k": k,
        "abstain_margin": reader.abstain_margin,
        "latency": latency(ms),
        "squad": str(squad_path),
        "model_dir": str(model_dir),
        "seed": seed,
        "grounded": grounded,
    }
