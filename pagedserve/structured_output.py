"""Structured output: grammars compiled by xgrammar, one matcher per sequence, a token bitmask per step.

A request's StructuredOutputsParams (JSON schema, regex, choice, EBNF, any JSON object) is compiled once
per distinct grammar (cached here, bounded by bytes) into a CompiledGrammar; each of the request's
sequences walks it with its own GrammarMatcher. Every step the engine asks each such matcher for the set
of tokens it allows, as a bitmask (one bit per vocabulary entry, 32 per int32 word), and the sampler masks
the other logits to -inf in one batched op (sampler.apply_penalties). A sequence whose grammar reached its
end stops. Requests without a grammar never touch this module: the tokenizer tables are built on the first
grammar only.

Compilation can take a while for a large schema, so the server compiles on its own thread before it hands
the request to the engine (AsyncEngine.add_request); the engine's compile is then a cache hit.
"""
from __future__ import annotations

import ctypes
import functools
import json
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from pagedserve import native
from pagedserve.optional import require
from pagedserve.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)
MASK_SOURCE = Path(__file__).with_name("csrc") / "grammar_mask.c"

# Compiled grammars kept, least recently used dropped first. Agents send a new schema or tool set with
# nearly every request, so the cache is bounded by bytes (xgrammar's own cache is off: it never forgets).
CACHE_BYTES = 256 << 20
MAX_GRAMMAR_CHARS = 1 << 16  # longest schema, regex, EBNF or list of choices (as text) accepted
# A grammar whose first token mask takes longer than this to compute would slow every step of everyone
# batched with it (the masks are computed on the engine thread): refused at compile time.
MAX_FIRST_MASK_S = 0.05
# A JSON grammar with free whitespace lets a model emit whitespace forever; bound each run of it.
MAX_WHITESPACE = 8
BITS = 32  # vocabulary entries per bitmask word


class GrammarError(ValueError):
    """The grammar (schema, regex, EBNF) is invalid or unsupported; the message says why."""


def _clean(error: Exception) -> str:
    """xgrammar's message without its '[time] /source/file.cc:line: ' prefix, capped (it may quote the input)."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip())
    return text if len(text) <= 512 else text[:512] + "..."


def _xgrammar():
    """The xgrammar module; a MissingDependency (an ImportError, not a GrammarError: the request is not at fault)
    where it is not installed. Only structured output needs it."""
    return require("xgrammar", "structured output (JSON schema, regex, choice, EBNF)")


def _choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly the given strings (their JSON quoting is a valid EBNF literal)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputManager:
    """Compiles grammars for one tokenizer and vocabulary, and caches them. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()  # the first grammar pays for the import and the token tables
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def compile(self, params: StructuredOutputsParams):
        """The CompiledGrammar of params; raises GrammarError saying why it cannot be compiled."""
        try:
            key = params.key()
        except RecursionError:  # json.dumps of a schema nested deeper than Python's stack
            raise GrammarError(f"invalid {params.kind} for structured output: nested too deeply") from None
        spec = key[1]  # text, a tuple of choices, or True (json_object)
        chars = len(spec) if isinstance(spec, str) else sum(map(len, spec)) if isinstance(spec, tuple) else 0
        if chars > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the {params.kind} for structured output is longer than {MAX_GRAMMAR_CHARS} characters")
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiler = self._get_compiler()
        kind = params.kind
        any_whitespace = not params.disable_any_whitespace
        try:
            if kind in ("json", "json_object"):
                schema = spec if kind == "json" else '{"type": "object"}'  # spec: the schema's text (key())
                compiled = compiler.compile_json_schema(schema, any_whitespace=any_whitespace,
                                                        max_whitespace_cnt=MAX_WHITESPACE if any_whitespace else None)
            elif kind == "regex":
                compiled = compiler.compile_regex(spec)
            elif kind == "choice":
                compiled = compiler.compile_grammar(_choice_grammar(spec))
            else:
                compiled = compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError, RecursionError) as e:
            raise GrammarError(f"invalid {kind} for structured output: {_clean(e)}") from None
        start = time.thread_time()  # CPU time: a busy machine must not make a cheap grammar look costly
        allowed_token_bitmask([GrammarState(compiled)], self.vocab_size)
        first_mask_s = time.thread_time() - start
        if first_mask_s > MAX_FIRST_MASK_S:
            raise GrammarError(f"the {kind} for structured output is too costly to follow: its first token mask "
                               f"took {first_mask_s * 1e3:.0f} ms (at most {MAX_FIRST_MASK_S * 1e3:.0f} ms); "
                               f"simplify it (fewer ambiguous alternatives)")
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compiled
                self._cache_bytes += compiled.memory_size_bytes
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                self._cache_bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
        return compiled


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, compiled) -> None:
        self._matcher = _xgrammar().GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance over a sampled token; False if the grammar does not allow it."""
        return self._matcher.accept_token(token_id)

    @property
    def finished(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


def allowed_token_bitmask(states: Sequence[GrammarState], vocab_size: int) -> torch.Tensor:
    """[len(states), ceil(V / 32)] int32: bit t % 32 of word t // 32 of row i is set if states[i] allows t."""
    bitmask = torch.empty((len(states), -(-vocab_size // BITS)), dtype=torch.int32)
    for i, state in enumerate(states):
        state.fill(bitmask, i)
    return bitmask


def ban_tokens(row: torch.Tensor, token_ids: Sequence[int]) -> bool:
    """Clear token_ids' bits in one row of a bitmask, unless that would leave no token allowed; returns
    whether it did. The caller then needs no separate ban (and a grammar that can only end is let end)."""
    ids = torch.tensor([t for t in token_ids if 0 <= t < row.numel() * BITS], dtype=torch.int64)
    bits = torch.ones_like(ids, dtype=torch.int32) << (ids % BITS).to(torch.int32)  # bit 31: the sign bit, fine
    banned = torch.zeros_like(row).index_put_((ids // BITS,), bits, accumulate=True)
    kept = row & ~banned
    if not bool(kept.any()):
        return False
    row.copy_(kept)
    return True


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The [G, V] bool mask (True = allowed) of a [G, W] int32 bitmask, with batched tensor ops."""
    words = bitmask
    if sys.byteorder == "little":  # bit b of word w is bit b % 8 of byte 4w + b // 8: the same token order,
        words = bitmask.view(torch.uint8)  # and a quarter of the memory to unpack
    width = words.element_size() * 8
    shifts = torch.arange(width, dtype=words.dtype, device=bitmask.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [G, W', width]; & 1 keeps one bit even where >> is arithmetic
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


@functools.cache
def _mask_library() -> ctypes.CDLL | None:
    lib = native.try_load(MASK_SOURCE, log, "the C grammar mask is unavailable, torch ops mask instead")
    if lib is not None:
        P, I64 = ctypes.c_void_p, ctypes.c_int64
        lib.grammar_mask.argtypes = [P, I64, P, P, I64, I64, I64, ctypes.c_int]
        lib.grammar_mask.restype = None
    return lib


def mask_logits_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[rows[i], t] = -inf for every token t that bitmask row i does not allow, in place.
    logits: [S, V]; rows: [G] int64; bitmask: [G, ceil(V / 32)] int32."""
    V = logits.shape[1]
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.stride(1) == 1
            and bitmask.device.type == "cpu" and _mask_library() is not None):
        rows, bitmask = rows.contiguous(), bitmask.contiguous()
        _mask_library().grammar_mask(logits.data_ptr(), logits.stride(0), rows.data_ptr(), bitmask.data_ptr(),
                                     rows.numel(), bitmask.shape[1], V, native.thread_count())
        return
    allowed = unpack_bitmask(bitmask.to(logits.device), V)  # [G, V]
    if rows.numel() == logits.shape[0]:  # the sampler's row subsets are increasing: all rows, in order
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill_(~allowed, float("-inf"))
