"""Beam search's KV memory with shared blocks against the same beams without sharing, and its speed against
transformers' beam search, on the chat workload's prompts (the paper's section 4.4; its saving in section 6.3,
Figure 15).

    python -m benchmarks.beam_memory --workload chat.jsonl [--num-prompts 8] [--widths 2,4,6] [--max-tokens 64]
                                     [--full-lengths] [--batched] [--no-hf]

Memory: after every engine step, the blocks the engine holds (beams fork their parent's table, copy-on-write)
and the blocks the same live beams would hold each with its own table: the sum over every live beam of every
search of ceil(tokens in its cache / block size), the counterfactual of an engine without sharing, from the
same run (a beam waiting to be computed again holds nothing either way). Mean and peak over the steps. Prefix
caching is off, so only the beams' own sharing counts. Each search runs to its max_tokens (ignore_eos,
early_stopping="never"): a fixed --max-tokens, or with --full-lengths each prompt's own workload output length.
The searches run one at a time, or with --batched all submitted at once (they share the engine and its pool).
Speed: beam tokens (width x max_tokens, summed over the prompts) per second, here and with transformers'
generate(num_beams=k) on its own load of the model, float32, one prompt at a time.

The report's section 7 (benchmarks/report_runs.py) calls measure() on its own engine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve.bench.workload import load_workload
from pagedserve.engine import LLMEngine
from pagedserve.sampling_params import BeamSearchParams


def load_prompts(path: str, n: int, max_len: int) -> tuple[list[list[int]], list[int]]:
    """The first n prompts of a workload file (each cut to max_len tokens) and their output lengths."""
    items = load_workload(path, n)
    return [it.prompt_token_ids[:max_len] for it in items], [it.max_tokens for it in items]


def measure(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int], beam_width: int,
            batched: bool) -> dict:
    """Every prompt's beam search of beam_width beams and max_tokens[i] tokens, one at a time or all at once
    (batched); per step, the blocks held and the blocks the live beams would hold unshared. The engine must be
    idle, with prefix caching off and paged allocation (kv_reservation none), so only the beams share."""
    if engine.config.enable_prefix_caching or engine.config.kv_reservation != "none":
        raise ValueError("measure needs prefix caching off and kv_reservation='none': only the beams' own "
                         "sharing may count")
    if engine.has_unfinished_requests():
        raise ValueError("measure needs an idle engine: every block held must belong to its beams")
    B = engine.config.block_size
    held, unshared = [], []
    preemptions = engine.stats(detailed=False)["num_preemptions"]
    batches = [range(len(prompts))] if batched else [[i] for i in range(len(prompts))]
    start = time.perf_counter()
    for batch in batches:
        for i in batch:
            engine.add_request(f"k{beam_width}-b{i}", {"prompt_token_ids": prompts[i]},
                               BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens[i], ignore_eos=True,
                                                early_stopping="never"))
        while engine.has_unfinished_requests():
            engine.step()
            live = engine.live_requests()
            if live:
                held.append(engine.stats(detailed=False)["kv_blocks_used"])
                # each beam alone: its cached tokens' blocks (the token sampled this step is written next step)
                unshared.append(sum(-(-r.num_computed_tokens // B) for r in live))
    elapsed = time.perf_counter() - start
    tokens = beam_width * sum(max_tokens)  # every beam's tokens: each search runs to its max_tokens
    mean_h, mean_u = statistics.mean(held), statistics.mean(unshared)
    return {"beam_width": beam_width, "num_prompts": len(prompts), "batched": batched, "steps": len(held),
            "blocks_mean": mean_h, "blocks_peak": max(held), "unshared_blocks_mean": mean_u,
            "unshared_blocks_peak": max(unshared), "saving_mean": 1 - mean_h / mean_u,
            "saving_peak": 1 - max(held) / max(unshared), "elapsed_s": elapsed, "beam_tokens": tokens,
            "beam_tokens_per_s": tokens / elapsed,
            "num_preemptions": engine.stats(detailed=False)["num_preemptions"] - preemptions}


def run_hf(ref, prompts, k: int, max_tokens: list[int]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for p, m in zip(prompts, max_tokens):
            ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), num_beams=k,
                         do_sample=False, max_new_tokens=m, min_new_tokens=m, num_return_sequences=k)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--workload", required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--widths", default="2,4,6")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per search (without --full-lengths)")
    ap.add_argument("--full-lengths", action="store_true", help="each prompt's own max_tokens from the workload")
    ap.add_argument("--batched", action="store_true",
                    help="submit every search at once (they share the engine and its pool); else one at a time")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' timing")
    args = ap.parse_args()
    prompts, lengths = load_prompts(args.workload, args.num_prompts, args.max_prompt_len)
    if not args.full_lengths:
        lengths = [args.max_tokens] * len(prompts)
    engine = LLMEngine(dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    ref = None
    if not args.no_hf:
        import os

        from transformers import AutoModelForCausalLM

        from pagedserve.model.loader import default_model_path
        path = default_model_path()
        ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   dtype=torch.float32).eval()
    new = (f"their workload's output lengths (mean {statistics.mean(lengths):.0f} new tokens)" if args.full_lengths
           else f"{args.max_tokens} new tokens each")
    how = "batched" + (" (transformers one at a time)" if ref is not None else "") if args.batched else "one at a time"
    print(f"{len(prompts)} prompts (mean {statistics.mean(map(len, prompts)):.0f} tokens), {new}, ignore_eos, "
          f"{how}, block size {engine.config.block_size}, {engine.stats(detailed=False)['num_kv_blocks']} KV "
          f"blocks, {torch.get_num_threads()} threads")
    print(f"{'width':>5} {'mean blocks':>11} {'unshared':>9} {'saved':>6} {'peak':>5} {'unshared':>9} {'saved':>6}"
          f" {'preempt':>7} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6}")
    for k in map(int, args.widths.split(",")):
        r = measure(engine, prompts, lengths, k, args.batched)
        hf = run_hf(ref, prompts, k, lengths) if ref is not None else float("nan")
        print(f"{k:>5} {r['blocks_mean']:11.1f} {r['unshared_blocks_mean']:9.1f} {r['saving_mean']:6.1%} "
              f"{r['blocks_peak']:5d} {r['unshared_blocks_peak']:9d} {r['saving_peak']:6.1%} "
              f"{r['num_preemptions']:7d} {r['beam_tokens_per_s']:10.1f} {r['beam_tokens'] / hf:9.1f} "
              f"{hf / r['elapsed_s']:6.2f}")


if __name__ == "__main__":
    main()
