"""The FastAPI app (routes, error shapes, middlewares) and `pagedserve serve`'s run_server."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import os
import shlex
import signal
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedserve
from pagedserve.async_engine import AsyncEngine
from pagedserve.config import EngineConfig
from pagedserve.server.args import ServerConfig, server_config
from pagedserve.server.anomaly import AnomalyDetector
from pagedserve.server.audit import AccessLogMiddleware, AuditLog, AuditMiddleware, new_record
from pagedserve.server.auth import AuthMiddleware, Identities, IdentityStore, keys_file_warning
from pagedserve.server.body_limit import BodyLimitMiddleware
from pagedserve.server.lifecycle import AdmissionMiddleware, Lifecycle, build_server
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        OpenAIError, TokenizeRequest)
from pagedserve.server.serving import OpenAIServing

logger = logging.getLogger("pagedserve.server")


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union an error came from in its location: 'str', 'list[int]'."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first wrong field, and that field's name (OpenAI's `param`)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    loc = [p for p in first.get("loc", ()) if p != "body"]
    field = []
    for p in loc:
        if _is_union_tag(p):
            break
        field.append(str(p))
    where = ".".join(field)
    same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:len(field)] == loc[:len(field)]]
    if any(_is_union_tag(p) for p in loc):  # several union members failed: say what is accepted
        tags = sorted({next(p for p in e["loc"] if _is_union_tag(p)) for e in same
                       if any(_is_union_tag(p) for p in e["loc"])})
        msg = f"invalid value; expected {' or '.join(tags)}"
    else:
        msg = first.get("msg", "invalid value")
    if not where:
        return f"the request body is invalid: {msg}", None
    return f"{where}: {msg}", where


def _error_response(error: OpenAIError) -> Response:
    """An OpenAI error as ASCII JSON: a client's text echoed in it (a lone surrogate) cannot fail to encode."""
    return Response(error.encode(), status_code=error.status, media_type="application/json",
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in error.headers})


def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> Response:
    return _error_response(OpenAIError(status, message, type, param, code))


def build_app(engine: AsyncEngine, config: ServerConfig | None = None, tokenizer=None,
              reload_identities: Callable[[], Identities] | None = None, watch: tuple[str, ...] = ()) -> FastAPI:
    """The app around a (not yet started) AsyncEngine; the app's lifespan starts and stops it.
    reload_identities: reads the keys and --auth-config again, on SIGHUP and when a file of `watch` changes
    (identities gone are revoked)."""
    config = config or ServerConfig()
    identities = IdentityStore(config.identities)
    tokenizer = tokenizer if tokenizer is not None else copy.deepcopy(engine.engine.tokenizer)
    metrics = ServerMetrics(engine.stats)
    serving = OpenAIServing(engine, tokenizer, config, metrics)
    audit_log = AuditLog(config.audit_log, config.audit_key) if config.audit_log else None
    lifecycle = Lifecycle()

    def reload() -> None:
        if audit_log is not None:  # logrotate's postrotate sends SIGHUP too
            try:
                audit_log.reopen()
            except OSError as e:
                logger.error("could not reopen the audit log %s: %s", audit_log.path, e)
        try:
            revoked = identities.replace(reload_identities())
        except Exception as e:  # a broken file keeps the identities in force
            logger.error("could not reload the identities, keeping the current ones: %s", e)
            return
        logger.warning("identities reloaded (SIGHUP or a changed file)%s",
                       f"; revoked: {', '.join(revoked)}" if revoked else "")

    def stamp(path: str):
        try:
            st = os.stat(path)
            return st.st_mtime_ns, st.st_size
        except OSError:  # gone for a moment (an editor's rename): as good as a change
            return None

    async def watch_files() -> None:
        """Reload when a watched file has changed (its mtime or size) and then stayed the same for a second, so
        that a file caught half-written never revokes the identities written after that point."""
        last = seen = [stamp(p) for p in watch]
        while True:
            await asyncio.sleep(1.0)
            now = [stamp(p) for p in watch]
            if now == seen and now != last:  # changed, and steady since the last look
                last = now
                try:
                    reload()
                except Exception:
                    logger.exception("reloading the identities failed")
            seen = now

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        watcher = asyncio.create_task(watch_files()) if reload_identities is not None and watch else None
        app.state.loop = asyncio.get_running_loop()  # where a reload must run (it cancels this loop's tasks)
        if reload_identities is not None and hasattr(signal, "SIGHUP"):
            try:
                app.state.loop.add_signal_handler(signal.SIGHUP, reload)
            except (RuntimeError, ValueError):  # not the main thread (an embedded server): reload by hand
                logger.warning("SIGHUP cannot reload the identities here: not in the main thread")
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(engine.shutdown)  # open streams end with EngineDeadError
            serving.close()
            if audit_log is not None:  # after the last request's line
                await audit_log.wait_written(timeout=5.0)
                audit_log.close()

    # No /docs or /openapi.json: they would show every tenant the version and the API (the admin has /version).
    app = FastAPI(title="pagedserve", version=pagedserve.__version__, lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None)
    app.state.engine, app.state.serving, app.state.metrics = engine, serving, metrics
    app.state.audit_log, app.state.lifecycle = audit_log, lifecycle
    # innermost first: the body is read only after the key check; the audit sees every refusal
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes, read_timeout=config.body_read_timeout)
    app.state.identities, app.state.reload = identities, reload
    anomalies = AnomalyDetector(config.anomaly_window_s, config.anomaly_factor)

    def request_done(identity: str, status: int, usage: dict) -> None:
        metrics.observe_identity(identity, status, usage)
        found = anomalies.observe(identity, usage["prompt_tokens"] + usage["completion_tokens"])
        if found is not None and audit_log is not None:
            record = new_record(None)  # not a request: a line of its own, numbers flat so that they stay numbers
            record.update(identity=identity, error="anomaly", window_start=found["window_start"],
                          window_s=found["window_s"], window_tokens=found["tokens"],
                          baseline_tokens=found["baseline_tokens"], anomaly_factor=found["factor"])
            audit_log.write(record)

    app.add_middleware(AuthMiddleware, identities=identities, on_done=request_done)
    app.add_middleware(AdmissionMiddleware, lifecycle=lifecycle)
    if config.access_log:
        app.add_middleware(AccessLogMiddleware)
    app.add_middleware(AuditMiddleware, log=audit_log)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        if not engine.is_running:  # (while shutting down, the admission check answers 503 first)
            return _error(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": pagedserve.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        data, content_type = metrics.render()
        return Response(content=data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.get("/v1/models/{model_id:path}")  # :path, since served names may hold "/" (org/model)
    async def model(model_id: str):
        return serving.model(model_id)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return serving.tokenizer_info()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await serving.detokenize(body)

    return app


def usage_banner(config: ServerConfig, model: str) -> str:
    """How to call the server: its address, model name and a curl line."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    base = f"http://{host}:{config.port}"
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Tell me a joke."}], "max_tokens": 64}'
            % model)
    auth = ' -H "Authorization: Bearer $API_KEY"' if config.identities.required else ""
    lines = [f"pagedserve {pagedserve.__version__}: serving model {model!r} at {base}/v1 (OpenAI-compatible)",
             f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}",
             "  endpoints: /v1/models /v1/completions /v1/chat/completions /tokenize /detokenize "
             "/health /version /metrics"]
    if config.identities.required:
        lines.append(f"  API keys: {len(config.identities.keys)} configured; /health is open, the rest need one")
    return "\n".join(lines)


def run_server(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """`pagedserve serve`: load the engine, then serve until SIGINT/SIGTERM (see lifecycle.py)."""
    from pagedserve.engine import LLMEngine

    config = server_config(args)  # before the model loads: a bad keys file fails at once
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    warning = keys_file_warning(args.api_keys_file)
    if warning:
        logger.warning(warning)
    engine = AsyncEngine(LLMEngine(engine_config), max_waiting=config.max_waiting)
    app = build_app(engine, config, reload_identities=lambda: server_config(args).identities,
                    watch=tuple(p for p in (args.api_keys_file, args.auth_config) if p))
    names = config.served_model_names or (engine.model_name,)
    # listening: now say how to call it
    server = build_server(app, config, on_started=lambda: print(usage_banner(config, names[0]), flush=True))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for; the shutdown was clean
        pass
    return 0 if server.started else 1
