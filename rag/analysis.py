"""Lexical analysis for BM25: language detected per text, words stemmed for that language.

BM25 only matches identical tokens, so in a language with rich inflection (Russian, Czech,
Ukrainian, German) the same word in another case never matches without stemming. The language
comes from py3langid (a maintained fork of langid.py, restricted to the languages below so short
queries are not called Luxembourgish); the stemmer is Snowball (PyStemmer) where Snowball has the
language, else `FALLBACK` (chosen by measurement, docs/benchmarks.md). Tokens of one index must all
come from one `ANALYZER` version: the BM25 snapshot records it and is rebuilt when it changes.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cache, lru_cache

import Stemmer

_WORD = re.compile(r"\w+")

# ISO 639-1 -> Snowball algorithm (PyStemmer); every one of these is in Stemmer.algorithms().
SNOWBALL = {
    "ar": "arabic", "ca": "catalan", "cs": "czech", "da": "danish", "de": "german", "el": "greek",
    "en": "english", "eo": "esperanto", "es": "spanish", "et": "estonian", "eu": "basque",
    "fa": "persian", "fi": "finnish", "fr": "french", "ga": "irish", "hi": "hindi", "hu": "hungarian",
    "hy": "armenian", "id": "indonesian", "it": "italian", "lt": "lithuanian", "ne": "nepali",
    "nl": "dutch", "no": "norwegian", "pl": "polish", "pt": "portuguese", "ro": "romanian",
    "ru": "russian", "sv": "swedish", "ta": "tamil", "tr": "turkish",
}  # fmt: skip
# Languages without a Snowball stemmer that the detector still tells apart, so that their words
# are not stemmed by a neighbour's rules (Ukrainian by the Russian stemmer, say). Serbian is here
# too: its Snowball stemmer rewrites Cyrillic in Latin letters, which breaks any Russian or
# Ukrainian text the detector takes for Serbian.
FALLBACK_LANGUAGES = ("uk", "be", "bg", "mk", "sr", "sk", "sl", "hr", "bs", "lv")
FALLBACK_PREFIX = 5  # fallback stem: the first 5 letters of a word (see `fallback_stem`)
ANALYZER = f"snowball-langid-v2-prefix{FALLBACK_PREFIX}"  # bump when any token changes


def words(text: str) -> list[str]:
    """Casefolded Unicode words. NFKC first so that decomposed accents (Czech 'č' as c + ˇ) stay
    inside their word."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def fallback_stem(word: str) -> str:
    """Truncate to `FALLBACK_PREFIX` letters: Slavic inflection lives in the last letters. On
    Russian, where Snowball exists to compare with, BM25 over 5-letter prefixes matched Snowball's
    (XQuAD-ru hit@1 0.927 vs 0.915) and beat a suffix list and character n-grams
    (docs/benchmarks.md)."""
    return word if word.isdigit() else word[:FALLBACK_PREFIX]


@cache
def _stemmer(algorithm: str) -> Stemmer.Stemmer:
    return Stemmer.Stemmer(algorithm)


_detector_lock = threading.Lock()


@lru_cache(maxsize=1)
def _detector():
    """py3langid's model restricted to the languages we analyze (loaded once, ~0.3 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    ident.set_languages([c for c in (*SNOWBALL, *FALLBACK_LANGUAGES) if c in ident.labels])
    return ident


def detect_languages(text: str, top: int = 2) -> list[tuple[str, float]]:
    """The `top` most likely languages of `text` with their probabilities, best first; [] when
    the text has no letters (numbers, punctuation), where no language can be told."""
    if not any(ch.isalpha() for ch in text):
        return []
    with _detector_lock:  # the identifier keeps per-call scratch state
        ranked = _detector().rank(text)
    return [(lang, float(p)) for lang, p in ranked[:top]]


def detect_language(text: str) -> str | None:
    best = detect_languages(text, top=1)
    return best[0][0] if best else None


def stem(tokens: Iterable[str], lang: str | None) -> list[str]:
    """Stem words of language `lang` (None or an unknown code: unchanged)."""
    if lang in SNOWBALL:
        return _stemmer(SNOWBALL[lang]).stemWords(list(tokens))
    if lang in FALLBACK_LANGUAGES:
        return [fallback_stem(t) for t in tokens]
    return list(tokens)


@dataclass(frozen=True)
class Analyzer:
    """Text -> BM25 tokens. `stemming=False` gives the plain casefolded words (language-blind).

    A text whose language is unsure (best guess below `confident`: a title, a few words) keeps its
    words unstemmed. A query is short and its language less certain than a chunk's. So it is only
    told apart among the languages of the indexed chunks (`languages`, chunks per language, "" for
    unsure ones); when the detector's second guess is close (probability >= `second_guess`) the
    query is also analyzed as that language, and as plain words when its language is unsure or the
    index has unsure chunks; the token sets are merged. So a Russian question taken for Ukrainian
    still matches Russian stems, and a one-word query finds a one-word chunk.
    """

    stemming: bool = True
    confident: float = 0.5
    second_guess: float = 0.2

    @property
    def name(self) -> str:
        return ANALYZER if self.stemming else "words-v1"

    def language(self, text: str) -> str | None:
        """The language a chunk is analyzed as; None when unsure or without stemming."""
        if not self.stemming:
            return None
        best = detect_languages(text, top=1)
        return best[0][0] if best and best[0][1] >= self.confident else None

    def tokens(self, text: str, lang: str | None) -> list[str]:
        """Tokens of a chunk whose language (from `language`, the costly part) is known."""
        tokens = words(text)
        return stem(tokens, lang) if self.stemming else tokens

    def document(self, text: str) -> list[str]:
        return self.tokens(text, self.language(text))

    def query(self, text: str, languages: Collection[str] | None = None) -> list[str]:
        """Distinct query tokens, in first-seen order (a repeated word must not count twice)."""
        tokens = words(text)
        if not self.stemming or not tokens:
            return list(dict.fromkeys(tokens))
        known = {lang for lang in languages or () if lang}
        guesses = detect_languages(text, top=len(SNOWBALL) + len(FALLBACK_LANGUAGES))
        unsure = not guesses or guesses[0][1] < self.confident or "" in (languages or ())
        if known:  # renormalized over the index's languages: certain among them, maybe not overall
            guesses = [(lang, p) for lang, p in guesses if lang in known]
            total = sum(p for _, p in guesses) or 1.0
            guesses = [(lang, p / total) for lang, p in guesses]
        langs: list[str | None] = [
            lang for i, (lang, p) in enumerate(guesses) if i == 0 or p >= self.second_guess
        ]
        if unsure:
            langs.append(None)
        out: dict[str, None] = {}
        for lang in langs:
            out.update(dict.fromkeys(stem(tokens, lang)))
        return list(out)
