"""BodyLimitMiddleware: a request body must be under --max-request-bytes and arrive within
--body-read-timeout seconds, or the request gets a 413 or a 408, never a full or endless read.

A declared Content-Length over the limit is refused before any byte is read; a chunked body is read
only up to the limit. The read deadline covers the whole body (a client dribbling one byte at a
time cannot hold the request open by staying just under a per-chunk timeout). Both refusals close
the connection, since the rest of the body is never read. The body is read here anyway (the JSON
handlers need all of it), then replayed to the app, whose later receive() calls go to the client as
before (disconnect detection).
"""
from __future__ import annotations

import asyncio
import time

from pagedserve.server.audit import CLIENT_CLOSED
from pagedserve.server.errors import OpenAIError

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_BODY_READ_TIMEOUT = 60.0
CLOSE = ((b"connection", b"close"),)


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int | None, read_timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
                                f"(--max-request-bytes)", "invalid_request_error", code="request_too_large")

    def _too_slow(self) -> OpenAIError:
        return OpenAIError(408, f"the request body did not arrive within {self.read_timeout:g} seconds "
                                f"(--body-read-timeout)", "invalid_request_error", code="request_timeout")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not (self.max_bytes or self.read_timeout):
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if self.max_bytes and declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self._too_large().send(send, CLOSE)
        deadline = time.monotonic() + self.read_timeout if self.read_timeout else None
        chunks, size, more = [], 0, True
        while more:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return await self._too_slow().send(send, CLOSE)
            if message["type"] != "http.request":  # the client left before sending it all
                audit = scope.get("state", {}).get("audit")
                if audit is not None:
                    audit["status_code"] = CLIENT_CLOSED
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if self.max_bytes and size > self.max_bytes:
                return await self._too_large().send(send, CLOSE)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
