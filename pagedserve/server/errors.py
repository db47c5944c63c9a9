"""OpenAIError: an error answered in OpenAI's shape with an HTTP status.

Apart from protocol.py (which re-exports it) because it needs nothing but the standard library: the command
line builds its parser from modules that raise it (auth.py, body_limit.py), and must build it where pydantic
and the server's other packages are not installed (`pagedserve generate` on a machine without them).
"""
from __future__ import annotations

import json


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # sent with the answer, from a middleware or a handler (Retry-After, say)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        """The JSON body; ASCII, so no client text (a lone surrogate, say) can fail to encode."""
        return json.dumps(self.body(), ensure_ascii=True).encode()

    async def send(self, send, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer through a raw ASGI `send` (for middlewares, which run outside FastAPI's handlers)."""
        body = self.encode()
        await send({"type": "http.response.start", "status": self.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *self.headers,
            *headers]})
        await send({"type": "http.response.body", "body": body})
