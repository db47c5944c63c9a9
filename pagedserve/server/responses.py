"""OpenAI response bodies built from RequestOutputs: choices, chunks, logprobs, usage."""
from __future__ import annotations

import json
from functools import lru_cache

from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput


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
        token_lps.append(entry[tid].logprob if tid in entry else None)
        top: dict[str, float] = {}
        for t, lp in _top(entry, num):  # best rank first: two ids with the same text keep the likelier
            top.setdefault(tt.text(t), lp.logprob)
        if tid in entry:
            top.setdefault(text, entry[tid].logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
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
                      offset: int = 0) -> dict:
    return {"index": index, "text": c.text,
            "logprobs": completion_logprobs(c, num_logprobs or 0, tt, offset) if num_logprobs is not None else None,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def chat_choice(index: int, c: CompletionOutput, num_logprobs: int | None, tt: TokenText) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c, num_logprobs or 0, tt) if num_logprobs is not None else None,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def chat_delta_choice(index: int, c: CompletionOutput, num_logprobs: int | None, tt: TokenText) -> dict:
    delta = {"content": c.text} if c.text else {}
    return {"index": index, "delta": delta,
            "logprobs": chat_logprobs(c, num_logprobs or 0, tt) if num_logprobs is not None else None,
            "finish_reason": c.finish_reason}
