"""Fan-in of one HTTP request's engine streams (a batch of prompts) plus its client's disconnect.

Every stream is pumped by a task into one asyncio queue, and so is the ASGI `http.disconnect`
message: the handler waits on a single queue, and a client that goes away is noticed at once,
even while its request is still queued, without polling. close() aborts whatever is unfinished.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from pagedserve.async_engine import RequestStream
from pagedserve.outputs import RequestOutput


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before its answer was complete."""


_DONE = object()


class MergedStreams:
    """Deltas of several RequestStreams as (stream index, delta), in arrival order."""

    def __init__(self, streams: list[RequestStream], receive: Callable[[], Awaitable[dict]] | None = None) -> None:
        self.streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        if receive is not None:
            self._tasks.append(asyncio.create_task(self._watch(receive)))

    async def _pump(self, index: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait((index, delta))
            self._queue.put_nowait((index, _DONE))
        except Exception as e:  # the engine failed this request: the consumer raises it
            self._queue.put_nowait((index, e))

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._queue.put_nowait((-1, ClientDisconnected()))
                return

    def __aiter__(self) -> "MergedStreams":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        """Raises StopAsyncIteration once every stream finished, ClientDisconnected, or the engine's error."""
        while self._open:
            index, item = await self._queue.get()
            if item is _DONE:
                self._open -= 1
                continue
            if isinstance(item, Exception):
                raise item
            return index, item
        raise StopAsyncIteration

    def close(self) -> None:
        """Abort unfinished streams (their KV blocks return to the pool) and stop the pumps."""
        for s in self.streams:
            s.abort()
        for t in self._tasks:
            t.cancel()
