"""Lexical analysis: words, language detection on short queries, stemming on and off."""

from __future__ import annotations

import unicodedata

import pytest

from rag.analysis import ANALYZER, FALLBACK_LANGUAGES, SNOWBALL, Analyzer, detect_language, stem, words


def test_words_are_casefolded_nfkc_unicode_words():
    assert words("Příliš ŽLUŤOUČKÝ kůň") == ["příliš", "žluťoučký", "kůň"]
    assert words(unicodedata.normalize("NFD", "žluťoučký kůň")) == ["žluťoučký", "kůň"]
    assert words("Київ — столиця України; Москва, 2024!") == ["київ", "столиця", "україни", "москва", "2024"]
    assert words("...  --") == []


@pytest.mark.parametrize(
    ("lang", "query"),
    [
        ("ru", "Законы масштабирования"),
        ("ru", "Когда родился Пушкин?"),
        ("ru", "нейронные сети"),
        ("uk", "Закони масштабування"),
        ("uk", "Коли народився Шевченко?"),
        ("uk", "нейронні мережі"),
        ("cs", "Zákony škálování"),
        ("cs", "Kdy se narodil Masaryk?"),
        ("cs", "neuronové sítě"),
        ("en", "When was Pushkin born?"),
        ("en", "Which city is the capital?"),
        ("de", "Wann wurde Goethe geboren?"),
    ],
)
def test_detector_on_short_queries(lang, query):
    assert detect_language(query) == lang


def test_no_language_without_letters():
    assert detect_language("1642 — 2024, 3.14") is None
    assert Analyzer().query("1642") == ["1642"]


def test_every_language_is_snowball_or_fallback():
    import Stemmer

    assert set(SNOWBALL.values()) <= set(Stemmer.algorithms())
    assert not set(SNOWBALL) & set(FALLBACK_LANGUAGES)


def test_stemming_joins_inflected_forms():
    a = Analyzer()
    # Snowball: English, Russian, Czech, German
    assert a.query("Were the engineers running?", languages={"en": 1}) == ["were", "the", "engin", "run"]
    # unsure of the query's language (two words), or the index has unsure chunks: plain words too
    assert a.query("running runs", languages={"en": 1}) == ["run", "running", "runs"]
    assert a.query("Were the engineers running?", languages={"en": 1, "": 1})[-2:] == ["engineers", "running"]
    assert "run" in a.document("The engineers were running the tests all night.")
    ru = a.document("Исследование законов масштабирования нейронных сетей показывает, как растёт качество.")
    assert set(a.query("Законы масштабирования", languages={"ru": 1})) <= set(ru)
    cs = a.document("Zákonů škálování neuronových sítí se dnes učí každý student informatiky.")
    assert set(a.query("Zákony škálování", languages={"cs": 1})) <= set(cs)
    # no Snowball for Ukrainian: the measured fallback, a 5-letter prefix
    uk = a.document("Дослідження законів масштабування нейронних мереж показує, як зростає якість.")
    assert a.query("Закони масштабування", languages={"uk": 1}) == ["закон", "масшт"]
    assert {"закон", "масшт"} <= set(uk)
    assert stem(["2024", "abc"], "uk") == ["2024", "abc"]  # numbers and short words stay whole


def test_stemming_off_gives_plain_words():
    a = Analyzer(stemming=False)
    assert a.document("The runners were running") == ["the", "runners", "were", "running"]
    assert a.query("running running RUNS") == ["running", "runs"]  # distinct, in order
    assert a.name != ANALYZER == Analyzer().name
    assert a.language("Какой-то русский текст") is None


def test_query_is_analyzed_among_the_index_languages():
    a = Analyzer()
    # "Python 3.12" alone looks Finnish to the detector, whose stemmer cuts it to "pytho"; an
    # English index has only English to choose from
    assert a.query("Python 3.12", languages={"en": 10}) == ["python", "3", "12"]
    # a close second guess is analyzed too, and the token sets merged
    merged = a.query("Що таке ДНК?", languages={"ru": 5, "uk": 5})
    assert {"днк", "так"} <= set(merged) and "таке" in merged
