"""The offline measurements of `bench report`, one function per section; each returns plain numbers.

Engines are built from one base EngineConfig with only the option a section varies changed,
so every difference in a section comes from that option.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import statistics
import sys
import time
from collections.abc import Callable

from pagedserve.bench.throughput import run_engine
from pagedserve.bench import workload
from pagedserve.bench.workload import WorkloadItem, item_from_dict, workload_summary
from pagedserve.config import EngineConfig
from pagedserve.kv_cache.manager import SlotUsage, cdiv

Log = Callable[[str], None]

# Length parameters of the workload generators that --workload-scale multiplies.
_SCALED = ("prompt_median", "output_median", "system_len", "user_median")


# ---- workloads ------------------------------------------------------------------------------
def generator_kwargs(kind: str, scale: float) -> dict:
    """The length parameters of workload.<kind>() multiplied by scale ({} at scale 1: the generator's defaults)."""
    if scale == 1:
        return {}
    params = inspect.signature(getattr(workload, kind)).parameters
    return {k: max(1, round(p.default * scale)) for k, p in params.items() if k in _SCALED}


def workload_items(kind: str, n: int, seed: int = 0, scale: float = 1.0,
                   vocab_size: int | None = None) -> list[WorkloadItem]:
    """n requests of pagedserve.bench.workload's `chat` or `shared` workload as WorkloadItems.

    The generator draws ids from a 49k vocabulary; for a model with a smaller one (a tiny test
    model) every id is folded into it (id mod vocab_size), which keeps equal prefixes equal.
    """
    items = [item_from_dict(d) for d in workload.generate(kind, n=n, seed=seed, **generator_kwargs(kind, scale))]
    if vocab_size is None or all(max(it.prompt_token_ids) < vocab_size for it in items):
        return items
    return [dataclasses.replace(it, prompt_token_ids=[t % vocab_size for t in it.prompt_token_ids]) for it in items]


def model_facts(config: EngineConfig) -> dict:
    """Name, vocabulary and context window of the report's model (loaded once, then freed)."""
    from pagedserve.model.loader import load_model
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, tokenizer=config.tokenizer)
    facts = {"name": loaded.name, "path": loaded.path, "vocab_size": loaded.config.vocab_size,
             "context_len": loaded.config.context_len, "dtype": str(loaded.dtype)}
    del loaded
    gc.collect()
    return facts


# ---- shared helpers ---------------------------------------------------------------------------
def slot_shares(usage: SlotUsage) -> dict:
    """Fractions of the allocated slot-steps holding token states, reserved, lost to fragmentation."""
    total = usage.allocated or 1
    return {"token_states": usage.token_states / total, "reserved": usage.reserved / total,
            "fragmentation": usage.fragmentation / total}


def _with_engine(config: EngineConfig, body):
    """Build an LLMEngine for config, call body(engine), free the engine (its KV tensors are large)."""
    from pagedserve.engine import LLMEngine
    engine = LLMEngine(config)
    try:
        return body(engine)
    finally:
        del engine
        gc.collect()


def _kv_bytes_per_block(engine) -> int:
    from pagedserve.runner import kv_bytes_per_block
    mc = engine.model_config
    return kv_bytes_per_block(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                              engine.config.block_size, engine.dtype)


def unshared_pool_config(base: EngineConfig, items: list[WorkloadItem], copies: int) -> EngineConfig:
    """Paged allocation, prefix caching off (only a request's own sequences share), and a pool that holds
    `copies` sequences of every item whole, each with its own blocks (plus one block per item): nothing is
    preempted, with sharing or without."""
    blocks = copies * sum(cdiv(it.prompt_len + it.max_tokens, base.block_size) for it in items) + len(items)
    return base.replace(enable_prefix_caching=False, kv_reservation="none", num_kv_blocks=blocks,
                        max_num_seqs=max(base.max_num_seqs, copies * len(items)))


def run_policy(config: EngineConfig, items: list[WorkloadItem], progress: bool = False) -> dict:
    """bench.throughput.run_engine on a fresh engine, plus the engine's slot accounting (Figure 2's split)."""
    def body(engine):
        r = run_engine(engine, items, 0.0, progress)
        usage = engine.kv_cache.usage_sum
        r.update(slot_shares=slot_shares(usage), slot_steps=dataclasses.asdict(usage),
                 kv_bytes_per_block=_kv_bytes_per_block(engine), model=engine.model_name,
                 enable_prefix_caching=engine.config.enable_prefix_caching,
                 prefill_tokens_computed=r["prefix_cache_queries"] - r["prefix_cache_hits"])
        return r
    return _with_engine(config, body)


# ---- sections 1 and 2: KV memory and throughput at fixed budgets -------------------------------
def budget_sweep(base: EngineConfig, items: list[WorkloadItem], budgets: list[int], policies: list[str],
                 log: Log, progress: bool = False) -> list[dict]:
    """run_policy for every (KV budget in blocks, reservation policy)."""
    runs = []
    for blocks in budgets:
        for policy in policies:
            t0 = time.perf_counter()
            r = run_policy(base.replace(num_kv_blocks=blocks, kv_reservation=policy), items, progress)
            runs.append(r)
            log(f"budget {blocks} blocks, kv_reservation={policy}: {r['output_tokens_per_s']:.1f} out tok/s, "
                f"mean running {r['mean_running_requests']:.1f}, token states "
                f"{100 * r['slot_shares']['token_states']:.1f}% ({time.perf_counter() - t0:.0f} s)")
    return runs


def static_batch_cache_tokens(items: list[WorkloadItem], batch_size: int) -> int:
    """Token slots transformers' contiguous cache needs for the largest of the static batches.

    A left-padded batch of b requests holds b rows of (longest prompt + longest output) slots.
    """
    need = 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        need = max(need, len(batch) * (max(it.prompt_len for it in batch) + max(it.max_tokens for it in batch)))
    return need


def largest_static_batch(items: list[WorkloadItem], budget_tokens: int) -> int:
    """The largest batch size whose every batch (in workload order) fits budget_tokens; 0 if none does."""
    return max((b for b in range(1, len(items) + 1) if static_batch_cache_tokens(items, b) <= budget_tokens),
               default=0)


def hf_static_at_budgets(model_path: str, dtype, items: list[WorkloadItem], budgets: list[int], block_size: int,
                         log: Log, progress: bool = False) -> list[dict]:
    """transformers' static batching at the largest batch each KV budget holds (bench.hf_baseline)."""
    from pagedserve.bench.hf_baseline import run_hf_baseline
    sizes = {blocks: largest_static_batch(items, blocks * block_size) for blocks in budgets}
    wanted = sorted({b for b in sizes.values() if b > 0})
    log(f"transformers static batching at batch sizes {wanted} (budgets {budgets} blocks)")
    hf = run_hf_baseline(model_path, dtype, items, wanted, progress) if wanted else {"runs": []}
    by_size = {r["batch_size"]: r for r in hf["runs"]}
    out = []
    for blocks in budgets:
        b = sizes[blocks]
        row = {"num_kv_blocks": blocks, "budget_tokens": blocks * block_size, "batch_size": b,
               "cache_tokens_needed": static_batch_cache_tokens(items, b) if b else None}
        if b:
            row.update({k: v for k, v in by_size[b].items() if k != "batch_size"})
            row.update(transformers=hf.get("transformers"), mlp_layers=hf.get("mlp_layers"))
            log(f"transformers static batch {b} (budget {blocks} blocks): {row['output_tokens_per_s']:.1f} out tok/s")
        out.append(row)
    return out


# ---- section 3: shared prefixes --------------------------------------------------------------
def prefix_sharing(base: EngineConfig, items: list[WorkloadItem], log: Log, progress: bool = False) -> dict:
    """The shared workload with prefix caching on and off (paged allocation both times)."""
    out = {}
    for on in (True, False):
        r = run_policy(base.replace(enable_prefix_caching=on, kv_reservation="none"), items, progress)
        out["on" if on else "off"] = r
        log(f"prefix caching {'on' if on else 'off'}: peak {r['kv_blocks_peak']} blocks, "
            f"{r['prefill_tokens_computed']} prefill tokens computed, {r['output_tokens_per_s']:.1f} out tok/s")
    return out


# ---- section 4: parallel sampling -------------------------------------------------------------
def drive(engine) -> dict:
    """Step an engine until its requests finish; per-step samples of the blocks in use."""
    blocks_sum = steps = out_tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            out_tokens += sum(len(c.token_ids) for c in out.outputs)
        blocks_sum += engine.kv_cache.num_used_blocks
        steps += 1
    elapsed = time.perf_counter() - t0
    stats = engine.stats()
    return {"steps": steps, "blocks_mean": blocks_sum / steps if steps else 0.0, "blocks_peak": stats["kv_blocks_peak"],
            "output_tokens": out_tokens, "elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "num_preemptions": stats["num_preemptions"]}


def parallel_sampling(base: EngineConfig, items: list[WorkloadItem], ns: list[int], log: Log) -> list[dict]:
    """n samples per prompt as one request (forked, sharing the prompt's blocks) against n independent requests.

    Prefix caching is off in both, so the independent requests share nothing; the pool holds every
    sequence at once, so neither run preempts.
    """
    rows = []
    for n in ns:
        config = unshared_pool_config(base, items, n)
        row = {"n": n, "num_prompts": len(items), "num_kv_blocks": config.num_kv_blocks}
        for mode in ("shared", "independent"):
            row[mode] = _with_engine(config, lambda engine, shared=mode == "shared", n=n:
                                     _sample_n(engine, items, n, shared))
        sh, ind = row["shared"], row["independent"]
        row["saving_mean"] = 1 - sh["blocks_mean"] / ind["blocks_mean"]
        row["saving_peak"] = 1 - sh["blocks_peak"] / ind["blocks_peak"]
        log(f"n={n}: mean blocks {sh['blocks_mean']:.0f} shared vs {ind['blocks_mean']:.0f} independent "
            f"({100 * row['saving_mean']:.1f}% saved; peak {100 * row['saving_peak']:.1f}%)")
        rows.append(row)
    return rows


def _sample_n(engine, items: list[WorkloadItem], n: int, shared: bool) -> dict:
    """Submit every prompt for n samples (one request with n, or n requests), then drive the engine."""
    from pagedserve.sampling_params import SamplingParams
    for it in items:
        prompt = {"prompt_token_ids": it.prompt_token_ids}
        if shared:
            engine.add_request(it.id, prompt, SamplingParams(n=n, temperature=1.0, max_tokens=it.max_tokens,
                                                             ignore_eos=True))
        else:
            for i in range(n):
                engine.add_request(f"{it.id}/{i}", prompt, SamplingParams(temperature=1.0, max_tokens=it.max_tokens,
                                                                          ignore_eos=True))
    return drive(engine)


# ---- section 6: why a KV cache -----------------------------------------------------------------
def cache_vs_recompute(base: EngineConfig, token_ids: list[int], lengths: list[int], log: Log,
                       decode_steps: int = 8) -> list[dict]:
    """Time of one generated token at context length L: a decode step over the cache, against a
    forward over the whole L-token prefix (what every token costs when nothing is cached)."""
    from pagedserve.sampling_params import SamplingParams
    longest = max(lengths)
    config = base.replace(enable_prefix_caching=False, kv_reservation="none",
                          max_num_batched_tokens=max(base.max_num_batched_tokens, longest),
                          num_kv_blocks=cdiv(longest + decode_steps + 1, base.block_size) + 1)
    tokens = (token_ids * (longest // len(token_ids) + 1))[:longest]

    def one(engine, L: int) -> dict:
        engine.add_request(f"L{L}", {"prompt_token_ids": tokens[:L]},
                           SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True, temperature=0.0))
        t0 = time.perf_counter()
        engine.step()  # the whole prefix in one forward
        full = time.perf_counter() - t0
        steps = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        return {"length": L, "recompute_ms": 1000 * full, "cached_ms": 1000 * statistics.median(steps)}

    def body(engine):
        one(engine, min(lengths))  # warm-up: first calls allocate and pick kernels
        rows = []
        for L in lengths:
            row = one(engine, L)
            rows.append(row)
            log(f"context {L}: {row['cached_ms']:.1f} ms/token with the cache, "
                f"{row['recompute_ms']:.1f} ms recomputing")
        return rows
    return _with_engine(config, body)


# ---- section 7: beam search ---------------------------------------------------------------------
def beam_search(base: EngineConfig, items: list[WorkloadItem], widths: list[int], log: Log) -> dict:
    """Per beam width, every item's beam search (its workload output length, EOS ignored) submitted at once:
    benchmarks/beam_memory.py's measure, the blocks held against the same live beams each with its own
    table. One engine, its pool holding every beam of the widest search unshared, so nothing is preempted."""
    from benchmarks.beam_memory import measure
    config = unshared_pool_config(base, items, max(widths))
    prompts, lengths = [it.prompt_token_ids for it in items], [it.max_tokens for it in items]

    def body(engine) -> list[dict]:
        rows = []
        for k in widths:
            r = measure(engine, prompts, lengths, k, batched=True)
            rows.append(r)
            log(f"beam width {k}: mean blocks {r['blocks_mean']:.0f} held vs {r['unshared_blocks_mean']:.0f} "
                f"unshared ({100 * r['saving_mean']:.1f}% saved; peak {100 * r['saving_peak']:.1f}%), "
                f"{r['beam_tokens_per_s']:.1f} beam tok/s, {r['num_preemptions']} preemptions")
        return rows
    return {"num_kv_blocks": config.num_kv_blocks, "block_size": config.block_size, "batched": True,
            "workload": workload_summary(items), "runs": _with_engine(config, body)}


def kv_tier(base: EngineConfig, items: list[WorkloadItem], pool_blocks: int, offload_memory: str,
            concurrency: int, log: Log, progress: bool = False) -> dict:
    """Section 8: the multiturn conversations through a pool of pool_blocks blocks with no tier, with the tier
    (recompute preemption) and with the tier and swap preemption: pagedserve.bench.multiturn's run_modes."""
    from pagedserve.bench.multiturn import MODES, conversations, run_modes
    convs = conversations(items)
    config = base.replace(num_kv_blocks=pool_blocks, enable_prefix_caching=True, kv_reservation="none",
                          preemption_mode="recompute")
    log(f"  {len(convs)} conversations, {concurrency} at once, pool {pool_blocks} blocks, tier {offload_memory}")
    runs = run_modes(config, convs, list(MODES), offload_memory, concurrency, progress)
    return {"num_kv_blocks": pool_blocks, "block_size": base.block_size, "kv_offload_memory": offload_memory,
            "concurrency": concurrency, "workload": workload_summary(items), "runs": runs}


def swap_or_recompute(base: EngineConfig, items: list[WorkloadItem], block_sizes: list[int], pool_tokens: int,
                      context_tokens: int, offload_memory: str, log: Log, progress: bool = False) -> dict:
    """Section 9: benchmarks/preemption_modes.py, the mechanism alone and end to end, at each block size."""
    from benchmarks.preemption_modes import end_to_end, mechanism
    log(f"  restoring {context_tokens} tokens at block sizes {block_sizes}")
    mech = mechanism(base, block_sizes, context_tokens, offload_memory)
    log(f"  {len(items)} chat requests in a pool of {pool_tokens} tokens, recompute and swap")
    e2e = end_to_end(base, items, block_sizes, pool_tokens, offload_memory, progress)
    return {"pool_tokens": pool_tokens, "context_tokens": context_tokens, "kv_offload_memory": offload_memory,
            "workload": workload_summary(items), "mechanism": mech, "end_to_end": e2e}


def stderr_log(start: float) -> Log:
    def log(msg: str) -> None:
        print(f"[report {time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)
    return log
