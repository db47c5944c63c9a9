"""The server's life: admission while serving, and a clean shutdown.

On SIGINT/SIGTERM (or should_exit) the server stops admitting at once: every new request, on a new
connection or a kept-alive one, gets an OpenAI-shaped 503 and its connection is closed. The
requests already admitted get --shutdown-timeout seconds to finish; then the engine is shut down,
which ends every open stream with EngineDeadError("the server is shutting down"), so a stream
still running gets an SSE error event and `data: [DONE]`, and a non-streaming request a JSON 503.
Only then does uvicorn's own shutdown run (close the connections, the app's lifespan: the audit log
is closed after its last line). A request still not done FINISH_MARGIN_S later is cancelled and,
if nothing was sent yet, answered 503.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import uvicorn

from pagedserve.server.args import ServerConfig
from pagedserve.server.body_limit import CLOSE
from pagedserve.server.connections import OVER_CAPACITY, protocol_class
from pagedserve.server.protocol import OpenAIError

logger = logging.getLogger("pagedserve.server")
FINISH_MARGIN_S = 5.0  # after the engine stopped: time for the ended requests to send their answers


class Lifecycle:
    """Whether the server admits requests, and how many admitted ones are still running."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0


class AdmissionMiddleware:
    """ASGI middleware: 503 while shutting down or over --max-connections; counts what it admits."""

    def __init__(self, app, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            return await OpenAIError(503, "the server is shutting down; retry on another replica or later",
                                     "server_error", code="shutting_down").send(send, CLOSE)
        limit = scope.get("state", {}).get(OVER_CAPACITY)
        if limit is not None:
            return await OpenAIError(503, f"the server has too many open connections (--max-connections {limit}); "
                                          f"retry later", "server_overloaded", code="too_many_connections"
                                     ).send(send, CLOSE)
        started = False

        async def send_noting(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send_noting)
        except asyncio.CancelledError:  # only uvicorn's last-resort cancel at shutdown does this
            if started:
                raise
            await OpenAIError(503, "the server stopped before this request was answered", "server_error",
                              code="shutting_down").send(send, CLOSE)
        finally:
            self.lifecycle.in_flight -= 1


class PagedServer(uvicorn.Server):
    """uvicorn's Server with the drain described above; on_started runs once it listens."""

    def __init__(self, config: uvicorn.Config, app, shutdown_timeout: float,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.lifecycle: Lifecycle = app.state.lifecycle
        self.engine = app.state.engine
        self.shutdown_timeout = shutdown_timeout
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets=None) -> None:
        lifecycle = self.lifecycle
        lifecycle.draining = True
        if lifecycle.in_flight:
            logger.info("shutting down: %d requests in flight get up to %gs to finish (--shutdown-timeout)",
                        lifecycle.in_flight, self.shutdown_timeout)
        deadline = time.monotonic() + self.shutdown_timeout
        while lifecycle.in_flight and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.02)
        if lifecycle.in_flight:
            logger.warning("%d requests did not finish within --shutdown-timeout %gs; ending them",
                           lifecycle.in_flight, self.shutdown_timeout)
        await asyncio.to_thread(self.engine.shutdown)  # open streams end with EngineDeadError
        await super().shutdown(sockets)


def build_server(app, config: ServerConfig, on_started: Callable[[], None] | None = None,
                 **uvicorn_options) -> PagedServer:
    """The uvicorn server for an app of build_app, with this config's connection limits and timeouts."""
    protocol = protocol_class(config.header_read_timeout, config.body_read_timeout, config.max_connections,
                              app.state.audit_log)
    options = dict(host=config.host, port=config.port, log_level=config.log_level, http=protocol,
                   access_log=False,  # it prints query strings; ours (AccessLogMiddleware) does not
                   timeout_keep_alive=config.keep_alive_timeout, timeout_graceful_shutdown=FINISH_MARGIN_S)
    return PagedServer(uvicorn.Config(app, **{**options, **uvicorn_options}), app, config.shutdown_timeout,
                       on_started)
