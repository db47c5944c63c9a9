"""Benchmark workloads: the deterministic generators and the JSON-lines files they write.

Every request is given as prompt token ids plus an exact output length (generation ignores
EOS), so that any engine, ours or a peer, does the same work. Lengths follow a log-normal
shape like chat traffic (the PagedAttention paper's ShareGPT trace: long, widely spread
prompts and outputs), scaled down so a 135M-parameter model on two CPU cores finishes in
about a minute. Token ids are drawn from [1000, 40000): ordinary tokens of a 49k vocabulary,
no specials, so no tokenizer is needed to make a workload.

    pagedserve bench workload chat   > chat.jsonl     # 128 independent prompts
    pagedserve bench workload shared > shared.jsonl   # 80% of them share one 256-token system prompt
    pagedserve bench workload chat --n 32 --seed 1    # a smaller or another draw
    pagedserve bench workload multiturn > mt.jsonl    # 32 conversations of 3-8 turns (bench multiturn)

Each line is one JSON object (json.dumps' default separators), in request order:

    {"id": str, "prompt_token_ids": [int], "max_tokens": int, "shared_prefix_len": int}

`shared_prefix_len` is how many leading prompt tokens are the shared system prompt (0 for
chat). A multiturn line is one turn of a conversation and adds `"conversation": str, "turn": int`;
its prompt_token_ids are only what the user adds in that turn (the first turn starts with the
system prompt): `pagedserve bench multiturn` sends each turn with the whole conversation so far,
the engine's own answers included. The generators are the benchmark suite's original stand-alone workload script, moved
here unchanged: the same kind, n and seed give byte for byte the same file (a test pins a digest).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import numpy as np

VOCAB_LO, VOCAB_HI = 1000, 40000  # ordinary tokens of a 49k vocabulary, no specials
KINDS = ("chat", "shared", "multiturn")


# ---- generators ------------------------------------------------------------------------------
# The draw order below is the file format's contract: reordering any rng call changes every file.
def _lengths(rng, n, median, sigma, lo, hi):
    return np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), lo, hi)


def chat(n: int = 128, seed: int = 0, prompt_median: int = 160, output_median: int = 128) -> Iterator[dict]:
    """Independent prompts: log-normal prompt lengths in [8, 1024], outputs in [8, 512]."""
    rng = np.random.default_rng(seed)
    p = _lengths(rng, n, prompt_median, 0.8, 8, 1024)
    o = _lengths(rng, n, output_median, 0.7, 8, 512)
    for i in range(n):
        yield {"id": f"chat-{i}",
               "prompt_token_ids": rng.integers(VOCAB_LO, VOCAB_HI, p[i]).tolist(),
               "max_tokens": int(o[i]), "shared_prefix_len": 0}


def shared(n: int = 128, seed: int = 0, system_len: int = 256, share: float = 0.8,
           output_median: int = 96) -> Iterator[dict]:
    """A `share` of the requests start with one system prompt of system_len tokens; short user turns."""
    rng = np.random.default_rng(seed)
    system = rng.integers(VOCAB_LO, VOCAB_HI, system_len).tolist()
    user = _lengths(rng, n, 48, 0.6, 4, 256)
    o = _lengths(rng, n, output_median, 0.6, 8, 384)
    for i in range(n):
        prefix = system if rng.random() < share else []
        yield {"id": f"shared-{i}",
               "prompt_token_ids": prefix + rng.integers(VOCAB_LO, VOCAB_HI, user[i]).tolist(),
               "max_tokens": int(o[i]), "shared_prefix_len": len(prefix)}


def multiturn(n: int = 32, seed: int = 0, system_len: int = 128, user_median: int = 48,
              output_median: int = 64) -> Iterator[dict]:
    """n conversations of 3-8 turns, all opening with one system prompt; each turn adds a log-normal user
    message in [8, 256] tokens and asks for a log-normal answer in [8, 256]. Conversations are interleaved the
    way chat users are: every history grows turn by turn, so their working set is many times one prompt."""
    rng = np.random.default_rng(seed)
    system = rng.integers(VOCAB_LO, VOCAB_HI, system_len).tolist()
    for c in range(n):
        turns = int(rng.integers(3, 9))
        user = _lengths(rng, turns, user_median, 0.6, 8, 256)
        out = _lengths(rng, turns, output_median, 0.6, 8, 256)
        for t in range(turns):
            prefix = system if t == 0 else []
            yield {"id": f"mt-{c}-{t}", "prompt_token_ids": prefix + rng.integers(VOCAB_LO, VOCAB_HI, user[t]).tolist(),
                   "max_tokens": int(out[t]), "shared_prefix_len": len(prefix), "conversation": f"mt-{c}", "turn": t}


def generate(kind: str, **kwargs) -> Iterator[dict]:
    """A generator by name (chat, shared, multiturn), with its keyword arguments."""
    if kind not in KINDS:
        raise ValueError(f"workload kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return {"chat": chat, "shared": shared, "multiturn": multiturn}[kind](**kwargs)


def write_workload(kind: str, out: TextIO, n: int | None = None, seed: int = 0) -> None:
    """The workload as JSON lines on out, exactly as the original script printed it (n: requests, or
    conversations for multiturn; None: the generator's default)."""
    for r in generate(kind, seed=seed, **({} if n is None else {"n": n})):
        out.write(json.dumps(r) + "\n")


# ---- loading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkloadItem:
    id: str
    prompt_token_ids: list[int]
    max_tokens: int
    shared_prefix_len: int = 0
    conversation: str | None = None  # multiturn: the conversation this turn belongs to, and its index there
    turn: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def item_from_dict(d: dict, line_no: int = 0) -> WorkloadItem:
    """One workload line -> WorkloadItem; a clear ValueError for a malformed one."""
    where = f"workload line {line_no}" if line_no else "workload item"
    try:
        ids = [int(t) for t in d["prompt_token_ids"]]
        max_tokens = int(d["max_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: needs prompt_token_ids (a list of ints) and max_tokens (an int): {e}") from None
    if not ids or max_tokens < 1:
        raise ValueError(f"{where}: needs a non-empty prompt and max_tokens >= 1")
    conversation = d.get("conversation")
    return WorkloadItem(str(d.get("id", line_no)), ids, max_tokens, int(d.get("shared_prefix_len", 0)),
                        None if conversation is None else str(conversation), int(d.get("turn", 0)))


def load_workload(path: str, num_requests: int | None = None) -> list[WorkloadItem]:
    """The first num_requests items (all if None) of a workload .jsonl file, in file order."""
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON: {e}") from None
            items.append(item_from_dict(d, line_no))
            if num_requests is not None and len(items) >= num_requests:
                break
    if not items:
        raise ValueError(f"{path}: the workload is empty")
    return items


def workload_summary(items: list[WorkloadItem]) -> dict:
    """Sizes of a workload, for results files."""
    p = [it.prompt_len for it in items]
    o = [it.max_tokens for it in items]
    return {"num_requests": len(items), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "mean_prompt_len": sum(p) / len(p), "mean_output_len": sum(o) / len(o),
            "max_prompt_len": max(p), "max_output_len": max(o),
            "shared_prefix_requests": sum(1 for it in items if it.shared_prefix_len)}
