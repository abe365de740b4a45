"""Loaders on real files written by the tests: every format, encodings, and every skip reason."""

from __future__ import annotations

import io
from pathlib import Path

import pypdf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reportlab.pdfgen import canvas

from rag.ingest import SUPPORTED_SUFFIXES, SkipFile, load_document, read_text_file

MB = 1024 * 1024
RUSSIAN = "Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, как дела у тебя сегодня?"
UKRAINIAN = "Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів! Щастя, єдність і воля."
CZECH = "Příliš žluťoučký kůň úpěl ďábelské ódy. Věta s háčky a čárkami: řeřicha, ůžasný."
FRENCH = "Le cœur a ses raisons que la raison ne connaît point. À bientôt, garçon; déjà vu, naïve façade."
GERMAN = "Café déjà vu, naïve façade. Voilà, über die Straße läuft ein großer Bär."


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def load(path: Path, max_bytes: int = MB):
    return load_document(path, max_bytes=max_bytes)


def skip_reason(path: Path, max_bytes: int = MB) -> str:
    with pytest.raises(SkipFile) as info:
        load(path, max_bytes)
    return str(info.value)


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A real PDF via reportlab: one drawn line of text per entry (empty entry = blank page)."""
    buf = io.BytesIO()
    pdf = canvas.Canvas(buf)
    if title:
        pdf.setTitle(title)
    for text in pages:
        if text:
            pdf.drawString(72, 720, text)
        pdf.showPage()
    pdf.save()
    return buf.getvalue()


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password, "owner-secret", algorithm="RC4-128")  # RC4 needs no crypto package
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# ---------------------------------------------------------------------------------------- plain text


def test_supported_suffixes_match_contract():
    assert {".txt", ".md", ".rst", ".html", ".htm", ".pdf"} == SUPPORTED_SUFFIXES


@pytest.mark.parametrize("name", ["notes.txt", "notes.md", "notes.rst", "NOTES.TXT"])
def test_text_formats_give_one_page_with_text_unchanged(tmp_path, name):
    text = "First line with *stars* and `code`.\r\n\r\n- item\n- item 2\n"
    doc = load(write(tmp_path, name, text))
    assert doc.path == str(tmp_path / name)
    assert [(p.number, p.text) for p in doc.pages] == [(1, text)]  # markup and CRLF kept as is


def test_markdown_title_is_first_h1_outside_code_fences(tmp_path):
    text = "Intro line\n\n```bash\n# not a heading\n```\n\n## Sub first\n\n# The Real Title #\n\nBody."
    assert load(write(tmp_path, "doc.md", text)).title == "The Real Title"


def test_markdown_heading_attributes_are_not_part_of_the_title(tmp_path):
    assert (
        load(write(tmp_path, "a.md", "# Python Types Intro { #python-types-intro }\n\nx")).title
        == "Python Types Intro"
    )


def test_underlined_titles_in_rst_and_markdown(tmp_path):
    assert load(write(tmp_path, "guide.rst", "User Guide\n----------\n\nText.")).title == "User Guide"
    assert load(write(tmp_path, "setext.md", "Big Title\n=========\n\nText.")).title == "Big Title"
    assert load(write(tmp_path, "h2-only.md", "Section\n-------\n\nText.")).title == "h2-only"


@pytest.mark.parametrize("name", ["plain.txt", "untitled.md"])
def test_title_falls_back_to_file_stem(tmp_path, name):
    assert load(write(tmp_path, name, "no heading here\njust text")).title == Path(name).stem


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        (RUSSIAN, "cp1251"),
        (GERMAN, "latin-1"),
        (FRENCH, "cp1252"),
        (CZECH, "utf-8"),
        (UKRAINIAN, "utf-8"),
        (CZECH, "utf-8-sig"),  # BOM is dropped, not kept as U+FEFF
        (UKRAINIAN, "utf-16"),  # BOM tells the byte order
    ],
)
def test_encodings_decode_to_the_original_text(tmp_path, text, encoding):
    path = write(tmp_path, "text.txt", text.encode(encoding))
    assert load(path).pages[0].text == text
    assert read_text_file(path) == text


def test_html_declared_charset_is_used_when_not_utf8(tmp_path):
    html = f'<html><head><meta charset="windows-1251"><title>Тест</title></head><body><p>{RUSSIAN}</p></body>'
    doc = load(write(tmp_path, "ru.html", html.encode("cp1251")))
    assert doc.title == "Тест"
    assert doc.pages[0].text == RUSSIAN


# ---------------------------------------------------------------------------------------------- html

HTML = """<!DOCTYPE html>
<html><head><title> Page  Title </title><style>body { color: red }</style>
<script>var secret = "SCRIPT";</script></head>
<body>
<header>HEADER banner</header>
<nav><a href="/">NAV home</a> <a href="/x">NAV other</a></nav>
<h1>Main heading</h1>
<p>First paragraph
   spread over source lines.</p>
<!-- COMMENT -->
<div><p>Second paragraph with <b>bold</b> and <a href="#">a link</a>.</p></div>
<ul><li>apple</li><li>pear</li></ul>
<pre>  indented
    code</pre>
<noscript>NOSCRIPT fallback</noscript>
<script>document.write("SCRIPT2")</script>
<footer>FOOTER text</footer>
</body></html>"""


def test_html_drops_boilerplate_and_keeps_paragraph_structure(tmp_path):
    doc = load(write(tmp_path, "page.html", HTML))
    text = doc.pages[0].text
    assert doc.title == "Page Title"
    for junk in ("SCRIPT", "color: red", "NAV", "HEADER", "FOOTER", "NOSCRIPT", "COMMENT", "Page Title"):
        assert junk not in text
    paragraphs = text.split("\n\n")
    assert paragraphs[:3] == [
        "Main heading",
        "First paragraph spread over source lines.",
        "Second paragraph with bold and a link.",
    ]
    assert "apple\npear" in text  # list items are lines, not paragraphs
    assert "  indented\n    code" in text  # <pre> keeps its whitespace


def test_html_title_falls_back_to_h1_then_stem(tmp_path):
    assert (
        load(write(tmp_path, "a.htm", "<body><h1>Heading <i>One</i></h1><p>x</p></body>")).title
        == "Heading One"
    )
    assert load(write(tmp_path, "plain-page.html", "<p>only text</p>")).title == "plain-page"


def test_html_with_unclosed_head_keeps_body_text(tmp_path):
    doc = load(write(tmp_path, "sloppy.html", "<html><head><title>T</title><body><p>hello there</p></body>"))
    assert (doc.title, doc.pages[0].text) == ("T", "hello there")


def test_html_without_visible_text_is_skipped(tmp_path):
    path = write(tmp_path, "empty.html", "<html><head><script>x()</script></head><body> </body></html>")
    assert "no visible text" in skip_reason(path)


def test_deeply_nested_html_does_not_crash(tmp_path):
    html = "<div>" * 5000 + "deep text" + "</div>" * 5000
    try:
        assert load(write(tmp_path, "deep.html", html)).pages[0].text == "deep text"
    except SkipFile as exc:  # acceptable as long as it is a clean per-file reason
        assert str(exc)


# ----------------------------------------------------------------------------------------------- pdf


def test_pdf_one_page_per_pdf_page_with_numbers_and_title(tmp_path):
    texts = [
        "Alpha page talks about apples.",
        "Beta page talks about bananas.",
        "Gamma page talks about cherries.",
    ]
    doc = load(write(tmp_path, "report.pdf", make_pdf(texts, title="Fruit Report")))
    assert doc.title == "Fruit Report"
    assert [p.number for p in doc.pages] == [1, 2, 3]
    for page, text in zip(doc.pages, texts, strict=True):
        assert page.text.strip() == text


def test_pdf_blank_pages_keep_numbering_and_title_falls_back_to_stem(tmp_path):
    doc = load(write(tmp_path, "scan-notes.pdf", make_pdf(["first", "", "third"])))
    assert doc.title == "scan-notes"
    assert [(p.number, p.text.strip()) for p in doc.pages] == [(1, "first"), (2, ""), (3, "third")]


@pytest.mark.parametrize(
    "placeholder",
    ["000.html", "Microsoft Word - thesis.docx", "Untitled-1", "Document1", "42", "My paper.pdf"],
)
def test_pdf_placeholder_title_falls_back_to_the_file_name(tmp_path, placeholder):
    """Tools write file names and defaults as the title (a page printed from a browser: "000.html")."""
    doc = load(write(tmp_path, "quarterly-report.pdf", make_pdf(["text"], title=placeholder)))
    assert doc.title == "quarterly-report"


def test_encrypted_pdf_with_password_is_skipped(tmp_path):
    path = write(tmp_path, "secret.pdf", encrypt_pdf(make_pdf(["classified"]), user_password="pw"))
    assert "encrypted" in skip_reason(path)


def test_encrypted_pdf_with_empty_user_password_opens(tmp_path):
    path = write(tmp_path, "owner-only.pdf", encrypt_pdf(make_pdf(["readable text"]), user_password=""))
    assert load(path).pages[0].text.strip() == "readable text"


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_pdf_is_skipped_as_corrupt(tmp_path, fraction):
    data = make_pdf(["one", "two", "three"])
    path = write(tmp_path, "broken.pdf", data[: int(len(data) * fraction)])
    assert "corrupt" in skip_reason(path)


def test_pdf_without_text_is_skipped(tmp_path):
    assert "no extractable text" in skip_reason(write(tmp_path, "blank.pdf", make_pdf(["", ""])))


def test_non_pdf_bytes_with_pdf_suffix_are_skipped(tmp_path):
    assert "not a PDF" in skip_reason(write(tmp_path, "fake.pdf", "just some text, no header"))


# --------------------------------------------------------------------------------------- skip reasons


def test_empty_and_whitespace_only_files_are_skipped(tmp_path):
    assert skip_reason(write(tmp_path, "empty.txt", b"")) == "empty file"
    assert "only whitespace" in skip_reason(write(tmp_path, "blank.md", " \n\t\r\n  "))


def test_binary_files_are_skipped(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))
    assert "binary" in skip_reason(write(tmp_path, "image.txt", png))
    assert "binary" in skip_reason(write(tmp_path, "controls.md", bytes(range(1, 32)) * 20))


def test_oversized_file_is_skipped_before_reading(tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.truncate(8 * 1024**3)  # sparse 8 GiB: reading it would take far longer than the test budget
    reason = skip_reason(path, max_bytes=MB)
    assert "too large" in reason and "8,589,934,592" in reason


@pytest.mark.parametrize("name", ["archive.zip", "image.png", "Makefile", "notes.txt.bak"])
def test_unknown_extension_is_skipped(tmp_path, name):
    assert "unsupported file type" in skip_reason(write(tmp_path, name, "text"))


def test_directory_and_missing_file_are_skipped(tmp_path):
    (tmp_path / "folder.txt").mkdir()
    assert "not a regular file" in skip_reason(tmp_path / "folder.txt")
    assert "not a regular file" in skip_reason(tmp_path / "missing.md")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=600), suffix=st.sampled_from(sorted(SUPPORTED_SUFFIXES)))
def test_arbitrary_bytes_give_a_document_or_skipfile(tmp_path, data, suffix):
    path = write(tmp_path, f"fuzz{suffix}", (b"%PDF-1.4\n" + data) if suffix == ".pdf" else data)
    try:
        doc = load(path)
    except SkipFile as exc:
        assert str(exc)
    else:
        assert doc.pages and any(p.text.strip() for p in doc.pages)
