"""The FastAPI app (routes, error shapes, middlewares) and `pagedserve serve`'s run_server."""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shlex

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedserve
from pagedserve.async_engine import AsyncEngine
from pagedserve.config import EngineConfig
from pagedserve.server.args import ServerConfig, server_config
from pagedserve.server.audit import AuditLog, AuditMiddleware
from pagedserve.server.auth import AuthMiddleware
from pagedserve.server.body_limit import BodyLimitMiddleware
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
def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(OpenAIError(status, message, type, param, code).body(), status_code=status)


def build_app(engine: AsyncEngine, config: ServerConfig | None = None, tokenizer=None) -> FastAPI:
    """The app around a (not yet started) AsyncEngine; the app's lifespan starts and stops it."""
    config = config or ServerConfig()
    tokenizer = tokenizer if tokenizer is not None else copy.deepcopy(engine.engine.tokenizer)
    metrics = ServerMetrics(engine.stats)
    serving = OpenAIServing(engine, tokenizer, config, metrics)
    audit_log = AuditLog(config.audit_log) if config.audit_log else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            if audit_log is not None:
                audit_log.close()

    app = FastAPI(title="pagedserve", version=pagedserve.__version__, lifespan=lifespan)
    app.state.engine, app.state.serving, app.state.metrics = engine, serving, metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)  # innermost: after the key check
    app.add_middleware(AuthMiddleware, identities=config.identities)
    app.add_middleware(AuditMiddleware, log=audit_log)  # outermost: it sees the 401s too

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

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
        if not engine.is_running:
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return serving.detokenize(body)

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
    """`pagedserve serve`: load the engine, then serve until interrupted."""
    import uvicorn

    from pagedserve.engine import LLMEngine

    config = server_config(args)  # before the model loads: a bad keys file fails at once
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = AsyncEngine(LLMEngine(engine_config), max_waiting=config.max_waiting)
    app = build_app(engine, config)
    names = config.served_model_names or (engine.model_name,)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: now say how to call it
                print(usage_banner(config, names[0]), flush=True)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                   timeout_graceful_shutdown=5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for; the shutdown was clean
        pass
    return 0 if server.started else 1
