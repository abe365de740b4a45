"""Streamlit web app. It talks to the REST API only (RAG_API_URL), never to the index directly,
so the browser sees exactly what developers calling the API see.

Pages: Search (passages), Chat (answers from our reader model with numbered sources, streamed
from `POST /v1/ask`; the matching passages when there is no reader), Admin (ingest with progress,
list, delete).

Run with `rag serve --ui` (or `make run`, or `streamlit run app/ui.py` from the project folder,
whose .streamlit/config.toml keeps it on 127.0.0.1). Served to other machines (an address other
than this machine's own), the admin page shows nothing until the API key is given: documents and
their paths are nobody else's business.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import httpx
import streamlit as st

API_URL = os.environ.get("RAG_API_URL", "http://127.0.0.1:8000").rstrip("/")
TIMEOUT = httpx.Timeout(30.0, read=600.0)  # ingesting a folder can take minutes
MODES = ["hybrid", "dense", "bm25"]
MARKDOWN_SPECIAL = re.compile(r"[\\`*_{}\[\]()#+\-.!|<>~$:&]")  # ASCII punctuation markdown may read
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def error_message(resp: httpx.Response) -> str:
    """`{"detail": ...}` of this API, or OpenAI's `{"error": {"message": ...}}`, as one line."""
    try:
        body = resp.json()
        detail = body.get("detail") or body.get("error", {}).get("message") or resp.text
    except (ValueError, AttributeError):
        detail = resp.text
    return f"{resp.status_code}: {detail}"


def served_locally() -> bool:
    """Whether this UI listens on this machine only (Streamlit with no address listens on all)."""
    return (st.get_option("server.address") or "") in LOCAL_ADDRESSES


def call(method: str, path: str, **kwargs) -> dict | list | None:
    """One API call; errors become a visible message instead of a Streamlit traceback."""
    try:
        resp = httpx.request(method, f"{API_URL}{path}", timeout=TIMEOUT, **kwargs)
    except httpx.HTTPError as exc:
        st.error(f"Cannot reach the API at {API_URL}: {exc}")
        return None
    if resp.status_code >= 400:
        st.error(error_message(resp))
        return None
    return resp.json()


def plain(text: str) -> str:
    """`text` escaped for st.markdown, so that it shows as written: generated answers and document
    titles are not our markup (a document could otherwise make an answer show a link)."""
    return MARKDOWN_SPECIAL.sub(r"\\\g<0>", text)


def show_passage(n: int, passage: dict, note: str, marks: list[tuple[int, int, str]] | None = None) -> None:
    """A numbered passage with what cites it: title, page, exact character span, then the text,
    verbatim, or with `marks` (page offsets, a style) highlighted: the quoted answer, the evidence."""
    title = plain(passage["title"] or passage["path"])
    st.markdown(f"**[{n}] {title}** · page {passage['page']} · chars {passage['start']}–{passage['end']}")
    st.caption(f"{plain(passage['path'])} · {note}")
    if not marks:
        st.code(passage["text"], language=None, wrap_lines=True)  # verbatim: passages are not our markup
        return
    st.markdown(highlighted(passage["text"], passage["start"], marks))


def highlighted(text: str, offset: int, marks: list[tuple[int, int, str]]) -> str:
    """`text` (starting at page offset `offset`) as escaped markdown with the marked spans styled;
    overlapping marks: the first one given wins."""
    styles: list[str | None] = [None] * len(text)
    for start, end, style in reversed(marks):  # earlier marks drawn last, so they win
        for i in range(max(start - offset, 0), min(end - offset, len(text))):
            styles[i] = style
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and styles[j] == styles[i]:
            j += 1
        piece = plain(text[i:j]).replace("\n", "  \n")
        out.append(piece if styles[i] is None else f"{styles[i]}[{piece}]")
        i = j
    return "".join(out)


def show_hits(hits: list[dict]) -> None:
    if not hits:
        st.info("No matching passages.")
    for n, hit in enumerate(hits, start=1):
        show_passage(n, hit, f"score {hit['score']:.4f}")
        st.divider()


def search(query: str, k: int, mode: str) -> list[dict] | None:
    data = call("POST", "/v1/search", json={"query": query, "k": k, "mode": mode})
    return None if data is None else data["results"]


def search_page() -> None:
    st.title("Search your documents")
    with st.form("search"):
        query = st.text_input("Question or keywords", max_chars=2000)
        cols = st.columns(2)
        k = cols[0].slider("Results", 1, 20, 5)
        mode = cols[1].selectbox("Mode", MODES)
        submitted = st.form_submit_button("Search")
    if submitted and query.strip() and (hits := search(query, k, mode)) is not None:
        show_hits(hits)


def sse_events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON events of a server-sent event stream, up to `data: [DONE]`."""
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            yield json.loads(data)


def failed(message: str) -> dict:
    """Show an error and return it as the chat turn to keep."""
    st.error(message)
    return {"error": message}


def stream_answer(question: str, k: int, mode: str) -> dict:
    """Ask the API for a streamed answer and write it into the page as it comes.

    Returns the chat turn to keep: {"answer": the final answer} or {"error": message}. Without a
    reader the API's answer is the matching passages (`answer` null, `reader_unavailable`).
    """
    body = {"question": question, "k": k, "mode": mode, "stream": True}
    final: dict = {}

    def pieces(lines: Iterator[str]) -> Iterator[str]:
        for event in sse_events(lines):
            if event["type"] == "token":
                yield event["text"]
            else:  # "answer" or "error"
                final.update(event)

    try:
        with httpx.stream("POST", f"{API_URL}/v1/ask", json=body, timeout=TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                return failed(error_message(resp))
            st.write_stream(map(plain, pieces(resp.iter_lines())))
    except httpx.HTTPError as exc:
        return failed(f"Cannot reach the API at {API_URL}: {exc}")
    if final.get("type") != "answer":
        return failed(f"The answer stopped: {final.get('detail', 'the stream ended early')}")
    show_answer(final, streamed=True)
    return {"answer": final}


def show_answer(answer: dict, streamed: bool = False) -> None:
    """An answer (its text unless it was just streamed, then its sources), or, when no reader
    could answer, why not and the passages that match instead."""
    if answer["answer"] is None:
        st.warning(f"No answer: {answer.get('reader_unavailable', 'no reader model')}")
        st.caption("The passages that match your question:")
        show_hits(answer["sources"])
        return
    if not streamed:
        st.markdown(plain(answer["answer"]))
    show_sources(answer)


def show_sources(answer: dict) -> None:
    """The sources the model was shown, each with whether the answer cites it and whether the
    cited text backs the cited sentence (rag.citations: a word-overlap check, not a proof)."""
    if answer["finish_reason"] == "length":
        st.caption("The answer was cut at the token limit.")
    invalid = sorted({c["n"] for c in answer["citations"] if not c["valid"]})
    if invalid:
        cited = ", ".join(f"[{n}]" for n in invalid)
        st.warning(f"The answer cites {cited}, but no source has that number.")
    if not answer["sources"]:
        if answer["finish_reason"] == "no_room":
            st.info("The answer's token limit left no room in the model's context for any passage.")
        else:
            st.info("No passage matched the question, so there was nothing to answer from.")
        return
    st.markdown("**Sources**")
    quote, evidence = answer.get("quote"), answer.get("evidence") or []
    if evidence:
        st.caption(":green-background[answer] · :orange-background[what the reader attended to most]")
    for source in answer["sources"]:
        cites = [c for c in answer["citations"] if c["valid"] and c["n"] == source["n"]]
        if not cites:
            note = "not cited"
        elif all(c["supported"] for c in cites):
            note = "cited · supported by this text"
        else:
            note = "cited · NOT supported by this text: check it"
        if source["n"] in answer.get("cut_sources", []):
            note += " · read up to its shown end only (cut to fit the model)"
        marks = (
            [(quote["start"], quote["end"], ":green-background")]
            if quote and quote["n"] == source["n"]
            else []
        )
        marks += [(e["start"], e["end"], ":orange-background") for e in evidence if e["n"] == source["n"]]
        show_passage(source["n"], source, note, marks)


def show_turn(turn: dict) -> None:
    with st.chat_message("user"):
        st.text(turn["question"])
    with st.chat_message("assistant"):
        if "answer" in turn:
            show_answer(turn["answer"])
        else:
            st.error(turn["error"])


def chat_page() -> None:
    """Questions answered by our reader model over retrieved passages, streamed, with sources."""
    st.title("Ask your documents")
    with st.expander("Options"):
        cols = st.columns(2)
        k = cols[0].slider("Sources", 1, 20, 5, key="chat_k")
        mode = cols[1].selectbox("Retrieval mode", MODES, key="chat_mode")
    history: list[dict] = st.session_state.setdefault("chat", [])
    for turn in history:
        show_turn(turn)
    question = st.chat_input("Ask a question about your documents", max_chars=2000)
    if question and question.strip():
        with st.chat_message("user"):
            st.text(question)
        with st.chat_message("assistant"):
            history.append({"question": question, **stream_answer(question, k, mode)})


def progress_text(event: dict) -> str:
    if event["stage"]:
        return f"{event['stage'].capitalize()}…"
    text = f"{event['files_done']}/{event['files_total']} files, {event['chunks_done']} chunks"
    name = event["current_path"].rsplit("/", 1)[-1]
    done, total = event["file_chunks_done"], event["file_chunks_total"]
    if name and total and done < total:  # a large file: its own progress
        return f"{text} · {name}: {done}/{total} chunks"
    return f"{text} · {name}" if name else text


def ingest_with_progress(body: dict, headers: dict) -> dict | None:
    """POST /v1/ingest as a stream of progress events, shown as a bar; the report, or None after
    showing the error."""
    bar = st.progress(0.0, text="Starting…")
    try:
        with httpx.stream(
            "POST", f"{API_URL}/v1/ingest", json={**body, "stream": True}, headers=headers, timeout=TIMEOUT
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                bar.empty()
                st.error(error_message(resp))
                return None
            for event in sse_events(resp.iter_lines()):
                if event["type"] == "report":
                    bar.progress(1.0, text="Done")
                    return event
                if event["type"] == "error":
                    bar.empty()
                    st.error(f"Ingest failed: {event['detail']}")
                    return None
                total, part = event["files_total"], event["file_chunks_total"]
                done = event["files_done"] + (event["file_chunks_done"] / part if part else 0)
                bar.progress(min(done / total, 1.0) if total else 0.0, text=progress_text(event))
    except httpx.HTTPError as exc:
        st.error(f"Cannot reach the API at {API_URL}: {exc}")
        return None
    st.error("The ingest stream ended early")
    return None


def admin_page() -> None:
    st.title("Admin: ingest and manage documents")
    key = st.text_input("API key", type="password", help="The server's RAG_API_KEY.")
    headers = {"X-API-Key": key} if key else {}
    if not served_locally():  # anyone who can reach this page could read the document list
        if not key:
            st.info("This web UI is served to other machines: enter the API key to manage documents.")
            return
        if call("GET", "/v1/admin", headers=headers) is None:
            return
    with st.form("ingest"):
        paths = st.text_area("Folders or files on the server, one per line", value="docs")
        prune = st.checkbox("Remove documents whose files are gone (prune)")
        go = st.form_submit_button("Ingest")
    if go:
        body = {"paths": [p.strip() for p in paths.splitlines() if p.strip()], "prune": prune}
        report = ingest_with_progress(body, headers)
        if report is not None:
            st.success(
                f"{report['ingested']} ingested, {report['unchanged']} unchanged, "
                f"{len(report['skipped'])} skipped, {report['chunks']} chunks, {report['deleted']} deleted"
            )
            if report["skipped"]:
                st.dataframe(report["skipped"], use_container_width=True)
    stats = call("GET", "/v1/stats")
    if stats:
        st.subheader("Index")
        st.json(stats, expanded=False)
    docs = call("GET", "/v1/documents")
    if docs:
        st.subheader(f"Documents ({len(docs)})")
        st.dataframe(docs, use_container_width=True)
        doc_id = st.number_input("Document id to delete", min_value=1, step=1)
        path = f"/v1/documents/{int(doc_id)}"
        if st.button("Delete document") and call("DELETE", path, headers=headers) is not None:
            st.success(f"Deleted document {int(doc_id)}")


def main() -> None:
    st.set_page_config(page_title="rag", layout="wide")
    pages = {"Chat": chat_page, "Search": search_page, "Admin": admin_page}
    page = st.sidebar.radio("Page", list(pages))
    st.sidebar.caption(f"API: {API_URL}")
    pages[page]()


main()
