"""Multi-turn chat against the engine: each conversation sends its next turn once its last answer is complete,
with the whole history (the engine's own answers included) as the prompt, `concurrency` conversations at a
time. With many conversations the histories' working set is several times the KV pool: what the pool evicted
is computed again, unless a second tier (--kv-offload-memory) restores it.

    pagedserve bench workload multiturn > mt.jsonl
    pagedserve bench multiturn --workload mt.jsonl --num-kv-blocks 256 --kv-offload-memory 4GiB

runs the same conversations three times in one process (no tier; the tier with recompute preemption; the tier
with swap preemption) and reports, for each, the prefill tokens computed against those submitted, the
prefix-cache hit rate, the tokens loaded from the tier, time to first token per turn and throughput.
"""
from __future__ import annotations

import gc
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass

from pagedserve.bench.results import LoadMonitor
from pagedserve.bench.workload import WorkloadItem
from pagedserve.config import EngineConfig

MODES = ("none", "tier", "swap")


@dataclass
class Conversation:
    id: str
    turns: list[WorkloadItem]  # each turn's new user tokens and its answer length, in order


def conversations(items: list[WorkloadItem]) -> list[Conversation]:
    """Group a multiturn workload's lines by conversation, turns in order; a ValueError for any other file."""
    by_id: dict[str, list[WorkloadItem]] = {}
    for it in items:
        if it.conversation is None:
            raise ValueError(f"workload item {it.id} names no conversation: use `pagedserve bench workload multiturn`")
        by_id.setdefault(it.conversation, []).append(it)
    out = []
    for cid, turns in by_id.items():
        turns.sort(key=lambda it: it.turn)
        if [it.turn for it in turns] != list(range(len(turns))):
            raise ValueError(f"conversation {cid}: turns {[it.turn for it in turns]} are not 0, 1, 2, ...")
        out.append(Conversation(cid, turns))
    return out


def mode_config(base: EngineConfig, mode: str, offload_memory: str | int) -> EngineConfig:
    """The engine options of one mode: no tier, the tier with recompute, the tier with swap."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return base.replace(kv_offload_memory=None, kv_offload_dir=None, preemption_mode="recompute")
    return base.replace(kv_offload_memory=offload_memory, preemption_mode="recompute" if mode == "tier" else "swap")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


def run_multiturn(engine, convs: list[Conversation], concurrency: int, progress: bool = False) -> dict:
    """Drive the conversations to their end through a fresh engine; the measured numbers."""
    from pagedserve.sampling_params import SamplingParams
    before = engine.stats(detailed=False)
    history = {c.id: [] for c in convs}
    next_turn = {c.id: 0 for c in convs}
    pending = list(convs)  # conversations not started yet
    live: dict[str, tuple[Conversation, float, int]] = {}  # request id -> conversation, submit time, prompt len
    answer: dict[str, list[int]] = {}
    answers: dict[str, list[int]] = {}  # every turn's answer, to check that the modes answer alike
    ttft, turn_latency = [], []
    submitted = output_tokens = 0
    working_set = 0
    load = LoadMonitor()

    def submit(conv: Conversation) -> None:
        nonlocal submitted
        turn = conv.turns[next_turn[conv.id]]
        prompt = history[conv.id] + turn.prompt_token_ids
        rid = f"{conv.id}/{turn.turn}"
        engine.add_request(rid, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=turn.max_tokens, ignore_eos=True, temperature=0.0))
        live[rid] = (conv, time.perf_counter(), len(prompt))
        answer[rid] = []
        submitted += len(prompt)

    t0 = last_report = time.perf_counter()
    while pending and len(live) < concurrency:
        submit(pending.pop(0))
    while live:
        for out in engine.step():
            now = time.perf_counter()
            conv, sent, prompt_len = live[out.request_id]
            tokens = out.outputs[0].token_ids
            if tokens and not answer[out.request_id]:
                ttft.append(now - sent)
            answer[out.request_id] += tokens
            if not out.finished:
                continue
            del live[out.request_id]
            turn_latency.append(now - sent)
            output_tokens += len(answer[out.request_id])
            answers[out.request_id] = answer.pop(out.request_id)
            history[conv.id] += conv.turns[next_turn[conv.id]].prompt_token_ids + answers[out.request_id]
            working_set = max(working_set, sum(len(history[c.id]) for c, _, _ in live.values()) + len(history[conv.id]))
            next_turn[conv.id] += 1
            if next_turn[conv.id] < len(conv.turns):
                submit(conv)
            elif pending:
                submit(pending.pop(0))
        load.poll()
        if progress and time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            print(f"  [{_mode_of(engine.config)}] {last_report - t0:6.0f} s  {output_tokens} output tokens  "
                  f"{len(live)} turns in flight", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    s = engine.stats(detailed=False)

    def delta(key: str) -> int:
        return s.get(key, 0) - before.get(key, 0)
    queries = delta("prefix_cache_queries")
    block = s["block_size"]
    return {
        "mode": _mode_of(engine.config), "num_kv_blocks": s["num_kv_blocks"], "block_size": block,
        "kv_offload_blocks": s.get("kv_offload_blocks", 0), "concurrency": concurrency,
        "num_conversations": len(convs), "num_turns": sum(len(c.turns) for c in convs), "elapsed_s": elapsed,
        "prompt_tokens_submitted": submitted, "output_tokens": output_tokens,
        "prefill_tokens_computed": delta("prefill_tokens_computed"),
        "prefix_cache_queries": queries, "prefix_cache_hits": delta("prefix_cache_hits"),
        "prefix_hit_rate": delta("prefix_cache_hits") / queries if queries else 0.0,
        "kv_offload_hits": delta("kv_offload_hits"), "kv_blocks_offloaded": delta("kv_blocks_offloaded"),
        "kv_blocks_loaded": delta("kv_blocks_loaded"), "num_preemptions": delta("num_preemptions"),
        "num_swapped_out": delta("num_swapped_out"),
        # The largest sum of the live conversations' histories, in blocks: what would have to stay cached.
        "working_set_blocks": -(-working_set // block),
        "output_tokens_per_s": output_tokens / elapsed, "total_tokens_per_s": (submitted + output_tokens) / elapsed,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else 0.0, "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p90_s": _percentile(ttft, 90), "ttft_p99_s": _percentile(ttft, 99),
        "turn_latency_mean_s": statistics.fmean(turn_latency) if turn_latency else 0.0,
        "answers_sha256": hashlib.sha256(json.dumps(sorted(answers.items())).encode()).hexdigest(),
        **load.summary(),
    }


def _mode_of(config: EngineConfig) -> str:
    if config.kv_offload_memory is None:
        return "none"
    return "swap" if config.preemption_mode == "swap" else "tier"


def run_modes(base: EngineConfig, convs: list[Conversation], modes: list[str], offload_memory: str | int,
              concurrency: int, progress: bool = False) -> list[dict]:
    """The same conversations through a fresh engine per mode, one after another (same process, same load)."""
    from pagedserve.engine import LLMEngine
    results = []
    for mode in modes:
        engine = LLMEngine(mode_config(base, mode, offload_memory))
        try:
            results.append(run_multiturn(engine, convs, concurrency, progress))
        finally:
            del engine
            gc.collect()
    return results
