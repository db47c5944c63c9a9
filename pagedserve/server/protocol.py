"""The OpenAI request bodies (their field names and types) and OpenAI-shaped errors.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send extras keep
working; fields we know but cannot honour are rejected instead of silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pagedserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from pagedserve.server.errors import OpenAIError

MAX_N = 64  # most samples per prompt
MAX_ECHO_CHARS = 256  # most characters of a client's value repeated in an error message
MAX_LOGIT_BIAS = 300  # most logit_bias entries (OpenAI's limit)
# vLLM's structured_outputs keys we honour; others (structural_tag, whitespace_pattern, ...) are refused.
STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")
GUIDED_KINDS = ("json", "regex", "choice", "grammar")  # vLLM's earlier guided_<kind> fields
ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's chat roles


def shorten(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """repr(value) for an error message or a log line: at most `limit` characters, printable ASCII
    (repr escapes control characters and lone surrogates; ascii() the rest)."""
    return cap(ascii(value), limit)


def cap(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """text cut to `limit` characters, with a marker saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more chars]"


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


def _check_text(value: Any) -> None:
    """Raise ValueError if value holds a string that is not valid Unicode (a lone surrogate, which
    JSON's \\ud800 escapes can carry): no tokenizer, hash or log could take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"must be valid Unicode text: it contains the lone surrogate "
                             f"{value[e.start]!a} at index {e.start}") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)


class _Body(BaseModel):
    # Python's JSON parser takes Infinity and NaN: no float field accepts them
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if isinstance(value, list) and value and (isinstance(value[0], int) or (
                isinstance(value[0], list) and value[0] and isinstance(value[0][0], int))):
            return value  # token ids (pydantic made the list all ints): no need to walk millions of them
        _check_text(value)
        return value


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields common to completions and chat completions, plus the extras vLLM users know."""
    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    prompt_logprobs: int | None = None
    # beam search (vLLM's extras; early_stopping as transformers'): n beams, the n best hypotheses returned
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    # vLLM's earlier names for structured_outputs' json, regex, choice and grammar
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise bad_request(f"seed must be a 64-bit signed integer, got {self.seed}", "seed")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: they come whole, not as a stream
            raise bad_request("prompt_logprobs is not available when stream is true", "prompt_logprobs")

    def logit_bias_ids(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys (strings)."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias holds {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                              "logit_bias")
        ids = {}
        for key, bias in self.logit_bias.items():
            if not key.isascii() or not key.isdigit():
                raise bad_request(f"logit_bias keys must be token ids, got {shorten(key, 32)}", "logit_bias")
            ids[int(key)] = bias
        return ids

    def beam_search_params(self, params: SamplingParams, max_tokens: int, logprobs: bool) -> BeamSearchParams:
        """use_beam_search: n beams over the same prompt; what beams cannot do is refused by name."""
        for name, used in (("logprobs", logprobs), ("response_format", params.structured_outputs is not None),
                           ("logit_bias", bool(params.logit_bias)), ("prompt_logprobs", params.prompt_logprobs is not None),
                           ("stop", bool(params.stop_strings)), ("seed", self.seed is not None)):
            if used:
                raise bad_request(f"{name} is not supported with use_beam_search", name)
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, length_penalty=self.length_penalty,
                                    ignore_eos=self.ignore_eos, early_stopping=self.early_stopping)
        except ValueError as e:
            raise bad_request(str(e), "length_penalty" if "length_penalty" in str(e) else None) from None

    @property
    def grammar_field(self) -> str:
        """The request field a grammar came from, for its errors."""
        if self.structured_outputs is not None:
            return "structured_outputs"
        return next((f"guided_{k}" for k in GUIDED_KINDS if getattr(self, f"guided_{k}") is not None),
                    "response_format")

    def grammar(self) -> StructuredOutputsParams | None:
        """The grammar of response_format (OpenAI) or structured_outputs (vLLM's extra), if any."""
        rf, extra = self.response_format, self.structured_outputs
        guided = {k: getattr(self, f"guided_{k}") for k in GUIDED_KINDS if getattr(self, f"guided_{k}") is not None}
        if guided:
            if extra is not None:
                raise bad_request("send either structured_outputs or the guided_* fields, not both",
                                  "structured_outputs")
            extra = guided
        from_rf = response_format_grammar(rf) if rf is not None else None
        if extra is None:
            return from_rf
        if from_rf is not None:
            raise bad_request("send either response_format or structured_outputs, not both", "structured_outputs")
        unknown = sorted(set(extra) - set(STRUCTURED_OUTPUTS_KEYS))
        if unknown:
            raise bad_request(f"structured_outputs: {', '.join(map(shorten, unknown))} not supported; "
                              f"supported: {', '.join(STRUCTURED_OUTPUTS_KEYS)}", "structured_outputs")
        try:
            return StructuredOutputsParams(**{k: v for k, v in extra.items() if v is not None and v is not False})
        except ValueError as e:
            raise bad_request(str(e), "structured_outputs") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, min_max_tokens: int = 1,
                        grammar: StructuredOutputsParams | None = None) -> SamplingParams:
        if max_tokens is not None and max_tokens < min_max_tokens:
            raise bad_request(f"max_tokens must be at least {min_max_tokens}, got {max_tokens}", "max_tokens")
        try:
            return SamplingParams(
                n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=self.logit_bias_ids(),
                prompt_logprobs=self.prompt_logprobs, structured_outputs=grammar)
        except ValueError as e:  # SamplingParams' messages start with the field's name
            field = str(e).split(" ", 1)[0]
            raise bad_request(str(e), field if field in type(self).model_fields else None) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # text, token ids, or a batch of either
    prompt: str | list[int] | list[str] | list[list[int]]  # list[int] before list[str]: 20x faster on long id lists
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling_params(self) -> SamplingParams:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad_request(f"logprobs must be between 0 and 20, got {self.logprobs}", "logprobs")
        params = self.sampling_params(self.max_tokens, self.logprobs, min_max_tokens=0 if self.echo else 1,
                                      grammar=self.grammar())
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            # the echoed prompt's tokens carry logprobs too (what lm-eval's loglikelihood reads)
            params = dataclasses.replace(params, prompt_logprobs=self.logprobs)
        return params

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        return list(p)


def response_format_grammar(rf: dict) -> StructuredOutputsParams | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}. A schema is always followed exactly (as if
    strict): the grammar allows nothing else."""
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("response_format json_schema must be {'name': ..., 'schema': {...}}", "response_format")
        return StructuredOutputsParams(json=spec.get("schema") or {"type": "object"})
    raise bad_request(f"response_format type must be one of 'text', 'json_object', 'json_schema'; got {shorten(kind)}",
                      "response_format")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal[ROLES]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None                 # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"message content of type {part.type!r} is not supported (text only)",
                                  "messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Any = None  # validated by server/tools.py, with messages naming the bad part
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        self.check_common()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
            if not 0 <= self.top_logprobs <= 20:
                raise bad_request(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}",
                                  "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, logprobs, grammar=self.grammar())

    def conversation(self) -> list[dict]:
        out = []
        for m in self.messages:
            message = {"role": m.role, "content": m.text()}
            message.update({k: v for k, v in (("name", m.name), ("tool_calls", m.tool_calls),
                                              ("tool_call_id", m.tool_call_id)) if v is not None})
            out.append(message)
        return out


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


