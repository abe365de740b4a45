"""Retrieval metrics against hand-computed cases and against pytrec_eval (via ir-measures)."""

from __future__ import annotations

import json
import math
import random

import ir_measures
import pytest
from ir_measures import RR, R, nDCG
from typer.testing import CliRunner

from rag.cli import app
from rag.eval import (
    evaluate,
    fusion_shares,
    hit_metrics,
    load_beir,
    mrr_at_k,
    ndcg_at_k,
    pick_split,
    ranked,
    read_qrels,
    recall_at_k,
    run_squad,
)


def test_hand_computed_single_query():
    rels = {"a": 1, "b": 2}
    ranking = ["c", "a", "b"]
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranking, rels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranking, rels, 1) == 0.0
    assert mrr_at_k(ranking, rels, 10) == 0.5
    assert mrr_at_k(ranking, rels, 1) == 0.0
    assert recall_at_k(ranking, rels, 2) == 0.5
    assert recall_at_k(ranking, rels, 100) == 1.0
    assert ndcg_at_k(["b", "a"], rels) == pytest.approx(1.0)


def test_zero_relevance_judgements_do_not_count():
    rels = {"a": 0, "b": 1}
    assert recall_at_k(["a"], rels, 10) == 0.0
    assert mrr_at_k(["a", "b"], rels, 10) == 0.5
    assert ndcg_at_k(["a"], {"a": 0}) == 0.0


def test_ties_broken_by_doc_id_descending_like_trec_eval():
    assert ranked({"a": 1.0, "c": 1.0, "b": 2.0}) == ["b", "c", "a"]


def test_missing_query_scores_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    scores = evaluate({"q1": {"a": 1.0}}, qrels)
    assert scores == {"ndcg@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5}
    with pytest.raises(ValueError):
        evaluate({}, {})


def _random_case(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(40):
        qid = f"q{q}"
        judged = rng.sample(docs, rng.randint(1, 15))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        qrels[qid][judged[0]] = max(qrels[qid][judged[0]], 1)  # at least one relevant doc
        retrieved = rng.sample(docs, rng.randint(5, 150))
        # Distinct scores, and the judged docs sprinkled in so the metrics are not all zero.
        retrieved += [d for d in judged if rng.random() < 0.6 and d not in retrieved]
        run[qid] = {d: rng.random() for d in retrieved}
    return run, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytrec_eval_on_random_runs(seed):
    run, qrels = _random_case(seed)
    ours = evaluate(run, qrels)
    reference = ir_measures.pytrec_eval.evaluator([nDCG @ 10, R @ 100], qrels).calc_aggregate(run)
    # pytrec_eval's recip_rank has no cutoff; RR@10 comes from the official MS MARCO MRR@10 script.
    reference |= ir_measures.msmarco.calc_aggregate([RR @ 10], qrels, run)
    assert ours["ndcg@10"] == pytest.approx(reference[nDCG @ 10], abs=1e-9)
    assert ours["recall@100"] == pytest.approx(reference[R @ 100], abs=1e-9)
    assert ours["mrr@10"] == pytest.approx(reference[RR @ 10], abs=1e-9)
    assert 0.0 < ours["ndcg@10"] < 1.0


def _write_beir(root, qrels_text: str):
    (root / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Cats", "text": "Cats purr."},
        {"_id": "d2", "title": "", "text": "Dogs bark."},
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    queries = {"1": "what purrs", "2": "what barks", "3": "unjudged"}
    lines = [json.dumps({"_id": q, "text": t}) for q, t in queries.items()]
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    (root / "qrels" / "test.tsv").write_text(qrels_text)


def test_load_beir_keeps_judged_queries(tmp_path):
    _write_beir(tmp_path, "query-id\tcorpus-id\tscore\n1\td1\t1\n2\td2\t1\n2\td1\t0\n")
    data = load_beir(tmp_path, "test")
    assert data.corpus == {"d1": ("Cats", "Cats purr."), "d2": ("", "Dogs bark.")}
    assert data.queries == {"1": "what purrs", "2": "what barks"}
    assert data.qrels == {"1": {"d1": 1}, "2": {"d2": 1, "d1": 0}}
    assert list(load_beir(tmp_path, "test", limit_queries=1).queries) == ["1"]


def test_load_beir_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="qrels"):
        load_beir(tmp_path, "test")
    _write_beir(tmp_path, "query-id\tcorpus-id\tscore\n9\td1\t1\n")
    with pytest.raises(ValueError, match="missing from queries.jsonl"):
        load_beir(tmp_path, "test")
    (tmp_path / "qrels" / "bad.tsv").write_text("header\n1 d1 1\n")
    with pytest.raises(ValueError, match="3 tab-separated"):
        read_qrels(tmp_path / "qrels" / "bad.tsv")


def test_pick_split_prefers_test_then_dev_then_train(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has none of test, dev, train \(available splits: none\)"):
        pick_split(tmp_path)
    qrels = tmp_path / "qrels"
    qrels.mkdir()
    (qrels / "extra.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(FileNotFoundError, match=r"has none of .* \(available splits: extra\)"):
        pick_split(tmp_path)
    assert pick_split(tmp_path, "extra") == "extra"  # any split that exists may be named
    for name in ("train", "dev", "test"):  # each one added wins over those before it
        (qrels / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n")
        assert pick_split(tmp_path) == name
    (qrels / "train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.tsv \(available splits: dev, extra, test\)"):
        pick_split(tmp_path, "train")


def test_scifact_default_split_is_one_it_has(shared_data):
    root = shared_data / "beir" / "scifact"
    assert (root / "qrels" / f"{pick_split(root)}.tsv").is_file()


def test_scifact_qrels_shape(shared_data):
    qrels = read_qrels(shared_data / "beir" / "scifact" / "qrels" / "train.tsv")
    assert len(qrels) == 809


def test_hit_metrics_and_fusion_shares_by_hand():
    assert hit_metrics([1, 2, None, 6]) == {
        "hit@1": 0.25,
        "hit@5": 0.5,
        "mrr@10": pytest.approx((1 + 1 / 2 + 1 / 6) / 4),
    }
    assert hit_metrics([11])["mrr@10"] == 0.0
    with pytest.raises(ValueError, match="no queries"):
        hit_metrics([])
    ranks = {"dense": [1, 3, None, 2], "bm25": [2, 1, 4, None], "hybrid": [1, 2, 3, 2]}
    # query 2: hybrid 2 below bm25's 1; query 3: hybrid 3 above the best 4; ties count as neither
    assert fusion_shares(ranks) == {"fusion_below_best": 0.25, "fusion_above_best": 0.25}


# A SQuAD-format file in three languages: each question should find its own paragraph.
PARAGRAPHS = {
    "Glaciers": (
        "Glaciers form where snow accumulates faster than it melts; under its own weight the snow "
        "compacts into dense ice that flows slowly downhill and carves U-shaped valleys.",
        ["How do glaciers carve valleys?", "What does snow compact into?"],
    ),
    "Байкал": (
        "Байкал — самое глубокое озеро на планете: его глубина достигает 1642 метров, а в озере "
        "содержится около двадцати процентов мировых запасов пресной воды.",
        ["Какова глубина озера Байкал?", "Сколько пресной воды содержится в Байкале?"],
    ),
    "Pivo": (
        "Plzeňské pivo se vaří z chmele, ječného sladu a měkké vody již od roku 1842; pivovar dnes "
        "ročně vyrobí přes milion hektolitrů piva.",
        ["Z čeho se vaří plzeňské pivo?", "Kolik hektolitrů vyrobí pivovar?"],
    ),
}


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    data = [
        {"title": title, "paragraphs": [{"context": text, "qas": [
            {"id": f"{title}-{i}", "question": q, "answers": [{"text": text.split()[0], "answer_start": 0}]}
            for i, q in enumerate(questions)
        ]}]}
        for title, (text, questions) in PARAGRAPHS.items()
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("squad") / "mixed.json"
    path.write_text(json.dumps({"data": data}, ensure_ascii=False), encoding="utf-8")
    return path


def test_run_squad_through_the_ingest_pipeline(squad_file, tmp_path):
    from rag.config import Settings

    result = run_squad(squad_file, Settings(), index_dir=tmp_path / "index")
    assert (result["queries"], result["paragraphs"], result["chunks"]) == (6, 3, 3)
    assert result["hybrid"] == {"hit@1": 1.0, "hit@5": 1.0, "mrr@10": 1.0}
    assert result["bm25"]["hit@1"] == 1.0 and result["fusion_below_best"] == 0.0
    again = run_squad(squad_file, Settings(), index_dir=tmp_path / "index")  # the kept index is reused
    assert again["ingest"]["unchanged"] == 3 and again["hybrid"] == result["hybrid"]


def test_eval_retrieval_squad_command(squad_file, monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_INDEX_DIR", str(tmp_path / "unused"))  # a temporary index, not this one
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "retrieval", "--squad", str(squad_file), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"dense", "bm25", "hybrid", "fusion_below_best", "fusion_above_best"}
    assert report["index"] is None and not (tmp_path / "unused").exists()
    table = runner.invoke(app, ["eval", "retrieval", "--squad", str(squad_file)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "hit@1" in table.stdout and "below the better single mode" in table.stdout
    both = runner.invoke(app, ["eval", "retrieval", "--squad", str(squad_file), "--beir", str(tmp_path)])
    assert both.exit_code == 1 and "one of --beir DIR or --squad FILE" in both.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = runner.invoke(app, ["eval", "retrieval", "--squad", str(bad)])
    assert result.exit_code == 1 and "not SQuAD" in result.output and "Traceback" not in result.output
