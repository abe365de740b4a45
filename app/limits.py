"""Limits in front of the API: request bodies over RAG_MAX_REQUEST_BYTES are refused with 413
before the app reads them, and access log lines cut long URLs.

A body with a Content-Length over the limit is refused before its first byte is read; a chunked
body (no Content-Length) is counted as it arrives and refused at the first byte over the limit, so
three 1 GB uploads cost the server no more memory than three small ones. A client that sends its
whole body before it reads the answer (most do) would see a broken connection instead of the 413
if the server closed at once, so a body at most DRAIN_BYTES over is read and dropped first (for at
most DRAIN_S seconds); the 413 then closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_BYTES = 8 * 1024 * 1024
DRAIN_S = 5.0
MAX_LOGGED_URL = 200  # characters of a URL an access log line keeps


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(
            413,
            f"request body over the limit of {limit:,} bytes (RAG_MAX_REQUEST_BYTES)",
            headers={"Connection": "close"},
        )


async def drain(receive: Receive) -> None:
    """Read and drop the rest of a request body, up to DRAIN_BYTES bytes or DRAIN_S seconds."""

    async def read() -> None:
        dropped = 0
        while dropped <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            dropped += len(message.get("body", b""))

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), DRAIN_S)


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`. `reject` renders the 413 response for the
    request's path when the middleware answers by itself (a declared length over the limit); a
    counted one raises BodyTooLarge inside the app, whose exception handlers render it."""

    def __init__(self, app: ASGIApp, max_bytes: int, reject: Callable[[Scope, HTTPException], Response]):
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # a body a little over the limit is read and dropped so that its client gets the answer;
            # none is sent before "100 Continue" when the client asks for one
            if (
                int(declared) <= self.max_bytes + DRAIN_BYTES
                and headers.get("expect", "").lower() != "100-continue"
            ):
                await drain(receive)
            return await self.reject(scope, BodyTooLarge(self.max_bytes))(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await drain(receive)
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class ShortUrls(logging.Filter):
    """Cuts the URL of uvicorn's access log lines to MAX_LOGGED_URL characters: a 100 KB query
    string must not make a 100 KB log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):  # uvicorn's format
            path = args[2]
            if len(path) > MAX_LOGGED_URL:
                cut = f"{path[:MAX_LOGGED_URL]}…(+{len(path) - MAX_LOGGED_URL} chars)"
                record.args = (*args[:2], cut, *args[3:])
        return True


def shorten_access_log_urls() -> None:
    """Install ShortUrls on uvicorn's access logger once (logging config keeps a logger's filters)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ShortUrls) for f in access.filters):
        access.addFilter(ShortUrls())
