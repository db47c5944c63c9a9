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

The log is a hash chain: every line carries its sequence number (`seq`) and the SHA-256 of the line
before it (`prev`; zeros for the first line of a log), and FILE.head holds the last line's number
and hash, so that `pagedserve audit verify FILE` (verify_chain) finds an edited, inserted, deleted
or reordered line and a truncated tail. A chain is continued across restarts from the file's last
line. With a key (--audit-key-file) the head carries an HMAC, so that rewriting the whole file and
its head needs the key too.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone

CLIENT_CLOSED = 499  # status recorded when the client went away before its answer
MAX_FIELD_CHARS = 256  # longest string field written; longer ones are cut, with a marker
MAX_ERROR_BODY = 64 * 1024  # error bodies up to this size are read for their error code
GENESIS = "0" * 64  # the `prev` of a log's first line

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pagedserve.access")


# The error codes of refusals by the key check and the identity's policy: a line with one of these was denied
# by that rule; every other line was allowed (it may still have failed, as its status and error say).
POLICY_RULES = ("invalid_api_key", "forbidden", "model_not_allowed", "concurrency_limit_exceeded",
                "token_quota_exceeded", "max_tokens_over_policy", "n_over_policy")


def new_record(endpoint: str | None) -> dict:
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "identity": None, "request_id": None, "endpoint": endpoint, "model": None,
        "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
        "finish_reason": None, "status_code": None, "error": None, "latency_s": None,
    }


def decision(record: dict) -> dict:
    """The access decision of a finished record: {"decision": "allowed"} or {"decision": "denied", "rule": ...}."""
    if record.get("error") in POLICY_RULES:
        return {"decision": "denied", "rule": record["error"]}
    return {"decision": "allowed", "rule": None}


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


def line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("ascii")).hexdigest()


def head_record(seq: int, last_hash: str, key: bytes | None) -> dict:
    """FILE.head's content: the last line's number and hash, with an HMAC of both under the key, if any."""
    head = {"seq": seq, "hash": last_hash}
    if key is not None:
        head["hmac"] = hmac.new(key, f"{seq}:{last_hash}".encode(), hashlib.sha256).hexdigest()
    return head


def _last_line(path: str) -> str | None:
    """The file's last non-empty line (read from the end: a log may be large)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = pos = f.tell()
            while pos > 0:
                pos = max(0, pos - 65536)
                f.seek(pos)
                lines = f.read(end - pos).splitlines()
                if len(lines) > 1 or pos == 0:
                    return next((ln.decode("ascii", "replace") for ln in reversed(lines) if ln.strip()), None)
    except FileNotFoundError:
        return None
    return None


class AuditLog:
    """Appends hash-chained JSON lines to a private file; safe to call from any thread, never raises.

    `pending` counts the records opened but not written yet: close() after they are all written
    (wait_written), so a request that ends while the server shuts down still gets its line.
    """

    def __init__(self, path: str, key: bytes | None = None) -> None:
        self.path = path
        self.key = key
        self._lock = threading.Lock()
        self._file = self._open()
        self.pending = 0
        last = _last_line(path)
        self._prev = GENESIS if last is None else line_hash(last)
        try:
            self._seq = json.loads(last)["seq"] + 1 if last is not None else 0
        except (ValueError, KeyError, TypeError):  # a log from before the chain, or a broken last line
            self._seq = 0

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        except OSError:  # not ours to change (a shared file, say): still write to it
            logger.warning("cannot make the audit log %s private (mode 0600)", self.path)
        return os.fdopen(fd, "a", encoding="ascii", buffering=1)

    def write(self, record: dict) -> None:
        try:
            with self._lock:
                line = audit_line({**record, "seq": self._seq, "prev": self._prev})
                if self._file.closed:  # a line after close (a task cancelled late): append it anyway
                    with self._open() as f:
                        f.write(line + "\n")
                else:
                    self._file.write(line + "\n")
                self._prev, seq = line_hash(line), self._seq
                self._seq += 1  # the chain moves on with the line, whatever becomes of the head
                try:
                    self._write_head(head_record(seq, self._prev, self.key))
                except OSError:
                    logger.exception("could not write the audit log's head")
        except Exception:  # the log must never take a request down with it
            logger.exception("could not write an audit line")

    def _write_head(self, head: dict) -> None:
        tmp = f"{self.path}.head.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(json.dumps(head) + "\n")
        os.replace(tmp, f"{self.path}.head")

    def reopen(self) -> None:
        """Open the path again (after logrotate moved the file away): the new file goes on with the chain, its
        first line's prev being the hash of the moved file's last line."""
        with self._lock:
            self._file.close()
            self._file = self._open()

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


def verify_chain(paths: list[str], key: bytes | None = None) -> tuple[int, list[str]]:
    """Check audit logs' chain (several files: a rotated log, oldest first) and the last one's head: (lines read,
    problems; none if untouched). Reports the first break of the chain (a line edited, inserted, deleted or
    moved) and a tail cut off or added."""
    prev, expect_seq, total = GENESIS, 0, 0
    for path in paths:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                total += 1
                where = f"{path}:{n}"
                line = raw.rstrip(b"\n").decode("ascii", "replace")
                try:
                    rec = json.loads(line)
                    seq, rec_prev = rec["seq"], rec["prev"]
                except (ValueError, KeyError, TypeError):
                    return total, [f"{where}: not a line of the chain (no seq and prev): edited or inserted"]
                if seq != expect_seq:
                    what = ("missing before it (or this file continues another: verify them together, oldest "
                            "first)" if seq > expect_seq else "out of order or inserted")
                    return total, [f"{where}: seq {seq} where {expect_seq} was due: lines {what}"]
                if rec_prev != prev:
                    before = "the previous file's last line" if n == 1 else f"line {n - 1}"
                    return total, [f"{where}: its prev is not the hash of the line before it: {before} was "
                                   "edited, or this line inserted"]
                prev, expect_seq = line_hash(line), seq + 1
    head_path = f"{paths[-1]}.head"
    try:
        with open(head_path) as f:
            head = json.load(f)
        head_seq, head_hash = int(head["seq"]), str(head["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return total, [f"{head_path} is missing or unreadable: a cut-off tail cannot be ruled out"]
    if key is not None and head != head_record(head_seq, head_hash, key):
        return total, ["the head's HMAC does not match the key: the head (and perhaps the log) was rewritten"]
    last_seq = expect_seq - 1
    if head_seq > last_seq:
        return total, [f"the log ends at seq {last_seq} but its head says {head_seq}: the tail was cut off"]
    if head_seq < last_seq or head_hash != prev:
        return total, [f"the log's last line is not the one its head names (seq {head_seq}): lines appended "
                       "afterwards, or the last line edited"]
    return total, []


def summarize(paths: list[str], window_s: float | None = None) -> list[dict]:
    """Per identity (and per time window of window_s seconds, if given): requests, denials (4xx answers),
    errors (5xx), prompt and completion tokens, and the latency's mean and maximum; oldest window first."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    when = datetime.fromisoformat(rec["time"]).timestamp()
                except (ValueError, KeyError, TypeError):
                    continue  # summarize what can be read; `audit verify` judges the rest
                if rec.get("error") == "anomaly":
                    continue  # a line about an identity, not a request
                start = when - when % window_s if window_s else None
                row = rows.setdefault((start, str(rec.get("identity"))), {
                    "window_start": start, "identity": str(rec.get("identity")), "requests": 0, "denied": 0,
                    "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "latency_sum_s": 0.0,
                    "latency_max_s": 0.0})
                status = rec.get("status_code") or 0
                row["requests"] += 1
                row["denied"] += 400 <= status < 500
                row["errors"] += status >= 500
                row["prompt_tokens"] += rec.get("prompt_tokens") or 0
                row["completion_tokens"] += rec.get("completion_tokens") or 0
                latency = rec.get("latency_s") or 0.0
                row["latency_sum_s"] += latency
                row["latency_max_s"] = max(row["latency_max_s"], latency)
    out = []
    for key in sorted(rows, key=lambda k: (k[0] or 0, k[1])):
        row = rows[key]
        row["latency_mean_s"] = row.pop("latency_sum_s") / row["requests"]
        out.append(row)
    return out


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
            if record["status_code"] is None:  # cut off (the server stopped, the identity revoked) before any answer
                record["status_code"] = 503
            record["error"] = record["error"] or "cancelled"
            raise
        finally:
            if record["status_code"] is None:
                record["status_code"] = 500
            record["latency_s"] = round(time.monotonic() - start, 6)
            record.update(decision(record))
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
