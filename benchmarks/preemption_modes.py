"""Swap against recompute preemption by block size: the PagedAttention paper's Figure 19 question.

    python -m benchmarks.preemption_modes --workload chat.jsonl [--block-sizes 8,16,32,64] [--num-requests 16]

(a) The mechanism alone: restoring a context of --context-tokens tokens, by copying its blocks to the second
    tier and back (the runner's own copies, offload_blocks + load_blocks) or by computing it again (one prefill
    forward of those tokens), at each block size.
(b) End to end: the workload's requests, all at once, in a pool of --pool-tokens tokens (so that requests are
    preempted), with preemption_mode recompute and swap at each block size: time, preemptions, prefill tokens
    computed, blocks copied and the seconds the copies took (timed around the runner's run_transfers).
"""
from __future__ import annotations

import argparse
import gc
import time

from pagedserve.bench.workload import WorkloadItem
from pagedserve.config import EngineConfig
from pagedserve.outputs import BlockTransfers, ScheduledSequence, SchedulerOutput


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def mechanism(base: EngineConfig, block_sizes: list[int], context_tokens: int, offload_memory: str | int,
              repeats: int = 5) -> list[dict]:
    """(a): seconds to copy a context's blocks to the tier, back, and to compute the context again."""
    from pagedserve.engine import LLMEngine
    rows = []
    for bs in block_sizes:
        n = -(-context_tokens // bs)
        engine = LLMEngine(base.replace(block_size=bs, num_kv_blocks=n, kv_offload_memory=offload_memory,
                                        max_num_batched_tokens=max(base.max_num_batched_tokens, context_tokens)))
        if engine.stats()["kv_offload_blocks"] < n:
            raise ValueError(f"kv_offload_memory={offload_memory!r} holds fewer than the {n} blocks of the context")
        runner = engine.runner
        blocks = list(range(n))
        out = SchedulerOutput(transfers=BlockTransfers(offload=[(b, b) for b in blocks]))
        back = SchedulerOutput(transfers=BlockTransfers(load=[(b, b) for b in blocks]))
        tokens = [3 + i % 256 for i in range(context_tokens)]  # ordinary ids of any vocabulary, tiny ones too
        prefill = SchedulerOutput(sequences=[ScheduledSequence("r", tokens, 0, blocks, True)])
        runner.execute(prefill)  # warm-up
        rows.append({"block_size": bs, "blocks": n, "context_tokens": context_tokens,
                     "swap_out_s": _median_time(lambda: runner.run_transfers(out), repeats),
                     "swap_in_s": _median_time(lambda: runner.run_transfers(back), repeats),
                     "recompute_s": _median_time(lambda: runner.execute(prefill), repeats)})
        del engine, runner
        gc.collect()
    return rows


def end_to_end(base: EngineConfig, items: list[WorkloadItem], block_sizes: list[int], pool_tokens: int,
               offload_memory: str | int, progress: bool = False) -> list[dict]:
    """(b): the items through a fresh engine per (block size, mode), the pool pool_tokens tokens at each size."""
    from pagedserve.bench.throughput import run_engine
    from pagedserve.engine import LLMEngine
    rows = []
    for bs in block_sizes:
        for mode in ("recompute", "swap"):
            config = base.replace(block_size=bs, num_kv_blocks=pool_tokens // bs, kv_offload_memory=offload_memory,
                                  preemption_mode=mode, enable_prefix_caching=False)
            engine = LLMEngine(config)
            copy_s = [0.0]
            real = engine.runner.run_transfers

            def timed(sched, real=real, copy_s=copy_s):
                t = time.perf_counter()
                real(sched)
                copy_s[0] += time.perf_counter() - t
            engine.runner.run_transfers = timed  # observed from outside: the engine's code is unchanged
            r = run_engine(engine, items, progress=progress)
            s = engine.stats(detailed=False)
            rows.append({"block_size": bs, "mode": mode, "num_kv_blocks": config.num_kv_blocks,
                         "elapsed_s": r["elapsed_s"], "output_tokens_per_s": r["output_tokens_per_s"],
                         "num_preemptions": r["num_preemptions"], "num_swapped_out": s["num_swapped_out"],
                         "prefill_tokens_computed": s["prefill_tokens_computed"],
                         "prompt_tokens": r["prompt_tokens"], "kv_blocks_offloaded": s["kv_blocks_offloaded"],
                         "kv_blocks_loaded": s["kv_blocks_loaded"], "copy_s": copy_s[0]})
            del engine
            gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    from pagedserve.bench.results import format_table, result_header, save_result
    from pagedserve.bench.workload import load_workload
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, help="chat .jsonl from `pagedserve bench workload chat`")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--block-sizes", default="8,16,32,64")
    p.add_argument("--context-tokens", type=int, default=1024, help="(a): the context restored")
    p.add_argument("--pool-tokens", type=int, default=2048, help="(b): the pool's size in tokens at every block size")
    p.add_argument("--kv-offload-memory", default="2GiB")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--save-result", default=None)
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.block_sizes.split(",")]
    base = EngineConfig(model=args.model, dtype=args.dtype)
    mech = mechanism(base, sizes, args.context_tokens, args.kv_offload_memory)
    print(format_table(["block size", "blocks", "swap out ms", "swap in ms", "recompute ms"],
                       [[r["block_size"], r["blocks"], r["swap_out_s"] * 1e3, r["swap_in_s"] * 1e3,
                         r["recompute_s"] * 1e3] for r in mech]))
    items = load_workload(args.workload, args.num_requests)
    e2e = end_to_end(base, items, sizes, args.pool_tokens, args.kv_offload_memory, progress=True)
    print(format_table(["block size", "mode", "seconds", "out tok/s", "preemptions", "swaps", "prefill computed",
                        "blocks out", "blocks in", "copy s"],
                       [[r["block_size"], r["mode"], r["elapsed_s"], r["output_tokens_per_s"], r["num_preemptions"],
                         r["num_swapped_out"], r["prefill_tokens_computed"], r["kv_blocks_offloaded"],
                         r["kv_blocks_loaded"], r["copy_s"]] for r in e2e]))
    if args.save_result:
        save_result(args.save_result, {**result_header(args), "mechanism": mech, "end_to_end": e2e})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
