"""Citations in a generated answer: find the `[n]` markers, map them to sources, check support.

What counts as a marker (decided so that parsing never guesses and never crashes):
- a bracket of numbers 1..999, `[3]` or `[1, 2]`; adjacent brackets `[1][3]` form one group. So
  `[0]`, `[2020]`, `[-1]` or `[i]` are never markers;
- not inside inline code (`...`): `a[1]` between backticks is code, not a citation;
- not right after another bracket that is not a marker: in `m[0][1]` the `[1]` indexes a matrix;
- glued to a word it still counts (`Paris[1]`): a small model dropping the space is likelier than
  code in a short answer, and a wrong number then shows up as an invalid citation (source None)
  instead of silently disappearing.

"supported" is a cheap, explainable check, no model: the content words of the sentence the marker
closes (Unicode `\\w+`, lowercased, stop-words left out) must mostly appear in the cited source
(at least SUPPORT_SHARE of them), or the whole sentence must appear in it verbatim (ignoring case
and spacing). A word is found in the source as it is or as an inflection sharing its stem (see
`_found`: Czech "Pražském"/"Pražský", "město"/"městě", Ukrainian "столиці"/"столиця", Russian
"война"/"войны", English "cities"/"city"), while "Paris" never matches "parish", "Warsaw"
never "wars" and a number only itself (a number missing from the source makes the sentence
unsupported, whatever else matches). Any script.

What it cannot catch: negation or changed relations ("X did not win" vs "X won": same words),
paraphrase with other words (a supported sentence may be flagged unsupported), and claims stitched
from words scattered across the source. It flags citations to look at; it is no proof.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rag.prompt import Source

_NUM = r"[1-9][0-9]{0,2}"  # ASCII digits only: \d would also match other scripts' digits
_BRACKET = rf"\[\s*{_NUM}(?:\s*,\s*{_NUM})*\s*\]"
CITATION_RE = re.compile(rf"(?<!\])(?:{_BRACKET})+")
_BRACKET_RE = re.compile(_BRACKET)
_NUM_RE = re.compile(_NUM)
_CODE_RE = re.compile(r"`[^`\n]*`")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?…])\s+")
_WORD_RE = re.compile(r"\w+")

SUPPORT_SHARE = 0.5  # share of the sentence's content words that the source must contain
_STEM_MIN = 6  # words this long may differ in their last (up to) two letters

# Function words of the languages the corpus is likely to hold; they carry no claim.
_STOP_WORDS_BY_LANGUAGE = {
    "en": "a an the and or but if of to in on at by for from with without as is are was were be been "
    "being it its this that these those there here which who whom whose what when where why how than "
    "then so not no do does did has have had will would can could should may might must also into about "
    "over under after before between during he she they we you i his her their our your them him us",
    "cs": "a i k o s u v z ve ze se si je jsou byl byla bylo byli být na do od po za pro při pod nad "
    "před mezi co kdo který která které jak kde kdy ale nebo že to ten ta tento tato toto jeho její jejich",
    "uk": "і й та а але або не ні що хто який яка яке які як де коли це цей ця ці той в у на до від по "
    "за з із зі для при під над про між був була було були є бути його її їх",
    "ru": "и в во на с со к ко от по за из для при под над о об про между не ни что кто который которая "
    "которое которые как где когда это этот эта эти тот та был была было были есть быть его ее её их",
}
STOP_WORDS = frozenset(w for words in _STOP_WORDS_BY_LANGUAGE.values() for w in words.split())


@dataclass(frozen=True)
class Citation:
    n: int  # the number as written
    source: Source | None  # the prompt source it points to; None = points at nothing (invalid)
    start: int  # character span of the marker (its bracket) in the answer text
    end: int
    sentence: str  # the answer sentence (or clause) the marker closes, markers left out
    supported: bool  # the cited source's text backs the sentence (see the module docstring)

    @property
    def valid(self) -> bool:
        return self.source is not None

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "start": self.start,
            "end": self.end,
            "sentence": self.sentence,
            "supported": self.supported,
            "valid": self.valid,
            "source": None if self.source is None else self.source.to_dict(),
        }


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.casefold())


def _english_base(word: str) -> str:
    """Undo the English endings that change a word's last letters: cities -> city, studied ->
    study, stopped/stopping -> stop. Other words are returned as they are."""
    if word.endswith(("ies", "ied")) and len(word) > 4:
        return word[:-3] + "y"
    for ending in ("ed", "ing"):
        base = word.removesuffix(ending)
        if base != word and len(base) >= 3 and base[-1] == base[-2] and base[-1] not in "aeiouls":
            return base[:-1]  # a doubled final consonant: stopped, planned
    return word


def _found(word: str, vocab: set[str], bases: set[str]) -> bool:
    """The word, or an inflection of it, is in vocab (bases: its words through _english_base).

    Inflections are matched by a shared stem: for words of _STEM_MIN letters or more, the word
    minus up to two final letters (never below 5 letters: "warsaw" must not find "wars"), in a
    vocab word at most two letters longer than the word ("Broncos" does not find "bronchitis");
    for 4-5 letter words in a non-Latin or accented script (where short words inflect: война/
    войны, město/městě), all but the last letter, in a word of about the same length. Short
    Latin-script words must match exactly, so "Paris" never finds "parish". Words with digits
    match exactly: 2500 is not 250000. English -ies/-ied and doubled consonants are undone first.
    """
    if word in vocab or _english_base(word) in bases:
        return True
    if any(c.isdigit() for c in word):
        return False
    if len(word) >= _STEM_MIN:
        stem = word[: max(5, len(word) - 2)]
        return any(w.startswith(stem) and len(w) <= len(word) + 2 for w in vocab)
    if len(word) >= 4 and not word.isascii():
        stem = word[:-1]
        return any(w.startswith(stem) and abs(len(w) - len(word)) <= 1 for w in vocab)
    return False


def is_supported(sentence: str, source_text: str) -> bool:
    """Does `source_text` back `sentence`? See the module docstring for the rule and its limits."""
    words = _words(sentence)
    if not words:
        return False
    source_words = _words(source_text)
    if f" {' '.join(words)} " in f" {' '.join(source_words)} ":  # verbatim, whole words
        return True
    content = [w for w in words if w not in STOP_WORDS] or words
    vocab = set(source_words)
    if any(any(c.isdigit() for c in w) and w not in vocab for w in content):
        return False  # a number is the claim itself: a wrong one is never backed by the rest
    bases = {_english_base(w) for w in vocab}  # once per source, not once per word
    found = sum(_found(w, vocab, bases) for w in content)
    return found >= SUPPORT_SHARE * len(content)


def _marker_groups(text: str) -> list[re.Match[str]]:
    """Citation groups of text, outside inline code."""
    code = [m.span() for m in _CODE_RE.finditer(text)]
    return [m for m in CITATION_RE.finditer(text) if not any(a <= m.start() < b for a, b in code)]


def _last_sentence(region: str) -> str:
    """The last sentence of region that has a word in it ("" if none), without leading separators."""
    parts = [p for p in _SENTENCE_END_RE.split(region) if _WORD_RE.search(p)]
    return parts[-1].strip().lstrip(",;:–—-").strip() if parts else ""


def _first_sentence(region: str) -> str:
    parts = [p for p in _SENTENCE_END_RE.split(region) if _WORD_RE.search(p)]
    return parts[0].strip() if parts else ""


def _clauses(text: str, groups: Sequence[re.Match[str]]) -> list[str]:
    """Per group, the sentence or clause it closes: the text since the previous group or sentence
    end. Groups with no words before them share the previous group's clause ("Paris [1] [2]"); a
    group at the very start of the text cites what follows it."""
    clauses: list[str] = []
    prev_end = 0
    for i, group in enumerate(groups):
        clause = _last_sentence(text[prev_end : group.start()])
        if not clause:
            if clauses:
                clause = clauses[-1]
            else:
                after = text[group.end() : groups[i + 1].start() if i + 1 < len(groups) else len(text)]
                clause = _first_sentence(after)
        clauses.append(clause)
        prev_end = group.end()
    return clauses


def parse_citations(text: str, sources: Sequence[Source]) -> list[Citation]:
    """Every citation in `text`, in order. `[n]` points at sources[n - 1]: the prompt's numbering
    (build_prompt numbers the sources it kept 1..k); any other number gives source None."""
    groups = _marker_groups(text)
    supported: dict[tuple[int, str], bool] = {}  # "[1] ... [1]" on one clause: check once
    citations = []
    for group, clause in zip(groups, _clauses(text, groups), strict=True):
        for bracket in _BRACKET_RE.finditer(text, group.start(), group.end()):
            for num in _NUM_RE.findall(bracket.group()):
                n = int(num)
                source = sources[n - 1] if n <= len(sources) else None
                if (n, clause) not in supported:
                    supported[n, clause] = source is not None and is_supported(clause, source.text)
                citations.append(
                    Citation(n, source, bracket.start(), bracket.end(), clause, supported[n, clause])
                )
    return citations
