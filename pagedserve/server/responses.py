"""OpenAI response bodies built from RequestOutputs: choices, chunks, logprobs, usage."""
from __future__ import annotations

import json
from functools import lru_cache

from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.server.tools import ToolCallStream, ToolPlan


class TokenText:
    """Token id -> its text and UTF-8 bytes, for logprobs (the HTTP side's own tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=1 << 16)(self._text)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(outputs: list[RequestOutput | None]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o)
    completion = sum(len(c.token_ids) for o in outputs if o for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs if o)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _top(entry: dict[int, Logprob], n: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= n),
                    key=lambda x: x[1].rank)
    return ranked[:n]


def completion_logprobs(c: CompletionOutput, num: int, tt: TokenText, offset: int = 0) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    if c.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(c.token_ids, c.logprobs):
        text = tt.text(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:  # an echoed prompt's first token: nothing predicts it
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry[tid].logprob if tid in entry else None)
        top: dict[str, float] = {}
        for t, lp in _top(entry, num):  # best rank first: two ids with the same text keep the likelier
            top.setdefault(tt.text(t), lp.logprob)
        if tid in entry:
            top.setdefault(text, entry[tid].logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, num: int, tt: TokenText) -> dict | None:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if c.logprobs is None:
        return None
    content = []
    for tid, entry in zip(c.token_ids, c.logprobs):
        text = tt.text(tid)
        content.append({
            "token": text, "logprob": entry[tid].logprob if tid in entry else None, "bytes": list(text.encode()),
            "top_logprobs": [{"token": tt.text(t), "logprob": lp.logprob, "bytes": list(tt.text(t).encode())}
                             for t, lp in _top(entry, num)]})
    return {"content": content}


def completion_choice(index: int, c: CompletionOutput, num_logprobs: int | None, tt: TokenText,
                      offset: int = 0, echo: CompletionOutput | None = None) -> dict:
    """echo: the prompt as an output (its text, token ids and prompt logprobs), put before c's."""
    text, head = c.text, None
    if echo is not None:
        text = echo.text + text
        if num_logprobs is not None and echo.logprobs is not None:
            head = completion_logprobs(echo, num_logprobs, tt, offset)
            offset += sum(len(t) for t in head["tokens"])
    logprobs = completion_logprobs(c, num_logprobs, tt, offset) if num_logprobs is not None else None
    if head is not None:
        logprobs = {k: head[k] + logprobs[k] for k in head}
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def prompt_logprobs(entries: list[dict[int, Logprob] | None] | None) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: per prompt token, None or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def _tool_finish_reason(finish_reason: str | None, made_calls: bool, tools: ToolPlan) -> str | None:
    """A choice that ended by making calls finishes with "tool_calls"; a forced (named) function with "stop",
    as OpenAI answers."""
    return "tool_calls" if made_calls and finish_reason == "stop" and tools.choice != "named" else finish_reason


def chat_choice(index: int, c: CompletionOutput, num_logprobs: int | None, tt: TokenText,
                tools: ToolPlan | None = None) -> dict:
    """tools: the request's tool plan; the text is then parsed into content and tool_calls."""
    message, finish_reason = {"role": "assistant", "content": c.text}, c.finish_reason
    if tools is not None and tools.choice != "none":
        content, calls = tools.parse(c.text)
        message = {"role": "assistant", "content": content, "tool_calls": calls}
        finish_reason = _tool_finish_reason(finish_reason, bool(calls), tools)
    return {"index": index, "message": message,
            "logprobs": chat_logprobs(c, num_logprobs or 0, tt) if num_logprobs is not None else None,
            "finish_reason": finish_reason, "stop_reason": c.stop_reason}


def chat_delta_choices(index: int, c: CompletionOutput, num_logprobs: int | None, tt: TokenText,
                       tool_stream: ToolCallStream | None = None) -> list[dict]:
    """The stream chunks' choices for one step's output of a choice: one per delta; the logprobs ride on the
    first, the finish_reason on the last. tool_stream: this choice's tool-call parser."""
    if tool_stream is None:
        deltas = [{"content": c.text}] if c.text else []
    else:
        deltas = tool_stream.feed(c.text) + (tool_stream.finish() if c.finish_reason else [])
    finish_reason = c.finish_reason
    if tool_stream is not None:
        finish_reason = _tool_finish_reason(finish_reason, tool_stream.made_calls, tool_stream.plan)
    logprobs = chat_logprobs(c, num_logprobs or 0, tt) if num_logprobs is not None else None
    if not deltas and (finish_reason or logprobs):
        deltas = [{}]
    choices = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
    if choices:
        choices[0]["logprobs"] = logprobs
        choices[-1]["finish_reason"] = finish_reason
    return choices
