"""The audit log: one JSON line per request, written when its response ends.

A pure ASGI middleware opens a record for each request (reachable by handlers as
`request.state.audit`), fills in the status code the response starts with, and writes the
line when the app is done with the request, streams and client disconnects included. Handlers
add the identity, ids, model and token counts. The API key is never recorded, only its name.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

CLIENT_CLOSED = 499  # status recorded when the client went away before its answer


def new_record(endpoint: str) -> dict:
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "identity": None, "request_id": None, "endpoint": endpoint, "model": None,
        "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
        "finish_reason": None, "status_code": None, "latency_s": None,
    }


def finish_reason_of(reasons: list[str | None]) -> str | None:
    """One value for the record: the reason all choices share, else the distinct ones joined by ','."""
    distinct = sorted({r for r in reasons if r})
    return ",".join(distinct) if distinct else None


class AuditLog:
    """Appends JSON lines to a file; safe to call from any thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


class AuditMiddleware:
    """ASGI middleware: one audit record per HTTP request to a path not in `skip`."""

    def __init__(self, app, log: AuditLog | None, skip: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.log = log
        self.skip = skip

    async def __call__(self, scope, receive, send):
        if self.log is None or scope["type"] != "http" or scope["path"] in self.skip:
            return await self.app(scope, receive, send)
        record = new_record(scope["path"])
        scope.setdefault("state", {})["audit"] = record
        start = time.monotonic()

        async def send_and_note(message):
            if message["type"] == "http.response.start" and record["status_code"] is None:
                record["status_code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if record["status_code"] is None:
                record["status_code"] = 500
            record["latency_s"] = round(time.monotonic() - start, 6)
            self.log.write(record)
