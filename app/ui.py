"""Streamlit web app. It talks to the REST API only (RAG_API_URL), never to the index directly,
so the browser sees exactly what developers calling the API see.

Run with `streamlit run app/ui.py` (or `make run`).
"""

from __future__ import annotations

import os

import httpx
import streamlit as st

API_URL = os.environ.get("RAG_API_URL", "http://127.0.0.1:8000").rstrip("/")
TIMEOUT = httpx.Timeout(30.0, read=600.0)  # ingesting a folder can take minutes


def call(method: str, path: str, **kwargs) -> dict | list | None:
    """One API call; errors become a visible message instead of a Streamlit traceback."""
    try:
        resp = httpx.request(method, f"{API_URL}{path}", timeout=TIMEOUT, **kwargs)
    except httpx.HTTPError as exc:
        st.error(f"Cannot reach the API at {API_URL}: {exc}")
        return None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        st.error(f"{resp.status_code}: {detail}")
        return None
    return resp.json()


def search_page() -> None:
    st.title("Search your documents")
    with st.form("search"):
        query = st.text_input("Question or keywords", max_chars=2000)
        cols = st.columns(2)
        k = cols[0].slider("Results", 1, 20, 5)
        mode = cols[1].selectbox("Mode", ["hybrid", "dense", "bm25"])
        submitted = st.form_submit_button("Search")
    if submitted and query.strip():
        data = call("POST", "/v1/search", json={"query": query, "k": k, "mode": mode})
        if data is None:
            return
        if not data["results"]:
            st.info("No matching passages.")
        for n, hit in enumerate(data["results"], start=1):
            title = hit["title"] or hit["path"]
            st.markdown(f"**[{n}] {title}** · page {hit['page']} · chars {hit['start']}–{hit['end']}")
            st.caption(f"{hit['path']} · score {hit['score']:.4f}")
            st.code(hit["text"], language=None, wrap_lines=True)  # verbatim: passages are not our markup
            st.divider()


def admin_page() -> None:
    st.title("Admin: ingest and manage documents")
    key = st.text_input("API key", type="password", help="The server's RAG_API_KEY.")
    headers = {"X-API-Key": key} if key else {}
    with st.form("ingest"):
        paths = st.text_area("Folders or files on the server, one per line", value="docs")
        prune = st.checkbox("Remove documents whose files are gone (prune)")
        go = st.form_submit_button("Ingest")
    if go:
        body = {"paths": [p.strip() for p in paths.splitlines() if p.strip()], "prune": prune}
        with st.spinner("Ingesting…"):
            report = call("POST", "/v1/ingest", json=body, headers=headers)
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
    page = st.sidebar.radio("Page", ["Search", "Admin"])
    st.sidebar.caption(f"API: {API_URL}")
    (search_page if page == "Search" else admin_page)()


main()
