"""Error responses of the API, in the shape each client expects.

The OpenAI routes (/v1/chat/completions, /v1/models) answer errors as OpenAI does,
`{"error": {"message", "type", "param", "code"}}`, because OpenAI clients show that message and
nothing else; every other route keeps FastAPI's `{"detail": ...}`. An error that retrying cannot
fix carries `X-Should-Retry: false`, which OpenAI's clients obey instead of retrying a 503 with
backoff; one that can (the reader busy) carries `Retry-After` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from rag.answer import ReaderUnavailable
from rag.store import IndexBusy, ModelMismatch, StoreError

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/models")
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_CODES = {413: "request_too_large", 422: "invalid_request"}


class ApiError(HTTPException):
    """An HTTPException with a machine-readable `code` (e.g. "reader_unavailable")."""

    def __init__(self, status: int, detail: str, code: str, headers: Mapping[str, str] | None = None):
        super().__init__(status, detail, headers=dict(headers) if headers else None)
        self.code = code


def openai_error(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_text(errors: list[dict]) -> tuple[str, str | None]:
    """One message for OpenAI clients ("messages.0.role: Input should be ..."), and the first field."""
    fields = [".".join(str(p) for p in e.get("loc", ())[1:]) for e in errors]  # loc[0] is "body"
    message = "; ".join(
        f"{f}: {e.get('msg')}" if f else str(e.get("msg")) for f, e in zip(fields, errors, strict=True)
    )
    return message, fields[0] if fields and fields[0] else None


def error_response(
    path: str, status: int, detail: Any, headers: Mapping[str, str] | None = None, code: str | None = None
) -> JSONResponse:
    headers = dict(headers or {})
    if "retry-after" not in {k.lower() for k in headers}:
        headers["X-Should-Retry"] = "false"
    code = code or _CODES.get(status)
    if not path.startswith(OPENAI_ROUTES):
        return JSONResponse({"detail": detail}, status, headers)
    message, param = _validation_text(detail) if isinstance(detail, list) else (str(detail), None)
    return JSONResponse(openai_error(status, message, code, param), status, headers)


def reject(scope: Scope, exc: HTTPException) -> JSONResponse:
    """The response to an HTTPException raised outside the app's handlers (request limits)."""
    return error_response(scope["path"], exc.status_code, exc.detail, exc.headers)


def reader_unavailable(exc: ReaderUnavailable) -> ApiError:
    return ApiError(
        503,
        f"{exc} (retrying will not help until a reader model is saved there)",
        "reader_unavailable",
        {"X-Should-Retry": "false"},
    )


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(
            request.url.path, exc.status_code, exc.detail, exc.headers, getattr(exc, "code", None)
        )

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error_response(request.url.path, 422, errors)

    @api.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # A missing index, another ingest running or an index of another embedding model are
        # conditions of the server, not crashes.
        if isinstance(exc, IndexBusy):
            return error_response(request.url.path, 409, str(exc), {"Retry-After": "10"}, "index_busy")
        if isinstance(exc, ModelMismatch):
            return error_response(request.url.path, 409, str(exc), code="embedding_model_mismatch")
        return error_response(request.url.path, 503, str(exc), code="index_unavailable")

    @api.exception_handler(ReaderUnavailable)
    async def no_reader(request: Request, exc: ReaderUnavailable) -> JSONResponse:
        return await http_error(request, reader_unavailable(exc))
