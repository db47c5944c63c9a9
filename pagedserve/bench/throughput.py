"""Offline throughput of our engine on a workload: every request submitted at once, stepped to the end.

Each request generates exactly its max_tokens (ignore_eos), so only useful tokens are counted and
every engine does the same work. Timing starts at the first add_request and ends when the last
request finishes; model loading is outside it.
"""
from __future__ import annotations

import gc
import sys
import time

from pagedserve.bench.flops import ModelShape, workload_flops
from pagedserve.bench.results import LoadMonitor
from pagedserve.bench.workload import WorkloadItem
from pagedserve.config import EngineConfig


def engine_params(item: WorkloadItem, temperature: float = 0.0):
    from pagedserve.sampling_params import SamplingParams
    return SamplingParams(max_tokens=item.max_tokens, ignore_eos=True, temperature=temperature)


def run_engine(engine, items: list[WorkloadItem], temperature: float = 0.0, progress: bool = False,
               profiler=None) -> dict:
    """Run items through a fresh LLMEngine (all submitted at once); returns the measured numbers.

    profiler: a bench.profile.StepProfiler to call around each step, or None.
    """
    out_tokens = {it.id: 0 for it in items}
    cached = {it.id: 0 for it in items}
    running_sum = blocks_sum = steps = max_running = 0
    num_blocks = engine.stats()["num_kv_blocks"]
    engine.add_step_observer(lambda _: engine.kv_cache.record_step())  # the KV utilisation means
    load = LoadMonitor()
    t0 = time.perf_counter()
    for it in items:
        engine.add_request(it.id, {"prompt_token_ids": it.prompt_token_ids}, engine_params(it, temperature))
    last_report = t0
    while engine.has_unfinished_requests():
        if profiler is not None:
            profiler.before_step(steps)
        for out in engine.step():
            out_tokens[out.request_id] += sum(len(c.token_ids) for c in out.outputs)
            cached[out.request_id] = out.num_cached_tokens
        # cheap per-step samples (the engine's own stats() walks every block table)
        running = len(engine.scheduler.running)
        running_sum += running
        max_running = max(max_running, running)
        blocks_sum += engine.kv_cache.num_used_blocks
        if profiler is not None:
            profiler.after_step(steps, f"{running} running, {len(engine.scheduler.waiting)} waiting")
        steps += 1
        load.poll()
        if progress and time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            done = sum(out_tokens.values())
            print(f"  [{engine.config.kv_reservation}] {last_report - t0:6.0f} s  {done} output tokens  "
                  f"{done / (last_report - t0):.1f} tok/s  running {running}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    if profiler is not None:
        profiler.close()
    stats = engine.stats()

    prompt = sum(it.prompt_len for it in items)
    output = sum(out_tokens.values())
    flops = workload_flops(ModelShape.of(engine.model_config), [it.prompt_len for it in items],
                           [out_tokens[it.id] for it in items], [cached[it.id] for it in items])
    queries = stats["prefix_cache_queries"]
    return {
        "engine": "pagedserve", "kv_reservation": engine.config.kv_reservation, "dtype": str(engine.dtype),
        "num_kv_blocks": num_blocks, "block_size": stats["block_size"], "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.config.max_num_seqs, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "num_requests": len(items), "elapsed_s": elapsed,
        "prompt_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output,
        "expected_output_tokens": sum(it.max_tokens for it in items),
        "requests_per_s": len(items) / elapsed, "output_tokens_per_s": output / elapsed,
        "total_tokens_per_s": (prompt + output) / elapsed,
        "gflops": flops / 1e9, "gflop_per_s": flops / 1e9 / elapsed,
        "kv_blocks_peak": stats["kv_blocks_peak"], "kv_utilization_mean": stats["kv_utilization_mean"],
        "kv_cache_usage_mean": blocks_sum / steps / num_blocks if steps else 0.0,
        "mean_running_requests": running_sum / steps if steps else 0.0, "max_running_requests": max_running,
        "num_preemptions": stats["num_preemptions"], "num_steps": stats["num_steps"],
        "prefix_cache_queries": queries, "prefix_cache_hits": stats["prefix_cache_hits"],
        "prefix_hit_rate": stats["prefix_cache_hits"] / queries if queries else 0.0,
        "cached_prompt_tokens": sum(cached.values()),
        **load.summary(), "profiled": profiler is not None,
    }


def run_engine_config(config: EngineConfig, items: list[WorkloadItem], temperature: float = 0.0,
                      progress: bool = False, profiler=None) -> dict:
    """Load an engine for config, run the items, free it (model load time reported apart)."""
    from pagedserve.engine import LLMEngine
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - t0
    try:
        result = run_engine(engine, items, temperature, progress, profiler)
    finally:
        del engine
        gc.collect()
    result["load_s"] = load_s
    return result
