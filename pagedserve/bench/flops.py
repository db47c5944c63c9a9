"""Model FLOPs of a workload, so benchmarks can print achieved GFLOP/s beside tokens/s.

We count the useful work of a decoder-only transformer, whatever engine runs it:
- every token fed through the model (prompt tokens not served from the prefix cache, plus
  each generated token but the last, which is sampled and never fed back) costs
  2 FLOPs per multiply-add of the non-embedding weights (q, k, v, o, gate, up, down);
- attention costs 4 * num_heads * head_dim FLOPs per layer per (query, key) pair
  (QK^T and PV), the key span being the query's position + 1 (causal);
- the LM head (vocab x hidden) runs once per sampled token.
Work an engine wastes (padding, recompute after preemption) is not counted: the number
is comparable across engines doing the same requests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

PEAK_GEMM_SIZE = 2048  # the matrix product measure_peak_gflops times: n x n times n x n


def measure_peak_gflops(dtype, repeats: int = 5, n: int = PEAK_GEMM_SIZE) -> float:
    """This machine's matrix peak in GFLOP/s: the best of `repeats` timed n^3 products in dtype (torch's
    own GEMM, all of torch's threads), after one warm-up. The benchmarks print achieved GFLOP/s against it."""
    import torch
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, cfg) -> ModelShape:
        """From our ModelConfig or a transformers config (the same field names)."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim, cfg.vocab_size)

    @property
    def layer_params(self) -> int:
        """Weights of the linear layers of the transformer blocks (norms are negligible)."""
        q_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (q_o + k_v + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size


def request_flops(shape: ModelShape, prompt_len: int, output_len: int, cached_len: int = 0) -> float:
    """FLOPs to serve one request: prefill of the uncached prompt, then output_len - 1 decode inputs."""
    first, last = cached_len, prompt_len + output_len - 1   # positions [first, last) are fed through
    fed = max(last - first, 0)
    # sum of (position + 1) over fed positions: the key span of each query
    key_pairs = (last * (last + 1) - first * (first + 1)) // 2
    attention = 4 * shape.num_layers * shape.num_heads * shape.head_dim * key_pairs
    return 2.0 * shape.layer_params * fed + attention + 2.0 * shape.lm_head_params * output_len


def workload_flops(shape: ModelShape, prompt_lens: list[int], output_lens: list[int],
                   cached_lens: list[int] | None = None) -> float:
    cached_lens = cached_lens or [0] * len(prompt_lens)
    return sum(request_flops(shape, p, o, c) for p, o, c in zip(prompt_lens, output_lens, cached_lens))
