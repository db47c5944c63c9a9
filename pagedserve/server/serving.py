"""The OpenAI endpoints' logic: a validated body in, engine streams, a JSON or SSE response out.

Every engine request of an HTTP request is aborted when that HTTP request ends, however it
ends (finished, client gone, error), so no input can leave blocks behind. Text work (tokenizing,
chat templates, decoding) runs on the TextWorker's thread, never on the event loop.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.async_engine import (AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError,
                                     RequestStream)
from pagedserve.llm import merge_output
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server import responses as R
from pagedserve.server.args import ServerConfig
from pagedserve.server.audit import CLIENT_CLOSED, finish_reason_of
from pagedserve.server.auth import ANONYMOUS, cache_salt
from pagedserve.server.policy import FULL_ACCESS, Policy
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        OpenAIError, TokenizeRequest, bad_request, cap, shorten)
from pagedserve.server.streams import ClientDisconnected, MergedStreams
from pagedserve.server.text import TextWorker
from pagedserve.server.tools import ToolCallStream, ToolPlan, parse_tool_plan, template_supports_tools
from pagedserve.structured_output import GrammarError


logger = logging.getLogger("pagedserve.server")

@dataclass
class _Job:
    """One HTTP generation request, ready for the engine."""
    chat: bool
    request_id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    num_logprobs: int | None
    stream: bool
    include_usage: bool
    salt: str | None
    echo: list[str] | None = None  # completions' echo: each prompt's text, put before its choices' text
    tools: ToolPlan | None = None   # chat's tool calling
    prompt_logprobs: bool = False   # vLLM's prompt_logprobs extra: return them with the choices
    grammar: object = None          # params.structured_outputs, compiled by check_params


def audit(request: Request, **fields) -> None:
    record = getattr(request.state, "audit", None)
    if record is not None:
        record.update(fields)


def _policy(request: Request) -> Policy:
    return getattr(request.state, "policy", FULL_ACCESS)


def engine_error(e: Exception) -> OpenAIError:
    """The OpenAI error for an engine failure that ended a request (not the request's fault)."""
    if isinstance(e, RequestFailedError):  # the step computing it raised; the engine goes on
        return OpenAIError(500, str(e), "server_error", None, "request_failed")
    return OpenAIError(503, str(e), "server_error", None, "engine_unavailable")  # EngineDeadError


class _SSEResponse(StreamingResponse):
    """A stream that runs on_close however the response ends, even if its body never started."""

    def __init__(self, content, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        # the HTTP side's own tokenizer copy, used on the text worker's thread only
        self.text = TextWorker(tokenizer, engine.max_model_len)
        self.config = config
        self.metrics = metrics
        self.model_names = config.served_model_names or (engine.model_name,)
        self.token_text = R.TokenText(tokenizer)  # decodes: call it on the text worker's thread
        self.created = int(time.time())  # the models' "created": when this server started serving them
        self.template_supports_tools = template_supports_tools(tokenizer)

    def close(self) -> None:
        self.text.close()

    # ---- plain endpoints ----------------------------------------------------------------------
    def check_model(self, model: str | None, policy: Policy = FULL_ACCESS) -> str:
        model = self.model_names[0] if model is None else model
        if model not in self.model_names:
            raise OpenAIError(404, f"the model {shorten(model)} does not exist; this server serves "
                                   f"{', '.join(repr(m) for m in self.model_names)}",
                              "invalid_request_error", "model", "model_not_found")
        if policy.models is not None and model not in policy.models:
            raise OpenAIError(403, f"this identity may not use the model {shorten(model)}", "permission_error",
                              "model", "model_not_allowed")
        return model

    @staticmethod
    def apply_policy(params, policy: Policy):
        """The request's sampling parameters within its identity's policy: max_tokens up to the ceiling (the
        ceiling when unset), n (or beam width) up to max_n; beyond either, a 400 naming the limit."""
        if policy.max_tokens is not None:
            if params.max_tokens is None:
                try:
                    params = dataclasses.replace(params, max_tokens=policy.max_tokens)
                except ValueError as e:  # min_tokens above the ceiling, say
                    raise OpenAIError(400, f"{e} (this identity may ask at most {policy.max_tokens} tokens)",
                                      "invalid_request_error", "max_tokens", "max_tokens_over_policy") from None
            elif params.max_tokens > policy.max_tokens:
                raise OpenAIError(400, f"max_tokens is {params.max_tokens}; this identity may ask at most "
                                       f"{policy.max_tokens}", "invalid_request_error", "max_tokens",
                                  "max_tokens_over_policy")
        if policy.max_n is not None and params.n > policy.max_n:
            raise OpenAIError(400, f"n is {params.n}; this identity may ask at most {policy.max_n}",
                              "invalid_request_error", "n", "n_over_policy")
        return params

    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(name) for name in self.model_names]}

    def model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: the card, or OpenAI's 404."""
        return self._model_card(self.check_model(model_id))

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "pagedserve", "root": name,
                "max_model_len": self.engine.max_model_len}

    def tokenizer_info(self) -> dict:
        """GET /tokenizer_info (vLLM's): what a client needs to tokenize as the server does without fetching
        the tokenizer from a hub (lm-eval's remote tokenizer reads eos/bos/pad and the chat template)."""
        tok = self.text.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                "model_max_length": self.engine.max_model_len, "vocab_size": self.engine.vocab_size,
                "add_bos_token": getattr(tok, "add_bos_token", None),
                "special_tokens": sorted(tok.all_special_tokens)}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = await self._chat_tokens([{"role": m.role, "content": m.text()} for m in body.messages],
                                          body.add_generation_prompt, None)
        else:
            self._check_length(len(body.prompt), "prompt")
            ids = await self.text.encode(body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        self.check_token_ids(body.tokens, "tokens")
        return {"prompt": await self.text.decode(body.tokens)}

    async def check_params(self, params: SamplingParams, grammar_field: str):
        """Token ids against the vocabulary, and the grammar compiled (cached, off the engine thread): a 400
        naming the field at fault. Returns the compiled grammar (None without one), for the engine."""
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_token_ids(list(params.logit_bias or ()), "logit_bias")
        if params.structured_outputs is None:
            return None
        try:
            return await self.engine.compile_grammar(params.structured_outputs)
        except GrammarError as e:
            raise bad_request(str(e), grammar_field) from None

    def check_token_ids(self, ids: list[int], field: str) -> None:
        """Every id a client sends must name a token of the vocabulary: 400 naming the field if not."""
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{field}: token ids must be in [0, {vocab}); got {shorten(bad, 32)}", field)

    def _check_length(self, num_chars: int, field: str, where: str | None = None) -> None:
        """Refuse, before tokenizing it, a text too long to ever fit the context window."""
        if not self.text.fits(num_chars):
            raise OpenAIError(400, f"{where or field}: this model's maximum context length is "
                                   f"{self.engine.max_model_len} tokens, and {num_chars:,} characters of text cannot "
                                   f"fit it (one token covers at most "
                                   f"{self.text.max_chars // self.engine.max_model_len} characters)",
                              "invalid_request_error", field, "context_length_exceeded")

    # ---- generation ---------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        audit(request, model=body.model)
        policy = _policy(request)
        model = self.check_model(body.model, policy)
        params = self.apply_policy(body.to_sampling_params(), policy)
        grammar = await self.check_params(params, body.grammar_field)
        batch = body.prompts()
        for i, p in enumerate(batch):
            where = "prompt" if len(batch) == 1 else f"prompt {i}"
            if not p:
                raise bad_request(f"{where}: the prompt is empty", "prompt")
            if isinstance(p, str):
                self._check_length(len(p), "prompt", where)
            elif len(p) >= self.engine.max_model_len:  # not even one token would fit after it
                raise OpenAIError(400, f"{where}: this model's maximum context length is {self.engine.max_model_len} "
                                       f"tokens, but the prompt has {len(p)}", "invalid_request_error", "prompt",
                                  "context_length_exceeded")
            else:
                self.check_token_ids(p, "prompt")
        prompts = []
        for p in batch:  # tokenized only once every prompt passed the checks
            if isinstance(p, str):
                p = await self.text.encode(p)
                if not p:
                    raise bad_request("the prompt is empty", "prompt")
            prompts.append(list(p))
        if policy.max_n is not None and len(prompts) * params.n > policy.max_n:  # every prompt gets n sequences
            raise OpenAIError(400, f"{len(prompts)} prompts x n={params.n} sequences; this identity may ask at most "
                                   f"{policy.max_n}", "invalid_request_error", "n", "n_over_policy")
        if body.use_beam_search:  # params.max_tokens: the policy's ceiling applies to beams too
            params = body.beam_search_params(params, params.max_tokens if params.max_tokens is not None else
                                             self.engine.max_model_len - max(map(len, prompts)), body.logprobs is not None)
        echo = None
        if body.echo:  # a text prompt echoes as sent; token ids as their text
            echo = [p if isinstance(p, str) else await self.text.decode(ids) for p, ids in zip(batch, prompts)]
        job = _Job(False, f"cmpl-{uuid.uuid4().hex}", model, prompts, params, body.logprobs, body.stream,
                   body.include_usage, self._salt(request, body.cache_salt), echo=echo,
                   prompt_logprobs=body.prompt_logprobs is not None, grammar=grammar)
        return await self._generate(job, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        audit(request, model=body.model)
        policy = _policy(request)
        model = self.check_model(body.model, policy)
        params = self.apply_policy(body.to_sampling_params(), policy)
        tools = parse_tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
        conversation, template_kwargs = body.conversation(), dict(body.chat_template_kwargs or {})
        grammar_field = body.grammar_field
        if tools is not None:
            tool_grammar = tools.structured_outputs()  # "required" and named calls follow their schemas
            if tool_grammar is not None:
                if params.structured_outputs is not None:
                    raise bad_request(f"tool_choice {tools.choice!r} constrains the output; it cannot be combined "
                                      f"with {grammar_field}", "tool_choice")
                params, grammar_field = dataclasses.replace(params, structured_outputs=tool_grammar), "tools"
            conversation, extra = tools.conversation(conversation, self.template_supports_tools)
            template_kwargs.update(extra)
            if tools.choice != "none":  # where <tool_call> is a special token, its text must survive decoding
                params = dataclasses.replace(params, skip_special_tokens=False)
        grammar = await self.check_params(params, grammar_field)
        ids = await self._chat_tokens(conversation, body.add_generation_prompt, template_kwargs or None)
        if body.use_beam_search:
            if tools is not None:
                raise bad_request("tools are not supported with use_beam_search", "tools")
            params = body.beam_search_params(params, params.max_tokens if params.max_tokens is not None else
                                             self.engine.max_model_len - len(ids), body.logprobs)
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = _Job(True, f"chatcmpl-{uuid.uuid4().hex}", model, [ids], params, num_logprobs, body.stream,
                   body.include_usage, self._salt(request, body.cache_salt),
                   prompt_logprobs=body.prompt_logprobs is not None, tools=tools, grammar=grammar)
        return await self._generate(job, request)

    async def _chat_tokens(self, conversation: list[dict], add_generation_prompt: bool,
                           kwargs: dict | None) -> list[int]:
        # the template copies every message's text: their total length bounds the rendered text's
        self._check_length(sum(len(m["content"]) for m in conversation), "messages")
        try:
            return await self.text.chat(conversation, add_generation_prompt, kwargs)
        except Exception as e:  # the template's own checks (roles, order) speak of the request
            raise bad_request(f"cannot apply the chat template: {cap(str(e), 512)}", "messages") from None

    def _salt(self, request: Request, request_salt: str | None) -> str | None:
        identity = getattr(request.state, "identity", ANONYMOUS)
        return cache_salt(identity, request_salt, self.config.shared_prefix_cache, _policy(request).cache_group)

    async def _start(self, job: _Job) -> list[RequestStream]:
        """Hand every prompt to the engine; all or none are accepted."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(job.prompts):
                rid = job.request_id if len(job.prompts) == 1 else f"{job.request_id}-{i}"
                streams.append(await self.engine.add_request(prompt, job.params, rid, job.salt, job.grammar))
        except BaseException as e:
            for s in streams:
                s.abort()
            if isinstance(e, ValueError):
                where = f"prompt {len(streams)}: " if len(job.prompts) > 1 else ""
                code = "context_length_exceeded" if "context length" in str(e) else None
                # The engine's messages start with the field at fault when it is not the prompt.
                param = "stop_token_ids" if str(e).startswith("stop_token_ids") else ("messages" if job.chat else "prompt")
                raise OpenAIError(400, where + str(e), "invalid_request_error", param, code) from None
            if isinstance(e, QueueFullError):
                raise OpenAIError(503, str(e), "server_overloaded", None, "queue_full") from None
            if isinstance(e, EngineDeadError):
                raise OpenAIError(503, str(e), "server_error", None, "engine_unavailable") from None
            raise
        return streams

    async def _generate(self, job: _Job, request: Request) -> Response:
        audit(request, request_id=job.request_id, model=job.model)
        reserve = getattr(request.state, "reserve_tokens", None)  # the identity's token quota (AuthMiddleware)
        if reserve is not None:  # the most this request can use, held until it ends
            n, max_tokens = job.params.n, job.params.max_tokens
            reserve(sum(len(p) + n * (max_tokens if max_tokens is not None else self.engine.max_model_len - len(p))
                        for p in job.prompts))
        streams = await self._start(job)
        usage = getattr(request.state, "usage", None)
        if usage is not None:  # a started prompt is paid for, even if the client leaves before its first token
            usage["prompt_tokens"] = sum(len(p) for p in job.prompts)
        merged = MergedStreams(streams, request.receive)
        outs: list[RequestOutput | None] = [None] * len(streams)
        timers = [self.metrics.tracker() for _ in streams]

        def take(i: int, delta: RequestOutput) -> None:
            timers[i].observe(delta)
            outs[i] = merge_output(outs[i], delta)

        def record(status: int | None = None, error: str | None = None) -> None:
            u = R.usage(outs)
            reasons = [c.finish_reason for o in outs if o for c in o.outputs]
            if status == CLIENT_CLOSED:  # what had not finished was aborted
                reasons = [r or "abort" for r in reasons] or ["abort"]
            audit(request, prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                  cached_tokens=u["prompt_tokens_details"]["cached_tokens"], finish_reason=finish_reason_of(reasons))
            usage = getattr(request.state, "usage", None)  # the identity's quota and counters (AuthMiddleware)
            if usage is not None:
                usage.update(prompt_tokens=max(usage["prompt_tokens"], u["prompt_tokens"]),
                             completion_tokens=u["completion_tokens"])
            if status is not None:
                audit(request, status_code=status)
            if error is not None:
                audit(request, error=error)

        if job.stream:
            return _SSEResponse(self._events(job, merged, take, record, outs), on_close=merged.close)
        try:
            async for i, delta in merged:
                take(i, delta)
        except ClientDisconnected:
            record(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except (EngineDeadError, RequestFailedError) as e:
            record()
            raise engine_error(e) from None
        finally:
            merged.close()
        record()
        if job.num_logprobs is not None or job.echo or job.prompt_logprobs:  # token texts: on the text worker
            return JSONResponse(await self.text.run(self._full_body, job, outs))
        return JSONResponse(self._full_body(job, outs))

    def _echo(self, job: _Job, i: int, out: RequestOutput) -> CompletionOutput | None:
        """Prompt i as an output to put before its choices (completions' echo)."""
        if job.echo is None:
            return None
        return CompletionOutput(0, job.echo[i], out.prompt_token_ids, logprobs=out.prompt_logprobs)

    def _full_body(self, job: _Job, outs: list[RequestOutput]) -> dict:
        n = job.params.n
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                if job.chat:
                    choices.append(R.chat_choice(i * n + c.index, c, job.num_logprobs, self.token_text, job.tools))
                else:
                    choice = R.completion_choice(i * n + c.index, c, job.num_logprobs, self.token_text,
                                                 echo=self._echo(job, i, out))
                    if job.prompt_logprobs:
                        choice["prompt_logprobs"] = R.prompt_logprobs(out.prompt_logprobs)
                    choices.append(choice)
        body = {"id": job.request_id, "object": "chat.completion" if job.chat else "text_completion",
                "created": int(time.time()), "model": job.model, "choices": choices, "usage": R.usage(outs)}
        if job.chat and job.prompt_logprobs:
            body["prompt_logprobs"] = R.prompt_logprobs(outs[0].prompt_logprobs)
        return body

    async def _events(self, job: _Job, merged: MergedStreams, take, record, outs):
        created = int(time.time())
        head = {"id": job.request_id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                "created": created, "model": job.model}
        extra = {"usage": None} if job.include_usage else {}
        n = job.params.n
        offsets: dict[int, int] = {}  # completions' text_offset per choice
        tool_streams = {k: ToolCallStream(job.tools) for k in range(len(job.prompts) * n)} if job.tools else None
        status, error_code = CLIENT_CLOSED, None
        try:
            if job.chat:
                for k in range(len(job.prompts) * n):
                    yield R.sse({**head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}], **extra})
            async for i, delta in merged:
                take(i, delta)
                if job.num_logprobs is not None or job.echo:  # token texts are decoded: on the text worker
                    choices = await self.text.run(self._delta_choices, job, i, delta, offsets, outs[i], tool_streams)
                else:
                    choices = self._delta_choices(job, i, delta, offsets, outs[i], tool_streams)
                for choice in choices:
                    yield R.sse({**head, "choices": [choice], **extra})
            if job.include_usage:
                yield R.sse({**head, "choices": [], "usage": R.usage(outs)})
            yield R.sse("[DONE]")
            status = 200
        except ClientDisconnected:
            pass
        except (EngineDeadError, RequestFailedError) as e:
            error = engine_error(e)
            yield R.sse(error.body())
            yield R.sse("[DONE]")
            status, error_code = error.status, error.code
        except Exception:  # a bug of ours mid-stream: the client still gets an OpenAI-shaped end, the log the 500
            logger.exception("a streamed response failed")
            error = OpenAIError(500, "the server failed while streaming this response", "server_error",
                                code="internal_error")
            yield R.sse(error.body())
            yield R.sse("[DONE]")
            status, error_code = error.status, error.code
        finally:
            merged.close()
            record(None if status == 200 else status, error_code)

    def _delta_choices(self, job: _Job, i: int, delta: RequestOutput, offsets: dict[int, int],
                       merged: RequestOutput, tool_streams: dict[int, ToolCallStream] | None) -> list[dict]:
        """The stream chunks' choices for one delta of prompt i (offsets: completions' text_offset per choice;
        merged: prompt i's output so far; tool_streams: chat's tool-call parser per choice)."""
        choices = []
        for c in delta.outputs:
            if not (c.text or c.finish_reason or (c.logprobs and c.token_ids)):
                continue
            k = i * job.params.n + c.index
            if job.chat:
                choices += R.chat_delta_choices(k, c, job.num_logprobs, self.token_text,
                                                tool_streams[k] if tool_streams else None)
            else:
                # the first chunk of each choice carries the echoed prompt
                echo = self._echo(job, i, merged) if k not in offsets and job.echo else None
                choice = R.completion_choice(k, c, job.num_logprobs, self.token_text, offsets.get(k, 0), echo)
                offsets[k] = offsets.get(k, 0) + sum(len(t) for t in (choice["logprobs"] or {}).get("tokens", []))
                choices.append(choice)
        return choices
