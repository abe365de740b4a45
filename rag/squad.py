"""SQuAD answer matching: the official v1.1 normalisation, EM / F1, and answer-in-text checks.

Shared by the training-data builder (rag.reader_data: which paragraphs hold the answer) and the
evaluation (rag.eval: scoring answers and citations), so both agree on what "the answer" is.
EM / F1 are the official evaluate-v1.1.py ones: answers are compared after lowercasing and removing
punctuation, the articles a/an/the and extra whitespace; a prediction scores the best of its EM /
token F1 against each gold answer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from rag.citations import CITATION_RE

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_SPACE_BEFORE_PUNCT_RE = re.compile(r" (?=[.,;:!?])")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (in the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def _require_golds(golds: Sequence[str]) -> None:
    if isinstance(golds, str) or not golds:
        raise ValueError("gold answers must be a non-empty list of strings")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    _require_golds(golds)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:  # as the official script: also 0 when both are empty
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 of the normalized answers, the best over the gold answers."""
    _require_golds(golds)
    return max(_f1(prediction, g) for g in golds)


def contains_answer(text: str, golds: Sequence[str]) -> bool:
    """Some gold answer occurs in `text` as whole words, after SQuAD normalization.

    Whole words, so "art" is not found in "party"; golds that normalize to nothing never match.
    Normalization glues "Warsaw's" into "warsaws", so this misses inflected mentions: fine for
    scoring a cited source, too weak to prove a text does NOT name the answer (see mentions_answer).
    """
    padded = f" {normalize_answer(text)} "
    return any(g and f" {g} " in padded for g in map(normalize_answer, golds))


def _mention_re(gold: str) -> re.Pattern | None:
    """Casefolded gold at a word start, then the end, a non-word char, or a plural s/es."""
    gold = " ".join(gold.casefold().split())
    if not gold:
        return None
    start = r"(?<!\w)" if re.match(r"\w", gold) else ""
    end = r"(?:e?s)?(?!\w)" if re.search(r"\w$", gold) else ""
    return re.compile(start + re.escape(gold) + end)


def mentions_answer(text: str, golds: Sequence[str]) -> bool:
    """Some gold answer is named in `text`, inflected or not: the leakage check of abstention rows.

    contains_answer, or the raw casefolded gold at a word start followed by the end, a non-word char
    ("Warsaw's", "24–10") or a plural ending ("Turing machines"). It errs towards "named" ("1970s"
    for 1970): a paragraph wrongly set aside only costs a distractor, one that names the answer
    would make the abstention label false.
    """
    if contains_answer(text, golds):
        return True
    folded = " ".join(text.casefold().split())
    return any(p is not None and p.search(folded) for p in map(_mention_re, golds))


def answer_text(text: str) -> str:
    """The answer without its citation markers (and the space before them): what EM/F1 compare."""
    return _SPACE_BEFORE_PUNCT_RE.sub("", " ".join(CITATION_RE.sub(" ", text).split()))
