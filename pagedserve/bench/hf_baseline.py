"""The Hugging Face transformers baseline: `generate` with static batches.

Requests are taken in workload order, batch_size at a time, left-padded; each batch
generates to its longest request (min_new_tokens = max_new_tokens = that length, greedy),
as a static-batching server must. Only each request's own max_tokens count as output:
the tokens a short request generates while it waits for the batch's longest are waste.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from pagedserve.bench.flops import ModelShape, workload_flops
from pagedserve.bench.results import LoadMonitor
from pagedserve.bench.workload import WorkloadItem


def load_hf_model(model_path: str, dtype: torch.dtype):
    """A transformers causal LM from a HF folder or a .gguf file (dequantized to dtype by transformers)."""
    from transformers import AutoModelForCausalLM
    if model_path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path),
                                                    gguf_file=os.path.basename(model_path), dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()


def _pad_token_id(model) -> int:
    gc = model.generation_config
    for cand in (gc.pad_token_id, gc.eos_token_id, model.config.eos_token_id, 0):
        if isinstance(cand, (list, tuple)):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask: [B, longest prompt], padded on the left."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def run_hf_static(model, items: list[WorkloadItem], batch_size: int, progress: bool = False) -> dict:
    """Run items through model.generate in static batches of batch_size; returns the measured numbers."""
    pad_id = _pad_token_id(model)
    generated = 0  # tokens produced, waste included
    load = LoadMonitor(every_s=0.0)  # polled once per batch
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        longest = max(it.max_tokens for it in batch)
        ids, mask = left_pad([it.prompt_token_ids for it in batch], pad_id)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                 min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
        new = out.shape[1] - ids.shape[1]
        if new != longest:  # min_new_tokens must have held EOS off; a shorter run would overstate speed
            raise RuntimeError(f"transformers generated {new} tokens where {longest} were asked")
        generated += new * len(batch)
        load.poll()
        if progress:
            done = min(start + batch_size, len(items))
            el = time.perf_counter() - t0
            print(f"  [hf batch {batch_size}] {done}/{len(items)} requests, {el:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    prompt = sum(it.prompt_len for it in items)
    output = sum(it.max_tokens for it in items)  # useful tokens only
    flops = workload_flops(ModelShape.of(model.config), [it.prompt_len for it in items],
                           [it.max_tokens for it in items])
    return {
        "engine": "transformers", "batch_size": batch_size, "dtype": str(model.dtype),
        "attn_implementation": model.config._attn_implementation,
        "num_requests": len(items), "elapsed_s": elapsed,
        "prompt_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output,
        "generated_tokens_incl_padding": generated,
        "requests_per_s": len(items) / elapsed, "output_tokens_per_s": output / elapsed,
        "total_tokens_per_s": (prompt + output) / elapsed,
        "gflops": flops / 1e9, "gflop_per_s": flops / 1e9 / elapsed,
        **load.summary(),
    }


def run_hf_baseline(model_path: str, dtype: torch.dtype, items: list[WorkloadItem], batch_sizes: list[int],
                    progress: bool = False, on_run=None) -> dict:
    """run_hf_static at each batch size on one loaded model; 'best' is the highest output tokens/s.

    on_run(partial_result) is called after each batch size (to save long runs as they go).
    """
    import transformers
    t0 = time.perf_counter()
    model = load_hf_model(model_path, dtype)
    # records that transformers dequantized a GGUF file into plain Linear layers in dtype, as we do
    mlp = next((m for n, m in model.named_modules() if n.endswith("down_proj")), None)
    out = {"model_path": model_path, "transformers": transformers.__version__, "load_s": time.perf_counter() - t0,
           "mlp_layers": f"{type(mlp).__name__} in {model.dtype}", "runs": []}
    for bs in batch_sizes:
        out["runs"].append(run_hf_static(model, items, bs, progress))
        out["best"] = max(out["runs"], key=lambda r: r["output_tokens_per_s"])
        if on_run is not None:
            on_run(out)
    return out
