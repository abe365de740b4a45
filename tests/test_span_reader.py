"""The warm-started reader's recipe end to end, at test size: `rag train span-data` -> `rag train
reader` (the real Trainer on span rows) -> `rag train export` (fp16) -> `rag eval reader` with a
calibrated abstention margin, in reader mode and in open mode over a real index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rag.answer import CALIBRATION_FILE, Reader
from rag.cli import app
from rag.llm.checkpoint import save_checkpoint
from rag.llm.wordpiece import WordPieceTokenizer
from tests.llm.test_data import one_thread  # noqa: F401  (autouse: small models train faster)
from tests.llm.test_grounded import small_copy_model
from tests.test_reader_data import squad_json, write

QUESTIONS = 12


def cli(*args) -> object:
    return CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir, squad file, run dir): a small copy-head model trained on the span rows of
    QUESTIONS questions until it knows them (the eval asks the same questions)."""
    from rag.llm.warmstart import minilm_dir

    root = tmp_path_factory.mktemp("span-reader")
    squad = write(root / "squad.json", squad_json(n_articles=2, n_paragraphs=3, words=4))
    rows = root / "rows.jsonl"
    result = cli("train", "span-data", "--squad", squad, "--out", rows, "--negatives", "1")
    assert result.exit_code == 0, result.output
    assert "answer rows" in result.output and "no-answer rows" in result.output
    init = root / "init"
    save_checkpoint(init, small_copy_model(), WordPieceTokenizer.from_pretrained_dir(minilm_dir()))
    run = root / "run"
    sets = ["lr=0.003", "min_lr=0.0003", "warmup_steps=5", "eval_interval=150", "eval_iters=1",
            "val_fraction=0.0", 'dtype="float32"', "batch_tokens=100000", "progress=false",
            "grad_accum=1"]  # fmt: skip
    result = cli("train", "reader", "--data", rows, "--init", init, "--out", run, "--max-steps", 150,
                 "--device", "cpu", *[x for s in sets for x in ("--set", s)])  # fmt: skip
    assert result.exit_code == 0, result.output
    model = root / "model"
    result = cli("train", "export", "--run", run, "--out", model)
    assert result.exit_code == 0, result.output
    assert not (model / "train_state.pt").exists()
    return model, squad, run


def test_training_learns_the_spans_and_resumes(trained) -> None:
    _, _, run = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.2 * train[0]["loss"] and train[-1]["start_acc"] == 1.0
    assert (run / "loss_curve.png").stat().st_size > 0 and (run / "train_state.pt").is_file()


def test_exported_model_is_fp16_and_answers_like_the_run(trained) -> None:
    from safetensors import safe_open

    from rag.prompt import Source

    model, squad, run = trained
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__) == {"F16"}
    paragraph = json.loads(squad.read_text())["data"][0]["paragraphs"][0]
    question, text = paragraph["qas"][0]["question"], paragraph["context"]  # a trained question
    sources = [Source(0, "Castle", 1, 0, len(text), text)]
    a = Reader.load(model, abstain_margin=-math.inf).answer_sources(question, sources)
    b = Reader.load(run, abstain_margin=-math.inf).answer_sources(question, sources)
    assert a.text == b.text == "Tower000 [1]"
    assert a.quote["text"] == "Tower000" and text[a.quote["start"] : a.quote["end"]] == "Tower000"


def test_eval_reader_calibrates_and_scores_the_trained_questions(trained, tmp_path) -> None:
    model, squad, _ = trained
    preds = tmp_path / "preds.jsonl"
    result = cli("eval", "reader", "--model", model, "--squad", squad, "--limit", QUESTIONS,
                 "--calibrate", 6, "--save-calibration", "--predictions", preds, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["grounded"] and report["calibrated_on"] == 6
    assert report["model"]["f1"] >= 0.9 and report["model"]["citation_precision"] >= 0.9
    assert report["model"]["gold_citation_rate"] >= 0.9
    assert set(report["latency"]) == {"p50_ms", "p95_ms"}
    saved = json.loads((model / CALIBRATION_FILE).read_text())
    assert saved["abstain_margin"] == report["abstain_margin"]
    assert Reader.load(model).abstain_margin == saved["abstain_margin"]  # the API and `rag ask` use it
    assert len(preds.read_text().splitlines()) == report["examples"]
    # --free decodes the mixture without the span constraint; the text is the model's own
    free = cli("eval", "reader", "--model", model, "--squad", squad, "--limit", 4, "--free", "--json")
    assert free.exit_code == 0, free.output
    assert json.loads(free.stdout)["grounded"] is False


def test_eval_reader_open_mode_over_a_real_index(trained) -> None:
    model, squad, _ = trained
    result = cli("eval", "reader", "--model", model, "--squad", squad, "--limit", QUESTIONS, "--open",
                 "--unanswerable", 0.25, "-k", 3, "--margin", -1e9, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["examples"] == QUESTIONS and 0 < report["unanswerable"] < QUESTIONS
    assert 0.0 <= report["retrieval_hit@3"] <= 1.0 and report["k"] == 3
    assert {"em", "f1", "citation_precision"} <= report["model"].keys() <= report["baseline"].keys() | {"em"}
    # with every answer given (margin -1e9), an unanswerable question is never abstained on
    assert report["model"]["abstention_accuracy"] == 0.0
