"""REST API: a thin HTTP layer over the same library calls as the `rag` CLI.

Run with `rag serve` (or `uvicorn app.api:app`, `make run`). OpenAPI docs at /docs. Read endpoints
are open; admin endpoints (ingest, delete) need the key `RAG_API_KEY`, as `X-API-Key: <key>` or
`Authorization: Bearer <key>` (what OpenAI clients send), and are refused outright when no key is
configured, so a fresh install never exposes writes by accident. Request bodies are capped
(RAG_MAX_REQUEST_BYTES, app/limits.py); errors have the shape each client expects (app/errors.py).

`POST /v1/ask` answers with our own reader model, as JSON or as a server-sent event stream; with
no reader model it returns the matching passages instead (`answer: null`, `reader_unavailable`). The
model is loaded on the first question and shared; it is not re-entrant, so one answer is generated
at a time (a lock), at most RAG_ANSWER_QUEUE answers wait or run (more get a 503 with Retry-After,
so waiting requests never tie up the server's worker threads), and a streamed answer stops
generating as soon as its client goes away.

`POST /v1/chat/completions` is the same answer in OpenAI's chat completion format, so OpenAI
clients can use it: the last user message is the question, and both endpoints share one code path
(queue, lock, stream worker); only the wire format differs (`AskEvents` vs `ChatCompletion`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal, Protocol

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.background import BackgroundTask

from app.errors import ApiError, install_error_handlers, openai_error, reader_unavailable, reject
from app.limits import BodyLimit, shorten_access_log_urls
from rag.answer import DEFAULT_MAX_NEW_TOKENS, Answer, Reader, ReaderUnavailable, ask_stream, drain
from rag.config import Settings, get_settings
from rag.embed import get_embedder
from rag.fallback import search_only
from rag.ingest.job import ProgressEvent, ingest
from rag.llm.generate import GenerationConfig
from rag.retrieve import MODES, Retriever
from rag.store import SQLITE_MAX_INT, ModelMismatch, Store
from rag.types import Hit

MAX_QUERY_CHARS = 2000
MAX_PATHS = 100
MAX_PATH_CHARS = 4096
# The `rag` extension of chat completions: the answer's grounding, as /v1/ask gives it
RAG_EXTENSION_KEYS = (
    "abstained",
    "citations",
    "sources",
    "finish_reason",
    "quote",
    "evidence",
    "cut_sources",
)
MAX_ASK_K = 20  # more sources than a 1k-token context can show only get cut from the prompt
MAX_NEW_TOKENS = 512
MAX_MESSAGES = 50
MAX_MESSAGE_CHARS = 20_000  # earlier turns are not read, but a request body stays bounded
MAX_PARTS = 50  # content parts of one message
MAX_STOPS = 4  # as OpenAI
MODEL_ID = "rag"  # what /v1/models lists and chat completions answer as by default
PROGRESS_EVERY_S = 0.25  # at most ~4 ingest progress events a second on a stream

log = logging.getLogger("rag.api")


Mode = Literal[MODES]  # type: ignore[valid-type]  # the retriever's own list


class SearchRequest(BaseModel):
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(5, ge=1, le=100)
    mode: Mode = "hybrid"
    mmr_lambda: float | None = Field(None, ge=0.0, le=1.0)


class SearchResponse(BaseModel):
    query: str
    mode: str
    results: list[Hit]  # the library dataclass: document, page and character span to cite


# Options /v1/ask and /v1/chat/completions share, with the same limits.
AnswerK = Annotated[int, Field(ge=1, le=MAX_ASK_K, description="Passages retrieved and shown to the model.")]
NewTokens = Annotated[
    int | None,
    Field(
        ge=1,
        le=MAX_NEW_TOKENS,
        description=f"Longest answer; default: the reader's ({DEFAULT_MAX_NEW_TOKENS} tokens).",
    ),
]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 = greedy (deterministic).")]


def generation_config(reader: Reader, max_new_tokens: int | None, **options) -> GenerationConfig:
    """The request's options over the reader's defaults (None: the reader's answer room)."""
    max_new = max_new_tokens if max_new_tokens is not None else reader.max_new_tokens
    return GenerationConfig(max_new_tokens=max_new, **options)


class AskRequest(BaseModel):
    question: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARS)
    ]
    k: AnswerK = 5
    mode: Mode = "hybrid"
    max_new_tokens: NewTokens = None
    temperature: Temperature = 0.0
    stream: bool = Field(False, description="Answer as a text/event-stream of token events.")

    def generation(self, reader: Reader) -> GenerationConfig:
        return generation_config(reader, self.max_new_tokens, temperature=self.temperature)


class TextPart(BaseModel):
    """One part of a message's content; OpenAI's other kinds (images, audio, files) are refused."""

    type: str = Field(max_length=32)
    text: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] = ""

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: only 'text'")
        return self


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new name for system
    # None: an assistant turn that only called tools; other fields (name, tool_calls) are ignored
    content: (
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
        | Annotated[list[TextPart], Field(max_length=MAX_PARTS)]
        | None
    ) = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


Stop = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with `usage` and no choices, before [DONE]


class ChatRequest(BaseModel):
    """OpenAI's chat completion request. Honoured: the fields below. Any other field (tools,
    logprobs, penalties, response_format, user, ...) is accepted and ignored, as OpenAI clients
    send many; `k` and `mode` are our extensions. Only the last message, the user's question, is
    read: retrieval and the reader answer it alone (system messages and earlier turns are ignored).
    """

    model_config = ConfigDict(extra="ignore")

    model: str = Field(MODEL_ID, max_length=256, description="Echoed back; the server's reader answers.")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_tokens: NewTokens = None
    max_completion_tokens: NewTokens = None  # OpenAI's newer name for max_tokens
    temperature: Temperature | None = None  # None: 0, greedy, as /v1/ask (OpenAI's default is 1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=1, description="One answer per request.")
    stop: Stop | Annotated[list[Stop], Field(min_length=1, max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    k: AnswerK = 5
    mode: Mode = "hybrid"

    @model_validator(mode="after")
    def _ends_with_a_question(self) -> ChatRequest:
        last = self.messages[-1].role
        if last != "user":
            raise ValueError(f"the last message must be the user's question; it is from {last!r}")
        if not self.question:
            raise ValueError("the last user message is empty")
        if len(self.question) > MAX_QUERY_CHARS:
            raise ValueError(
                f"the question (the last user message) has {len(self.question)} characters, "
                f"at most {MAX_QUERY_CHARS}"
            )
        if None not in (self.max_tokens, self.max_completion_tokens) and (
            self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens differ: give one")
        return self

    @property
    def question(self) -> str:
        return self.messages[-1].text().strip()

    def generation(self, reader: Reader) -> GenerationConfig:
        return generation_config(
            reader,
            self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            temperature=self.temperature or 0.0,
            top_p=self.top_p,
            seed=self.seed,
            stop_strings=[self.stop] if isinstance(self.stop, str) else self.stop or (),
        )


class AnswerRequest(Protocol):
    """What the shared answer path reads from a request of either endpoint."""

    question: str
    k: int
    mode: str
    stream: bool

    def generation(self, reader: Reader) -> GenerationConfig: ...


class Events(Protocol):
    """How one endpoint writes a streamed answer as server-sent events."""

    def opening(self) -> list[dict]: ...
    def piece(self, text: str) -> dict: ...
    def closing(self, answer: Answer) -> list[dict]: ...
    def failure(self, detail: str) -> dict: ...


class AskEvents:
    """/v1/ask: token events, then the JSON answer as one event."""

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return {"type": "token", "text": text}

    def closing(self, answer: Answer) -> list[dict]:
        return [{"type": "answer", **answer.to_dict()}]

    def failure(self, detail: str) -> dict:
        return {"type": "error", "detail": detail}


class ChatCompletion:
    """/v1/chat/completions: one completion (id, time, model) as a whole or as chunks. OpenAI's
    finish reasons are "stop" and "length", so ours that say why nothing was generated
    ("no_sources", "no_room") are "stop" there and given as they are in the `rag` extension."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id, self.created, self.model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def finish_reason(answer: Answer) -> str:
        return "length" if answer.finish_reason == "length" else "stop"

    @staticmethod
    def usage(answer: Answer) -> dict:
        prompt, completion = int(answer.timings["prompt_tokens"]), int(answer.timings["new_tokens"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def rag(answer: Answer) -> dict:
        whole = answer.to_dict()
        return {key: whole[key] for key in RAG_EXTENSION_KEYS}

    def whole(self, answer: Answer) -> dict:
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason(answer)}
        return {
            **self._head("chat.completion"),
            "choices": [choice],
            "usage": self.usage(answer),
            "rag": self.rag(answer),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def opening(self) -> list[dict]:
        return [self.chunk({"role": "assistant"})]

    def piece(self, text: str) -> dict:
        return self.chunk({"content": text})

    def closing(self, answer: Answer) -> list[dict]:
        last = {**self.chunk({}, self.finish_reason(answer)), "rag": self.rag(answer)}
        if not self.include_usage:
            return [last]
        return [last, {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage(answer)}]

    def failure(self, detail: str) -> dict:
        return openai_error(500, detail)  # what OpenAI clients raise on


class IngestRequest(BaseModel):
    paths: list[Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]] = Field(
        ..., min_length=1, max_length=MAX_PATHS
    )
    prune: bool = False
    stream: bool = Field(
        False, description="Progress as server-sent events (`progress`, then `report`), for long ingests."
    )


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
        self._reader_lock = threading.Lock()  # loading, apart from generating
        self._reader: Reader | None = None
        self.generating = threading.Lock()  # the model is not re-entrant: one answer at a time
        # Answers running or waiting for `generating`; each waiting one holds a thread.
        self.answer_slots = threading.BoundedSemaphore(settings.answer_queue)
        # Each open stream waits for its next piece in one of these threads: a pool of their own,
        # so streams never queue behind each other in the event loop's small default pool.
        self.stream_readers = ThreadPoolExecutor(settings.answer_queue, thread_name_prefix="rag-stream")
        self.answered = 0  # answers generated to the end
        self.cancelled = 0  # streamed answers stopped early because their client went away

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

    def reader(self) -> Reader:
        """The reader model, loaded on first use; ReaderUnavailable when there is none, or a corrupt
        or foreign checkpoint. A missing model is not remembered: one trained after the server
        started is picked up by the next question, without a restart."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = Reader.load(self.settings.model_dir, self.settings.device)
            return self._reader

    def model_card(self) -> dict:
        """The reader as OpenAI's /v1/models lists a model, plus whether it can answer now."""
        model_dir = self.settings.model_dir
        available = self._reader is not None or model_dir.is_dir()
        created = int(model_dir.stat().st_mtime) if model_dir.is_dir() else 0
        status = {"model_dir": str(model_dir), "available": available, "loaded": self._reader is not None}
        return {"id": MODEL_ID, "object": "model", "created": created, "owned_by": "rag", "rag": status}

    def reader_status(self) -> dict:
        return {
            "model_dir": str(self.settings.model_dir),
            "loaded": self._reader is not None,
            "busy": self.generating.locked(),
            "answered": self.answered,
            "cancelled": self.cancelled,
        }


def create_app(settings: Settings | None = None) -> FastAPI:
    services = Services(settings or get_settings())
    api = FastAPI(
        title="rag",
        summary="Self-hosted retrieval-augmented generation",
        version="0.1.0",
    )
    api.add_middleware(BodyLimit, max_bytes=services.settings.max_request_bytes, reject=reject)
    install_error_handlers(api)
    shorten_access_log_urls()

    def require_admin(
        x_api_key: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> None:
        expected = services.settings.api_key
        if not expected:
            raise HTTPException(403, "admin endpoints are disabled: set RAG_API_KEY on the server")
        scheme, _, token = (authorization or "").partition(" ")
        given = x_api_key if x_api_key is not None else token.strip() if scheme.lower() == "bearer" else None
        if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send it as X-API-Key: <key> or Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @api.get("/v1/health")
    @api.get("/health", include_in_schema=False)  # the name before /v1
    def health() -> dict:
        return {
            "status": "ok",
            "index": str(services.settings.index_dir),
            "reader": services.reader_status(),
        }

    @api.get("/v1/models")
    def models() -> dict:
        """The reader, as OpenAI's model list (front ends ask for it first); `rag.available` says
        whether a reader model is there to answer."""
        return {"object": "list", "data": [services.model_card()]}

    @api.get("/v1/models/{model_id}")
    def model(model_id: Annotated[str, PathParam(max_length=256)]) -> dict:
        if model_id != MODEL_ID:
            raise HTTPException(404, f"no model {model_id!r}: this server's reader is {MODEL_ID!r}")
        return services.model_card()

    @api.get("/v1/admin", dependencies=[Depends(require_admin)])
    def admin_check() -> dict:
        """200 when the request carries the admin key (the web UI checks a key with it)."""
        return {"admin": True}

    @api.post("/v1/search", response_model=SearchResponse)
    def search(req: SearchRequest) -> SearchResponse:
        if not req.query.strip():
            raise HTTPException(422, "query is blank")
        hits = services.retriever().search(req.query, k=req.k, mode=req.mode, mmr_lambda=req.mmr_lambda)
        return SearchResponse(query=req.query, mode=req.mode, results=hits)

    def answer_with_reader(req: AnswerRequest, events: Events) -> Answer | StreamingResponse:
        """The one answer path of both endpoints: the Answer, or (`stream`) its event stream.
        ReaderUnavailable before any retrieval when no reader could answer."""
        reader = services.reader()
        retriever = services.retriever()
        question, opts = req.question, {"k": req.k, "mode": req.mode, "config": req.generation(reader)}
        if not services.answer_slots.acquire(blocking=False):
            raise ApiError(
                503,
                "the reader is busy with other answers; retry shortly",
                "reader_busy",
                {"Retry-After": "2"},
            )
        release = services.answer_slots.release
        try:  # bad input the model notices (max_new_tokens beyond its context) raises before generating
            # retrieves and builds the prompt now, outside the generation lock
            pieces = ask_stream(question, retriever, reader, **opts)
            if req.stream:  # generated in a worker thread
                response = stream_answer(pieces, services, release, events)
                release = None  # the worker gives the slot back when it ends
                return response
            with services.generating:
                result = drain(pieces)
                services.answered += 1
            return result
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        finally:
            if release is not None:
                release()

    @api.post("/v1/ask")
    def answer(req: AskRequest):
        """Retrieve `k` passages, answer from them with [n] citations (the shape of `rag ask --json`).

        With `stream: true` the answer comes as server-sent events: `{"type": "token", "text"}` per
        piece of text, then `{"type": "answer", ...}` (the JSON answer), then `[DONE]`; an error
        after the stream started is a `{"type": "error", "detail"}` event.

        Without a reader model: the passages that match, as the answer's `sources` with `answer:
        null` and `reader_unavailable` (the reason); streamed as that one `answer` event.
        """
        try:
            result = answer_with_reader(req, AskEvents())
        except ReaderUnavailable as exc:
            found = search_only(req.question, services.retriever(), str(exc), k=req.k, mode=req.mode)
            return sse_response([sse({"type": "answer", **found}), sse("[DONE]")]) if req.stream else found
        return result if isinstance(result, StreamingResponse) else result.to_dict()

    @api.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        """The /v1/ask answer to the last user message, as OpenAI's `chat.completion` (or, with
        `stream: true`, `chat.completion.chunk` events, then `[DONE]`), plus a `rag` field with
        the citations, the sources and whether the reader abstained. Errors are OpenAI's
        `{"error": {"message", "type", "param", "code"}}`, before the stream as after it started;
        no reader model is a 503 that tells clients not to retry.
        """
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        completion = ChatCompletion(req.model, include_usage)
        try:
            result = answer_with_reader(req, completion)
        except ReaderUnavailable as exc:
            raise reader_unavailable(exc) from None
        return result if isinstance(result, StreamingResponse) else completion.whole(result)

    @api.get("/v1/documents")
    def documents() -> list[dict]:
        return [d.to_dict() for d in services.store().documents()]

    @api.get("/v1/stats")
    def stats() -> dict:
        return services.store().stats()

    @api.post("/v1/ingest", dependencies=[Depends(require_admin)])
    def ingest_paths(req: IngestRequest):
        """The ingest report, as `rag ingest --json`; with `stream: true`, server-sent events: a
        `progress` event (files and chunks done, the current file and its chunks) at most every
        0.25 s, then the `report` (or an `error` with its `detail`), then `[DONE]`."""
        paths = [allowed_path(p, services.settings.ingest_roots) for p in req.paths]
        if req.stream:
            return ingest_stream(paths, services.settings, req.prune, services.stream_readers)
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


def sse(data: dict | str) -> str:
    """One server-sent event; non-ASCII text stays as is (the stream is UTF-8)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_response(
    events: AsyncIterator[str] | Iterable[str], background: BackgroundTask | None = None
) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy buffering
        background=background,
    )


async def queued(items: queue.Queue, pool: Executor) -> AsyncIterator[tuple[str, object]]:
    """(kind, value) items of a queue a worker thread fills, up to its ("end", None); each wait runs
    in `pool`, never in the event loop or its small default pool."""
    loop = asyncio.get_running_loop()
    while (item := await loop.run_in_executor(pool, items.get))[0] != "end":
        yield item


def stream_answer(
    pieces: Generator[str, None, Answer],
    services: Services,
    release: Callable[[], None],
    events_format: Events,
) -> StreamingResponse:
    """A streamed answer as server-sent events, written by `events_format`.

    Generation runs in a worker thread, started at once, that holds the generation lock and hands
    each piece to the response through a queue; when it ends it calls `release` (the answer slot)
    even if the response was never sent. When the client goes away, Starlette stops the response
    and runs its background task, which sets `stop` (as does the event generator's `finally`,
    whichever comes first); the worker checks it before every token, so an abandoned stream costs
    at most one more decoding step, then closes the generator and releases the lock.
    """
    events_queue: queue.Queue[tuple[str, object]] = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            with services.generating:
                try:
                    while not stop.is_set():  # set already if the client left while this waited
                        events_queue.put(("token", next(pieces)))
                    services.cancelled += 1
                    log.info("answer stream stopped: the client disconnected")
                except StopIteration as end:
                    services.answered += 1
                    events_queue.put(("answer", end.value))
                except Exception as exc:  # the stream already sent 200: say what failed, never hang
                    log.exception("answer stream failed")
                    events_queue.put(("error", f"{type(exc).__name__}: {exc}"))
                finally:
                    pieces.close()
        finally:
            release()
            events_queue.put(("end", None))  # wakes a reader of the queue whatever happened

    threading.Thread(target=work, name="rag-answer", daemon=True).start()

    async def events() -> AsyncIterator[str]:
        try:
            for event in events_format.opening():
                yield sse(event)
            async for kind, value in queued(events_queue, services.stream_readers):
                if kind == "token":
                    yield sse(events_format.piece(value))
                    continue
                last = events_format.closing(value) if kind == "answer" else [events_format.failure(value)]
                for event in last:
                    yield sse(event)
                yield sse("[DONE]")
                break
        finally:
            stop.set()

    return sse_response(events(), BackgroundTask(stop.set))


def ingest_stream(paths: list[Path], settings: Settings, prune: bool, pool: Executor) -> StreamingResponse:
    """An ingest run in a worker thread, its progress as server-sent events (see /v1/ingest). The
    run goes on to its end if the client leaves: each file is committed on its own anyway."""
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    last = 0.0

    def on_progress(ev: ProgressEvent) -> None:
        nonlocal last
        now = time.monotonic()
        if ev.stage or ev.files_done == ev.files_total or now - last >= PROGRESS_EVERY_S:
            last = now
            events.put(("progress", dataclasses.asdict(ev)))

    def work() -> None:
        try:
            events.put(("report", ingest(paths, settings, prune=prune, on_progress=on_progress).to_dict()))
        except Exception as exc:  # the stream already sent 200: say what failed (index busy, ...)
            log.warning("streamed ingest failed: %s", exc)
            events.put(("error", {"detail": str(exc)}))
        finally:
            events.put(("end", None))

    threading.Thread(target=work, name="rag-ingest", daemon=True).start()

    async def stream() -> AsyncIterator[str]:
        async for kind, value in queued(events, pool):
            yield sse({"type": kind, **value})  # type: ignore[dict-item]
        yield sse("[DONE]")

    return sse_response(stream())


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
