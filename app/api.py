"""REST API: a thin HTTP layer over the same library calls as the `rag` CLI.

Run with `uvicorn app.api:app` (or `make run`). OpenAPI docs at /docs. Read endpoints are open;
admin endpoints (ingest, delete) need the `X-API-Key` header to equal `RAG_API_KEY`, and are
refused outright when no key is configured, so a fresh install never exposes writes by accident.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from rag.config import Settings, get_settings
from rag.embed import get_embedder
from rag.ingest.job import ingest
from rag.retrieve import MODES, Retriever
from rag.store import SQLITE_MAX_INT, IndexBusy, ModelMismatch, Store, StoreError
from rag.types import Hit

MAX_QUERY_CHARS = 2000
MAX_PATHS = 100
MAX_PATH_CHARS = 4096


class SearchRequest(BaseModel):
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(5, ge=1, le=100)
    mode: Literal[MODES] = "hybrid"  # type: ignore[valid-type]  # the retriever's own list
    mmr_lambda: float | None = Field(None, ge=0.0, le=1.0)


class SearchResponse(BaseModel):
    query: str
    mode: str
    results: list[Hit]  # the library dataclass: document, page and character span to cite


class IngestRequest(BaseModel):
    paths: list[Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]] = Field(
        ..., min_length=1, max_length=MAX_PATHS
    )
    prune: bool = False


class Services:
    """The open index and embedder, shared by all requests; re-synced when another process writes.

    The index is opened without a model check, so listing and stats work on an index built with
    any embedding model (as `rag docs` / `rag stats` do) and never load the embedder; only search
    checks the model and loads it, on first use.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._store: Store | None = None
        self._retriever: Retriever | None = None

    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store(self.settings.index_dir, embedding_model=None, readonly=True)
            else:
                self._store.refresh()
            return self._store

    def retriever(self) -> Retriever:
        store = self.store()
        model = self.settings.embedding_model
        if store.embedding_model != model:  # its vectors would not be comparable with the queries'
            raise ModelMismatch(
                f"index {store.index_dir} was built with embedding model {store.embedding_model!r}, "
                f"the server is configured with {model!r}; search needs the index's model "
                f"(RAG_EMBEDDING_MODEL) or another index directory"
            )
        with self._lock:
            if self._retriever is None:
                try:
                    embedder = get_embedder(model, self.settings.device)
                except ValueError as exc:  # the configured model cannot be loaded here
                    raise HTTPException(503, str(exc)) from None
                self._retriever = Retriever(store, embedder)
            return self._retriever

    def writer(self) -> Store:
        return Store(self.settings.index_dir, embedding_model=None, readonly=False, create=False)


def create_app(settings: Settings | None = None) -> FastAPI:
    services = Services(settings or get_settings())
    api = FastAPI(
        title="rag",
        summary="Self-hosted retrieval-augmented generation",
        version="0.1.0",
    )

    @api.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> JSONResponse:
        # A missing index, another ingest running or an index of another embedding model are
        # conditions of the server, not crashes.
        status = 409 if isinstance(exc, IndexBusy | ModelMismatch) else 503
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    def require_admin(x_api_key: Annotated[str | None, Header()] = None) -> None:
        expected = services.settings.api_key
        if not expected:
            raise HTTPException(403, "admin endpoints are disabled: set RAG_API_KEY on the server")
        if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    @api.get("/health")
    def health() -> dict:
        return {"status": "ok", "index": str(services.settings.index_dir)}

    @api.post("/v1/search", response_model=SearchResponse)
    def search(req: SearchRequest) -> SearchResponse:
        if not req.query.strip():
            raise HTTPException(422, "query is blank")
        hits = services.retriever().search(req.query, k=req.k, mode=req.mode, mmr_lambda=req.mmr_lambda)
        return SearchResponse(query=req.query, mode=req.mode, results=hits)

    @api.get("/v1/documents")
    def documents() -> list[dict]:
        return [d.to_dict() for d in services.store().documents()]

    @api.get("/v1/stats")
    def stats() -> dict:
        return services.store().stats()

    @api.post("/v1/ingest", dependencies=[Depends(require_admin)])
    def ingest_paths(req: IngestRequest) -> dict:
        paths = [allowed_path(p, services.settings.ingest_roots) for p in req.paths]
        return ingest(paths, services.settings, prune=req.prune).to_dict()

    @api.delete("/v1/documents/{doc_id}", dependencies=[Depends(require_admin)])
    def delete(doc_id: Annotated[int, PathParam(ge=1, le=SQLITE_MAX_INT)]) -> dict:
        with services.writer() as store:
            record = store.find_document(doc_id)
            if record is None:
                raise HTTPException(404, f"no document with id {doc_id}")
            store.delete_document(record.id)
        return {"deleted": {"id": record.id, "path": record.path}}

    return api


def allowed_path(raw: str, roots: list[Path]) -> Path:
    """Resolve `raw` and refuse anything outside the configured ingest roots (no `..` escapes)."""
    if not raw.strip() or "\x00" in raw:
        raise HTTPException(422, f"invalid path {raw!r}")
    try:
        path = Path(raw).expanduser().resolve()
        resolved_roots = [r.expanduser().resolve() for r in roots]
        if not any(path == r or path.is_relative_to(r) for r in resolved_roots):
            allowed = ", ".join(map(str, resolved_roots)) or "none"
            raise HTTPException(
                403, f"{raw!r} is outside the allowed ingest roots ({allowed}; RAG_INGEST_ROOTS)"
            )
        exists = path.exists()
    except (OSError, RuntimeError) as exc:  # unknown ~user, name too long, ...
        raise HTTPException(422, f"invalid path {raw!r}: {exc}") from None
    if not exists:
        raise HTTPException(404, f"path not found: {raw}")
    return path


app = create_app()
