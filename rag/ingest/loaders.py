"""Turn one file into a `Document` (title + pages of plain text), or say clearly why not.

Every failure is a `SkipFile` whose message is the per-file reason shown to the user: one bad
file in a folder of ten thousand must never stop an ingest run.
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import charset_normalizer
import pypdf
from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.element import PreformattedString

from rag.types import Document, Page

# A broken PDF becomes a SkipFile reason; pypdf's own warnings ("EOF marker not found") would only
# clutter the progress display. Apps that configure logging still receive them.
logging.getLogger("pypdf").addHandler(logging.NullHandler())

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
SUPPORTED_SUFFIXES = frozenset(TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf"})

# More than this share of control characters after decoding means the bytes were not text.
MAX_CONTROL_RATIO = 0.01
CHAOS_TIE = 0.1  # charset-normalizer "chaos" difference treated as a tie
_COMMON = ("cp1252", "latin_1", "iso8859_15", "cp1251", "cp1250")  # tie-break order for legacy text
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")  # C0/C1 controls except \t\n\v\f\r
_BOMS = (  # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class SkipFile(Exception):
    """A file that cannot be ingested; `str(exc)` is the human-readable reason."""


# ---------------------------------------------------------------------------------------------- text


def decode_text(data: bytes, declared: str | None = None) -> str:
    """Bytes -> str: BOM, else strict UTF-8, else a declared charset, else charset-normalizer's guess.

    UTF-8 goes first because a guesser can mistake short UTF-8 for some legacy code page, while
    legacy bytes (cp1251, latin-1) almost never happen to be valid UTF-8.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _check_text(data.decode(encoding))
            except UnicodeDecodeError as exc:
                raise SkipFile(f"invalid {encoding} text: {exc.reason}") from exc
    if b"\x00" in data:
        raise SkipFile("binary file (contains NUL bytes)")
    try:
        return _check_text(data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    if declared:
        try:
            return _check_text(data.decode(declared))
        except (LookupError, UnicodeDecodeError):
            pass
    results = charset_normalizer.from_bytes(data)
    best = results.best()
    if best is None:
        raise SkipFile("binary file or unknown text encoding")
    # On short text the guesser often ranks cp1250/cp1257 above cp1252 ("déjà" read as "déjŕ"):
    # among near-ties prefer the more common code page (11 -> 4 misses on 19 samples in 13 languages).
    tied = [m for m in results if m.chaos <= best.chaos + CHAOS_TIE and m.coherence >= best.coherence]
    best = min(tied, key=lambda m: _COMMON.index(m.encoding) if m.encoding in _COMMON else len(_COMMON))
    return _check_text(str(best))


def _check_text(text: str) -> str:
    """Reject decoded 'text' that is mostly control characters: binary that happened to decode."""
    sample = text[:65536]
    bad = len(_CONTROL.findall(sample))
    if bad > MAX_CONTROL_RATIO * len(sample):
        raise SkipFile("binary file (too many control characters)")
    return text


def read_text_file(path: Path | str) -> str:
    """Read a text file in UTF-8 (with or without BOM) or in its detected encoding."""
    return decode_text(Path(path).read_bytes())


def _first_heading(text: str, underline: str) -> str | None:
    """First '# ' heading or line underlined with one of `underline` (setext/reST), outside code fences."""
    lines = text.splitlines()
    in_fence = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if m := re.match(r"#\s+(.+?)(?:\s+#+)?(?:\s*\{\s*[#.][^}]*\})?\s*$", line):  # drop '{ #id }' attrs
            return m.group(1).strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        underlined = re.fullmatch(f"([{re.escape(underline)}])\\1{{2,}}", nxt)
        if stripped and underlined and len(nxt) >= len(stripped):
            return stripped
    return None


_UNDERLINES = {".md": "=", ".rst": "=-~^*#+"}  # Markdown: only '===' marks a level-1 heading; .txt: none


def _load_text(data: bytes, path: Path) -> tuple[str, list[str]]:
    text = decode_text(data)
    underline = _UNDERLINES.get(path.suffix.lower())
    title = _first_heading(text, underline) if underline else None
    return title or path.stem, [text]


# ---------------------------------------------------------------------------------------------- html

# Not <head> itself: html.parser nests <body> inside an unclosed <head>; <title> is kept apart as the title.
_DROP_TAGS = ("script", "style", "nav", "header", "footer", "noscript", "template", "title", "svg", "iframe")
_LINE_TAGS = frozenset({"br", "li", "tr", "dt", "dd", "option"})
# fmt: off
_BLOCK_TAGS = frozenset({
    "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "thead", "tbody", "tfoot",
    "pre", "blockquote", "section", "article", "aside", "main", "figure", "figcaption", "form", "fieldset",
    "address", "details", "summary", "hr", "caption", "body", "html",
})
# fmt: on
_CELL_TAGS = frozenset({"td", "th"})
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _html_pieces(root: Tag) -> Iterator[tuple[str, bool]]:
    """(text, verbatim) in document order: '\n\n' around blocks, '\n' after line-level tags.

    Iterative (not recursive) so deeply nested junk HTML cannot hit the recursion limit.
    Text under <pre> is verbatim; elsewhere runs of whitespace become one space, as in a browser.
    """
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, in_pre = stack.pop()
        if isinstance(node, str):  # a separator pushed below, or a text node
            if not isinstance(node, NavigableString):
                yield node, False
            elif not isinstance(node, PreformattedString):  # skip comments, doctype, CDATA
                yield (str(node), True) if in_pre else (re.sub(r"\s+", " ", node), False)
            continue
        assert isinstance(node, Tag)
        name = node.name
        block = "\n\n" if name in _BLOCK_TAGS else ""
        after = block or ("\n" if name in _LINE_TAGS else " " if name in _CELL_TAGS else "")
        yield block, False
        stack.append((after, False))
        stack.extend((child, in_pre or name == "pre") for child in reversed(node.contents))


def _html_text(root: Tag) -> str:
    """Visible text with paragraphs as '\n\n' (what the chunker cuts at) and lines as '\n'."""
    out: list[str] = []
    run: list[str] = []
    for piece, verbatim in [*_html_pieces(root), ("", True)]:
        if not verbatim:
            run.append(piece)
            continue
        out.append(re.sub(r" *\n *", "\n", re.sub(r" {2,}", " ", "".join(run))))
        out.append(piece)
        run = []
    return re.sub(r"\n{3,}", "\n\n", "".join(out)).strip()


def _load_html(data: bytes, path: Path) -> tuple[str, list[str]]:
    m = _META_CHARSET.search(data[:4096])
    html = decode_text(data, declared=m.group(1).decode("ascii") if m else None)
    with warnings.catch_warnings(
        action="ignore"
    ):  # e.g. "looks like a URL": noise for a file we parse anyway
        soup = BeautifulSoup(html, "html.parser")
    title = ""
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(" ", strip=True)
    elif (h1 := soup.find("h1")) is not None:
        title = h1.get_text(" ", strip=True)
    for tag in soup.find_all(_DROP_TAGS):
        if not tag.decomposed:  # a dropped tag inside another dropped tag is already gone
            tag.decompose()
    text = _html_text(soup)
    if not text:
        raise SkipFile("HTML has no visible text")
    return title or path.stem, [text]


# ----------------------------------------------------------------------------------------------- pdf


_SURROGATE = re.compile("[\ud800-\udfff]")


def _fix_surrogates(text: str) -> str:
    """Join UTF-16 surrogate pairs, replace lone halves: some PDF fonts map glyphs to them."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# Placeholders that tools write as a PDF's title: a file name (a PDF printed from a browser is
# titled "000.html"), a bare number, "Untitled", "Microsoft Word - x.docx" and the like.
_JUNK_PDF_TITLE = re.compile(
    r"[\W\d_]*|untitled.*|document\s*\d*|no title|title|unknown|none|null|slide \d+"
    r"|(?:microsoft )?(?:word|powerpoint|excel)(?: presentation)? - .*|powerpoint presentation"
    r"|.*\.(?:s?html?|php|aspx?|pdf|docx?|odt|rtf|txt|md|tex|dvi|e?ps|pptx?|xlsx?|indd|qxd|pub)",
    re.IGNORECASE,
)


def _load_pdf(data: bytes, path: Path) -> tuple[str, list[str]]:
    if b"%PDF" not in data[:1024]:
        raise SkipFile("not a PDF file (no %PDF header)")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
    except Exception as exc:
        raise SkipFile(f"corrupt PDF: {exc}") from exc
    if reader.is_encrypted:
        try:
            opened = reader.decrypt("")
        except Exception as exc:  # e.g. AES without the `cryptography` package
            raise SkipFile(f"encrypted PDF that cannot be opened: {exc}") from exc
        if not opened:
            raise SkipFile("encrypted PDF (password required)")
    try:
        pages = list(reader.pages)
    except Exception as exc:
        raise SkipFile(f"corrupt PDF: cannot read the page tree ({exc})") from exc
    if not pages:
        raise SkipFile("PDF has no pages")
    texts, errors = [], []
    for page in pages:  # page by page: one broken page keeps the rest of the document
        try:
            texts.append(_fix_surrogates(page.extract_text() or ""))
        except Exception as exc:
            texts.append("")
            errors.append(exc)
    if not any(t.strip() for t in texts):
        if errors:
            raise SkipFile(f"corrupt PDF: no page could be read ({errors[0]})")
        raise SkipFile("PDF has no extractable text (scanned images?)")
    title = ""
    try:
        title = (reader.metadata.title or "").strip() if reader.metadata else ""
    except Exception:  # broken metadata must not cost us the text
        title = ""
    return (title if not _JUNK_PDF_TITLE.fullmatch(title) else "") or path.stem, texts


# ------------------------------------------------------------------------------------------ dispatch

_LOADERS: dict[str, Callable[[bytes, Path], tuple[str, list[str]]]] = {
    **dict.fromkeys(TEXT_SUFFIXES, _load_text),
    **dict.fromkeys(HTML_SUFFIXES, _load_html),
    ".pdf": _load_pdf,
}


def load_document(path: Path | str, max_bytes: int) -> Document:
    """Load a supported file into a Document; raises `SkipFile` (and only that) with the reason.

    PDFs give one Page per PDF page (numbered from 1; pages without text are kept so numbers match
    the PDF), every other format exactly one Page(number=1). The size is checked before reading,
    so a huge file costs nothing.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    loader = _LOADERS.get(suffix)
    if loader is None:
        raise SkipFile(f"unsupported file type '{suffix or path.name}'")
    try:
        if not path.is_file():
            raise SkipFile("not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise SkipFile(f"file too large ({size:,} bytes > limit {max_bytes:,})")
        if size == 0:
            raise SkipFile("empty file")
        data = path.read_bytes()
    except OSError as exc:
        raise SkipFile(f"cannot read file: {exc.strerror or exc}") from exc
    try:
        title, texts = loader(data, path)
    except SkipFile:
        raise
    except Exception as exc:  # any parser bug or malformed input becomes a per-file reason
        raise SkipFile(f"cannot parse {suffix[1:].upper()}: {type(exc).__name__}: {exc}") from exc
    if not any(t.strip() for t in texts):
        raise SkipFile("empty file (only whitespace)")
    return Document(
        path=str(path), title=" ".join(title.split()), pages=[Page(i, t) for i, t in enumerate(texts, 1)]
    )
