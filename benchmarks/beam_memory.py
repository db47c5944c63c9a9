"""Beam search's KV memory with shared blocks against the same beams without sharing, and its speed against
transformers' beam search, on the chat workload's prompts (the paper's section 4.4 / Figure 14 question).

    python -m benchmarks.beam_memory --workload chat.jsonl [--num-prompts 8] [--widths 2,4,6] [--max-tokens 64]

Memory: after every engine step, the blocks the engine holds (beams fork their parent's table, copy-on-write)
and the blocks the same live beams would hold each with its own table (sum over beams of ceil(tokens / block
size)): the counterfactual of an engine without sharing, from the same run. Mean and peak over the steps.
Speed: the same prompts one at a time, beam_width wide, max_tokens new tokens, ignore_eos (every search does
the same work), here and with transformers' generate(num_beams=k) on its own load of the model, float32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pagedserve.engine import LLMEngine
from pagedserve.sampling_params import BeamSearchParams


def load_prompts(path: str, n: int, max_len: int) -> list[list[int]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [r["prompt_token_ids"][:max_len] for r in rows[:n]]


def run_ours(engine: LLMEngine, prompts, params: BeamSearchParams) -> tuple[float, list[int], list[int]]:
    """Seconds for all prompts one at a time; per step, blocks held and blocks an unshared engine would hold."""
    B = engine.config.block_size
    held, unshared = [], []
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", {"prompt_token_ids": p}, params)
        while engine.has_unfinished_requests():
            engine.step()
            live = engine.live_requests()
            if live:
                held.append(engine.stats(detailed=False)["kv_blocks_used"])
                unshared.append(sum(-(-r.num_tokens // B) for r in live))
    return time.perf_counter() - start, held, unshared


def run_hf(ref, prompts, k: int, max_tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), num_beams=k,
                         do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         num_return_sequences=k)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--widths", default="2,4,6")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' timing")
    args = ap.parse_args()
    prompts = load_prompts(args.workload, args.num_prompts, args.max_prompt_len)
    engine = LLMEngine(dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    ref = None
    if not args.no_hf:
        import os

        from transformers import AutoModelForCausalLM

        from pagedserve.model.loader import default_model_path
        path = default_model_path()
        ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   dtype=torch.float32).eval()
    print(f"{len(prompts)} prompts (mean {statistics.mean(map(len, prompts)):.0f} tokens), {args.max_tokens} new "
          f"tokens each, ignore_eos, block size {engine.config.block_size}, {torch.get_num_threads()} threads")
    print(f"{'width':>5} {'mean blocks':>11} {'unshared':>9} {'saved':>6} {'peak':>5} {'unshared':>9} {'saved':>6}"
          f" {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6}")
    for k in map(int, args.widths.split(",")):
        params = BeamSearchParams(beam_width=k, max_tokens=args.max_tokens, ignore_eos=True, early_stopping="never")
        secs, held, unshared = run_ours(engine, prompts, params)
        tokens = len(prompts) * k * args.max_tokens  # beam tokens computed
        hf = run_hf(ref, prompts, k, args.max_tokens) if ref is not None else float("nan")
        mean_h, mean_u = statistics.mean(held), statistics.mean(unshared)
        print(f"{k:>5} {mean_h:11.1f} {mean_u:9.1f} {1 - mean_h / mean_u:6.1%} {max(held):5d} {max(unshared):9d} "
              f"{1 - max(held) / max(unshared):6.1%} {tokens / secs:10.1f} {tokens / hf:9.1f} {hf / secs:6.2f}")


if __name__ == "__main__":
    main()
