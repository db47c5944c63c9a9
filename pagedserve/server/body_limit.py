"""BodyLimitMiddleware: a request body over --max-request-bytes gets a 413, never a full read.

A declared Content-Length over the limit is refused before any byte is read; a chunked body is read
only up to the limit. The body is read here anyway (the JSON handlers need all of it), then replayed
to the app, whose later receive() calls go to the client as before (disconnect detection).
"""
from __future__ import annotations

from pagedserve.server.protocol import OpenAIError

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int | None) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
                                f"(--max-request-bytes)", "invalid_request_error", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.max_bytes:
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self._too_large().send(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large().send(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
