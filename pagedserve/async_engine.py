"""AsyncEngine: the LLMEngine step loop on a background thread, driven from asyncio.

The engine is not thread-safe, so one thread owns it: every add and abort reaches that thread
through a command queue, and every output goes back to the asking event loop through
`loop.call_soon_threadsafe`. The loop thread sleeps on a condition while there is nothing to do.

    stream = await engine.add_request(prompt, params, request_id)  # raises ValueError / QueueFullError
    try:
        async for delta in stream: ...                                # RequestOutput deltas
    finally:
        stream.abort()                                               # no-op once finished
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pagedserve.engine import StepError
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.01  # when requests wait but no step could be scheduled (should not last)


class QueueFullError(RuntimeError):
    """The engine already holds max_waiting requests that are not running yet."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or the engine broke); the request cannot go on."""


class RequestFailedError(RuntimeError):
    """The engine step computing this request raised; the request was aborted, the engine goes on."""


@dataclass(eq=False)
class _Add:
    request_id: str
    prompt: object
    params: SamplingParams
    cache_salt: str | None
    grammar: object               # the compiled structured_outputs, or None
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future      # set to None, or to the exception add_request raised
    outputs: asyncio.Queue        # RequestOutput deltas, or an exception that ends the stream


@dataclass(eq=False)
class _Abort:
    request_id: str


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> bool:
    """Run fn(*args) on loop's thread; False when that loop is gone."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the loop is closed
        return False


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile; its abort is queued behind this add
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class RequestStream:
    """The deltas of one request, as an async iterator; abort() stops the request at once."""

    def __init__(self, engine: "AsyncEngine", request_id: str, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self._aborted = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._aborted:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop generating (its KV blocks go back to the pool); nothing happens once finished."""
        if not self.finished and not self._aborted:
            self._aborted = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Owns an LLMEngine and the one thread allowed to touch it.

    max_waiting: most requests accepted but not running yet; beyond it add_request raises
    QueueFullError (None: no limit).
    """

    def __init__(self, engine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        # Read-only facts, safe to share: the engine never changes them.
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self._cond = threading.Condition()
        self._inbox: deque[_Add | _Abort] = deque()
        self._streams: dict[str, _Add] = {}  # touched by the loop thread only
        self._stats: dict = engine.stats(detailed=False)   # replaced (never mutated) by the loop thread
        self._stop = False
        self._closed = False  # set under _cond when the loop ends: no command is taken after it
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Grammars compile here, not on the engine thread (whose steps every request waits on) nor the event loop.
        self._grammar_compiler = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-grammar")

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._grammar_compiler.shutdown(wait=False, cancel_futures=True)
        if self._thread is None or not self._thread.is_alive():  # a step still running owns the workers
            self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def stats(self) -> dict:
        """The engine's stats() as of its last step (or last add/abort)."""
        return self._stats

    # ---- requests -----------------------------------------------------------------------------
    async def add_request(self, prompt, params: SamplingParams | BeamSearchParams, request_id: str,
                          cache_salt: str | None = None, compiled_grammar=None) -> RequestStream:
        """Queue a request and wait until the engine accepted it. compiled_grammar: params.structured_outputs
        as compile_grammar returned it, if the caller has it already.

        Raises ValueError (malformed, or can never fit: prompt plus max_tokens over the context
        window), QueueFullError, or EngineDeadError.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        grammar = compiled_grammar
        # A grammar is compiled here, so the engine thread need not.
        if grammar is None and isinstance(params, SamplingParams) and params.structured_outputs is not None:
            grammar = await self.compile_grammar(params.structured_outputs)
        cmd = _Add(request_id, prompt, params, cache_salt, grammar, loop, loop.create_future(), asyncio.Queue())
        self._submit(cmd)
        try:
            await cmd.accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # queued behind the add, so it always finds it
            raise
        return RequestStream(self, request_id, cmd.outputs)

    async def compile_grammar(self, grammar: StructuredOutputsParams):
        """The CompiledGrammar, compiled (and cached) off the engine thread; raises GrammarError (a ValueError)
        saying why it cannot be followed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._grammar_compiler, self.engine.structured_output.compile, grammar)

    async def generate(self, prompt, params: SamplingParams, request_id: str,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas; when the consumer stops early, the request is aborted."""
        stream = await self.add_request(prompt, params, request_id, cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; an unknown or finished id is ignored."""
        self._submit(_Abort(request_id))

    def _submit(self, cmd) -> None:
        with self._cond:
            if self._closed:
                if isinstance(cmd, _Add):
                    raise EngineDeadError("the engine is not running")
                return
            self._inbox.append(cmd)
            self._cond.notify()

    # ---- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._stop and not engine.has_unfinished_requests():
                        self._cond.wait()
                    if self._stop:
                        break
                    commands = list(self._inbox)
                    self._inbox.clear()
                if commands:
                    self._handle(commands)
                if engine.has_unfinished_requests():
                    steps = engine.num_steps
                    try:
                        outputs = engine.step()
                    except StepError as e:  # the step's requests were aborted; the rest go on
                        self._fail(e.request_ids, e)
                    except Exception as e:  # not even a step began (a bug): every live request fails
                        self._fail(list(self._streams), e)
                    else:
                        self._dispatch(outputs)
                        if engine.num_steps == steps:  # nothing could be scheduled: wait, do not spin
                            with self._cond:
                                self._cond.wait(_IDLE_WAIT_S)
                self._stats = engine.stats(detailed=False)
            self._close(EngineDeadError("the server is shutting down"))
        except BaseException as e:
            logger.exception("the engine loop failed; no more requests will be served")
            self._dead = e
            self._close(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))

    def _fail(self, request_ids: list[str], cause: Exception) -> None:
        """A step raised: abort these requests and end their streams, then go on if the engine is consistent."""
        logger.exception("an engine step failed; aborting %d requests, the others go on", len(request_ids))
        detail = cause if isinstance(cause, StepError) else f"{type(cause).__name__}: {cause}"
        error = RequestFailedError(f"the engine step computing this request failed: {detail}")
        for rid in request_ids:
            cmd = self._streams.pop(rid, None)
            if cmd is not None:
                _deliver(cmd.loop, cmd.outputs.put_nowait, error)
        self.engine.abort_request(request_ids)
        self.engine.check_invariants()  # raises if the engine cannot go on: the loop then stops

    def _handle(self, commands: list) -> None:
        engine = self.engine
        waiting = self._stats.get("num_requests_waiting", 0)
        for cmd in commands:
            if isinstance(cmd, _Abort):
                if self._streams.pop(cmd.request_id, None) is not None:
                    engine.abort_request(cmd.request_id)
                continue
            error = None
            if self.max_waiting is not None and waiting >= self.max_waiting:
                error = QueueFullError(f"the server is at capacity: {waiting} requests are already waiting "
                                       f"(--max-waiting {self.max_waiting}); retry later")
            else:
                try:
                    engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cache_salt=cmd.cache_salt,
                                       compiled_grammar=cmd.grammar)
                    self._streams[cmd.request_id] = cmd
                    waiting += 1
                except Exception as e:  # ValueError: the request's fault; anything else still stays its own
                    error = e
            if not _deliver(cmd.loop, _settle, cmd.accepted, error) and error is None:
                self._streams.pop(cmd.request_id, None)
                engine.abort_request(cmd.request_id)
        self._stats = engine.stats(detailed=False)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            cmd = self._streams.get(out.request_id)
            if cmd is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            if not _deliver(cmd.loop, cmd.outputs.put_nowait, out) and not out.finished:
                self._streams.pop(out.request_id, None)
                self.engine.abort_request(out.request_id)

    def _close(self, error: BaseException) -> None:
        with self._cond:
            self._closed = True
            pending = [c for c in self._inbox if isinstance(c, _Add)]
            self._inbox.clear()
        for cmd in pending:
            _deliver(cmd.loop, _settle, cmd.accepted, error)
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for cmd in streams.values():
            _deliver(cmd.loop, cmd.outputs.put_nowait, error)
        try:
            self.engine.abort_request(list(streams))
        except Exception:  # the engine may be broken; the requests are failed either way
            logger.exception("aborting the failed requests raised too")
