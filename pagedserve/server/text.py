"""TextWorker: the HTTP side's tokenizer, on its own thread, so text work never stalls the event loop.

Tokenizing a long prompt, rendering a chat template or decoding many tokens takes CPU time; on the
event loop it would freeze every endpoint, /health included. The worker owns the server's copy of
the tokenizer and one thread (a Hugging Face tokenizer must not be used from several threads at
once); every call is awaited with run_in_executor.

It also bounds the work before doing it: a token covers at most `longest_token_chars` characters
of text, so a text longer than max_model_len times that can never fit the context window and is
refused by its length alone, without tokenizing it.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from pagedserve.tokenizer import apply_chat_template, encode_prompt

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Unicode normalization (NFC, NFKC) can compose several input characters into one, which a
# byte-level token then covers as fewer bytes: at most 3 characters into 2 bytes. Counting each
# token as twice its length keeps the length bound a true bound under any such normalizer.
NORMALIZATION_MARGIN = 2


def longest_token_chars(tokenizer) -> int | None:
    """The most characters of text one token can stand for; None when the vocabulary is unknown.

    Byte-level BPE entries spell one character per byte (so they count the bytes of the text,
    never fewer than its characters); SentencePiece and WordPiece entries spell their text
    (plus a marker, which only makes the bound looser). Added (special) tokens count too: their
    text in a prompt becomes one token.
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary to list: no bound, tokenize as it comes
        logger.warning("the tokenizer cannot list its vocabulary; prompts are not bounded by length")
        return None
    longest = max((len(t) for t in vocab), default=0)
    return max(longest, 1) * NORMALIZATION_MARGIN


class TextWorker:
    """Tokenize, template and decode on one dedicated thread; all methods are awaitable."""

    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-text")
        per_token = longest_token_chars(tokenizer)
        # the longest text (in characters) that could still fit the context window
        self.max_chars: int | None = max_model_len * per_token if per_token else None

    def fits(self, num_chars: int) -> bool:
        """False when a text of num_chars characters can never fit the context window."""
        return self.max_chars is None or num_chars <= self.max_chars

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the worker thread (fn may use self.tokenizer)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:  # as the tokenizer itself does (BOS or not)
            return await self.run(encode_prompt, self.tokenizer, text)
        return await self.run(lambda: list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens)))

    async def chat(self, conversation: list[dict], add_generation_prompt: bool, kwargs: dict | None) -> list[int]:
        return await self.run(apply_chat_template, self.tokenizer, conversation, add_generation_prompt,
                              **(kwargs or {}))

    async def decode(self, token_ids: list[int]) -> str:
        return await self.run(self.tokenizer.decode, token_ids)

    def close(self) -> None:
        """Stop taking work; calls still queued are cancelled (their awaiters get CancelledError)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
