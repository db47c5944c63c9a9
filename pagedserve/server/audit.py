"""The audit log: one JSON line per request, written when its response ends.

A pure ASGI middleware opens a record for each request (reachable by handlers as
`request.state.audit`), fills in the status code the response starts with (and the error code
of an error answer), and writes the line when the app is done with the request: streams, client
disconnects, refusals (401, 404, 408, 413, 503 ...) and cancellations included. Handlers add the
identity, ids, model and token counts. The API key is never recorded, only its name.

Every line is ASCII JSON (a client's lone surrogate is escaped, never an error) and every string
field is capped, so no client can make a line fail or grow without bound. The file is private to
the server's user (mode 0600). A request that never got as far as the app (a connection cut for
its slow headers) is recorded by the connection itself, with no endpoint.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone

CLIENT_CLOSED = 499  # status recorded when the client went away before its answer
MAX_FIELD_CHARS = 256  # longest string field written; longer ones are cut, with a marker
MAX_ERROR_BODY = 64 * 1024  # error bodies up to this size are read for their error code

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pagedserve.access")


def new_record(endpoint: str | None) -> dict:
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "identity": None, "request_id": None, "endpoint": endpoint, "model": None,
        "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
        "finish_reason": None, "status_code": None, "error": None, "latency_s": None,
    }


def finish_reason_of(reasons: list[str | None]) -> str | None:
    """One value for the record: the reason all choices share, else the distinct ones joined by ','."""
    distinct = sorted({r for r in reasons if r})
    return ",".join(distinct) if distinct else None


def _capped(value):
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return f"{value[:MAX_FIELD_CHARS]}...[{len(value) - MAX_FIELD_CHARS} more chars]"
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if not isinstance(value, str):  # nothing else is expected: its text, capped
        return _capped(str(value))
    return value


def audit_line(record: dict) -> str:
    """The record as one line of ASCII JSON, every string field capped."""
    return json.dumps({k: _capped(v) for k, v in record.items()}, ensure_ascii=True)


class AuditLog:
    """Appends JSON lines to a private file; safe to call from any thread, never raises.

    `pending` counts the records opened but not written yet: close() after they are all written
    (wait_written), so a request that ends while the server shuts down still gets its line.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = self._open()
        self.pending = 0

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        except OSError:  # not ours to change (a shared file, say): still write to it
            logger.warning("cannot make the audit log %s private (mode 0600)", self.path)
        return os.fdopen(fd, "a", encoding="ascii", buffering=1)

    def write(self, record: dict) -> None:
        try:
            line = audit_line(record)
            with self._lock:
                if self._file.closed:  # a line after close (a task cancelled late): append it anyway
                    with self._open() as f:
                        f.write(line + "\n")
                else:
                    self._file.write(line + "\n")
        except Exception:  # the log must never take a request down with it
            logger.exception("could not write an audit line")

    async def wait_written(self, timeout: float) -> None:
        """Wait (at most timeout seconds) until every opened record is written."""
        deadline = time.monotonic() + timeout
        while self.pending > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.pending > 0:
            logger.warning("closing the audit log with %d requests still unfinished", self.pending)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _error_code(body: bytes) -> str | None:
    """The code (else the type) of an OpenAI error body; None if it is not one."""
    try:
        error = json.loads(body)["error"]
        return error.get("code") or error.get("type")
    except Exception:
        return None


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
        error_body: list[bytes] = []  # the body of an error answer, for its code

        async def send_and_note(message):
            if message["type"] == "http.response.start" and record["status_code"] is None:
                record["status_code"] = message["status"]
                if message["status"] >= 400:
                    error_body.append(b"")
            elif message["type"] == "http.response.body" and error_body and record["error"] is None:
                error_body[0] += message.get("body", b"")
                if len(error_body[0]) > MAX_ERROR_BODY:
                    error_body.clear()
                elif not message.get("more_body", False):
                    record["error"] = _error_code(error_body[0])
            await send(message)

        self.log.pending += 1
        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if record["status_code"] is None:  # cut off (the server stopped) before any answer
                record["status_code"], record["error"] = 503, "cancelled"
            raise
        finally:
            if record["status_code"] is None:
                record["status_code"] = 500
            record["latency_s"] = round(time.monotonic() - start, 6)
            self.log.pending -= 1
            self.log.write(record)


class AccessLogMiddleware:
    """ASGI middleware: one access log line per response, `client - "METHOD /path HTTP/1.1" status`.

    Never the query string (a client may put a key there), and the path escaped and capped, so a
    line is one line. Uvicorn's own access log (which prints the query) stays off.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_and_log(message):
            if message["type"] == "http.response.start":
                client = scope.get("client")
                path = _capped(ascii(scope["path"])[1:-1])
                access_logger.info('%s - "%s %s HTTP/%s" %d', f"{client[0]}:{client[1]}" if client else "-",
                                   scope["method"], path, scope["http_version"], message["status"])
            await send(message)

        return await self.app(scope, receive, send_and_log)
