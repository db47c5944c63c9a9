"""Connections: uvicorn's h11 protocol with a header read timeout and a connection limit.

Uvicorn has no timeout on reading a request's headers: its keep-alive timer is cancelled by any
byte, so a client sending one header byte every few seconds holds a connection (and a file
descriptor) forever, and a few thousand such clients exhaust the server. Here a timer starts when
a connection opens, or with the first byte of its next request, and the headers must be complete
before it fires; otherwise the connection gets a 408 and is closed (silently if it sent nothing).
The body has its own deadline (BodyLimitMiddleware), where the request is already an ASGI request;
and when the answer went out before the body was read (a 401), the rest of the body must follow
within that deadline too, or the connection is closed.

Over --max-connections open connections, a request is still read, then answered 503 by the app's
admission check (OpenAI-shaped and audited, unlike uvicorn's own plain-text limit_concurrency).
A malformed request gets an OpenAI-shaped 400. Both cuts here are audited, without an endpoint.
"""
from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from pagedserve.server.audit import AuditLog, new_record
from pagedserve.server.protocol import OpenAIError

logger = logging.getLogger(__name__)
OVER_CAPACITY = "pagedserve.over_capacity"  # scope["state"] key the admission check answers 503 for


class LimitedH11Protocol(H11Protocol):
    """One connection. Subclassed per server by protocol_class() with its settings."""

    header_timeout: float | None = None
    body_timeout: float | None = None
    max_connections: int | None = None
    audit_log: AuditLog | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn logs access lines, query strings (keys) included, whenever its access logger has a
        # handler, whatever access_log says: never (AccessLogMiddleware writes ours, without them)
        self.access_log = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False  # bytes of a request whose headers are not complete yet
        self._answered_early = False  # this request was answered before its body was read (a 401)
        self._unread_body_timer: asyncio.TimerHandle | None = None

    # the app a request runs: uvicorn reads self.app when a request's headers are complete
    @property
    def app(self):
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            return self._over_capacity
        return self._app

    @app.setter
    def app(self, value) -> None:
        self._app = value

    async def _over_capacity(self, scope, receive, send) -> None:
        scope.setdefault("state", {})[OVER_CAPACITY] = self.max_connections
        await self._app(scope, receive, send)

    # ---- the header timer -------------------------------------------------------------------
    def _arm(self) -> None:
        if self.header_timeout is not None and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._partial = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _stop_unread_body_timer(self) -> None:
        if self._unread_body_timer is not None:
            self._unread_body_timer.cancel()
            self._unread_body_timer = None

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._stop_unread_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # (part of) the next request's head
            self._arm()
            self._partial = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are complete
            self._disarm()
        elif self._header_timer is None and not self.transport.is_closing():
            # Back to waiting for a request within this call (a body finished after an early answer):
            # uvicorn arms no timer of its own here, so the next request's headers go on the clock.
            self._answered_early = False
            self._arm()
            self._partial = bool(self.conn.trailing_data[0])
        if self.conn.their_state is not h11.SEND_BODY:
            self._stop_unread_body_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        # a pipelined request already partly buffered: its headers are on the clock too
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm()
            self._partial = True
        # answered before its body was read (a 401): the rest may follow, but not forever
        self._answered_early = self.conn.their_state is h11.SEND_BODY
        if self._answered_early and self.body_timeout is not None:
            self._stop_unread_body_timer()
            self._unread_body_timer = self.loop.call_later(self.body_timeout, self._unread_body_timed_out)

    def _unread_body_timed_out(self) -> None:
        self._unread_body_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            logger.info("closing a connection still sending a body %gs after its answer", self.body_timeout)
            self.transport.close()

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._partial:
            logger.info("closing a connection whose request headers took over %gs", self.header_timeout)
            error = OpenAIError(408, f"the request headers did not arrive within {self.header_timeout:g} seconds "
                                     f"(--header-read-timeout)", "invalid_request_error", code="request_timeout")
            self._answer_raw(error)
            self._audit(error)
        self.transport.close()

    # ---- answers outside any request --------------------------------------------------------
    def _answer_raw(self, error: OpenAIError) -> None:
        """Write an error response as bytes (h11 cannot answer a request it has not read)."""
        body = error.encode()
        head = (f"HTTP/1.1 {error.status} {STATUS_PHRASES[error.status].decode()}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)

    def _audit(self, error: OpenAIError) -> None:
        if self.audit_log is not None:
            record = new_record(None)
            record.update(status_code=error.status, error=error.code, latency_s=0.0)
            self.audit_log.write(record)

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (malformed, or headers over h11's size limit)."""
        self._disarm()
        # Answer only a request nobody answered: a malformed body after an early answer (a 401) just closes.
        if (self.cycle is None or self.cycle.response_complete) and not self._answered_early:
            error = OpenAIError(400, f"invalid HTTP request: {msg}", "invalid_request_error",
                                code="invalid_http_request")
            self._answer_raw(error)
            self._audit(error)
        # else a request in flight sent a malformed body: closing tells it the client is gone
        self.transport.close()


def protocol_class(header_timeout: float | None, body_timeout: float | None, max_connections: int | None,
                   audit_log: AuditLog | None) -> type[LimitedH11Protocol]:
    """The protocol uvicorn makes each connection with, for one server's settings."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections,
        "audit_log": audit_log})
