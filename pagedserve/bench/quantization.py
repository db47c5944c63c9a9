"""`pagedserve bench quantization`: what keeping a GGUF's weights quantized costs and buys.

For a .gguf model, against the same file dequantized to float32 (quantization="none"):
- perplexity on a fixed English text (CPython's own reference manual, pydoc_data.topics, so every
  machine has it), scored as llama.cpp's `llama-perplexity` does: chunks of `ctx` tokens, each scoring
  its second half, so the two tools' numbers on the same file can be set side by side;
- greedy agreement: on each workload prompt, how many greedy tokens the two modes share before the
  first difference;
- one stream's decode time per token (after the first token), median over the prompts.
"""
from __future__ import annotations

import statistics
import time

import torch

from pagedserve.attention import AttentionMetadata


def reference_text() -> str:
    """English prose that ships with every CPython: the reference manual's topics, in key order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def sequence_nll(model, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Negative log-likelihood [T-1] of tokens 1.. given the ones before, in one prefill of a fresh cache."""
    cfg = model.config
    t = len(token_ids)
    nb = -(-t // block_size)
    dtype = model.norm.weight.dtype
    shape = (nb + 1, block_size, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata.build([list(range(nb))], [t], [t], block_size, null_block=nb)
    ids = torch.tensor(token_ids, dtype=torch.int64)
    hidden = model(ids, torch.arange(t), caches, meta)
    logp = torch.log_softmax(model.compute_logits(hidden[:-1]), dim=-1)
    return -logp.gather(1, ids[1:, None])[:, 0]


def perplexity(model, token_ids: list[int], ctx: int, chunks: int, bos_token_id: int | None = None) -> dict:
    """llama-perplexity's measure: `chunks` windows of `ctx` tokens (the first one replaced by BOS when the
    model adds one), each scoring the tokens after its first half, ctx / 2 + 1 .. ctx - 1."""
    nll: list[torch.Tensor] = []
    for c in range(chunks):
        window = token_ids[c * ctx:(c + 1) * ctx]
        if len(window) < ctx:
            break
        if bos_token_id is not None:
            window = [bos_token_id] + window[1:]
        nll.append(sequence_nll(model, window)[ctx // 2:])  # entry j scores token j + 1
    scored = torch.cat(nll)
    return {"ppl": float(torch.exp(scored.mean())), "tokens_scored": scored.numel(), "chunks": len(nll), "ctx": ctx}


def greedy_tokens_and_tpot(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Each prompt alone (one stream), greedy, ignore_eos: its tokens and its mean decode seconds per token."""
    from pagedserve import SamplingParams
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens, tpot = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{i}", {"prompt_token_ids": prompt}, params)
        first, got = None, []
        while engine.has_unfinished_requests():
            for o in engine.step():  # each output carries the step's new tokens
                got += o.outputs[0].token_ids
            if first is None and got:
                first = time.perf_counter()
        tokens.append(got)
        if len(got) > 1:
            tpot.append((time.perf_counter() - first) / (len(got) - 1))
    return tokens, tpot


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Tokens shared before the first difference, per prompt, and the share of all tokens that agree so."""
    prefix = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), min(len(u), len(v))) for u, v in zip(a, b)]
    total = sum(len(u) for u in a)
    return {"prefix_tokens": prefix, "agreeing_fraction": sum(prefix) / total if total else 0.0,
            "identical_prompts": sum(p == len(u) for p, u in zip(prefix, a)), "prompts": len(a)}


def run(model: str | None, prompts: list[list[int]], max_tokens: int, ctx: int, chunks: int,
        num_threads: int | None) -> dict:
    from pagedserve import LLM
    result: dict = {"modes": {}}
    tokens = {}
    for mode in ("none", "gguf"):
        llm = LLM(model=model, quantization=mode, dtype="float32", num_threads=num_threads)
        tok = llm.llm_engine.tokenizer
        adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
        text_ids = tok(reference_text(), add_special_tokens=False)["input_ids"]
        ppl = perplexity(llm.llm_engine.loaded.model, text_ids, ctx, chunks, tok.bos_token_id if adds_bos else None)
        toks, tpot = greedy_tokens_and_tpot(llm, prompts, max_tokens)
        tokens[mode] = toks
        result["modes"][mode] = {**ppl, "tpot_ms_median": 1e3 * statistics.median(tpot) if tpot else None,
                                 "tpot_ms_all": [1e3 * t for t in tpot]}
        del llm
    result["agreement"] = agreement(tokens["none"], tokens["gguf"])
    return result


def format_result(r: dict) -> str:
    lines = ["mode   perplexity  (tokens scored)  decode ms/token (one stream, median)"]
    for mode, m in r["modes"].items():
        lines.append(f"{mode:6s} {m['ppl']:10.4f}  ({m['tokens_scored']:>6d})         {m['tpot_ms_median']:.2f}")
    a = r["agreement"]
    lines.append(f"greedy agreement: {a['agreeing_fraction']:.1%} of tokens before the first difference; "
                 f"{a['identical_prompts']}/{a['prompts']} prompts identical; prefixes {a['prefix_tokens']}")
    return "\n".join(lines)
