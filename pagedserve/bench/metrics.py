"""Serving metrics from per-request timings, defined as vLLM's `bench serve` defines them.

- TTFT: request sent -> first streamed chunk carrying output.
- ITL: gaps between consecutive output chunks, pooled over all requests.
- TPOT: per request, (e2e - ttft) / (output_tokens - 1), for requests with more than one token.
- E2E latency: request sent -> last output chunk.
- Normalized latency (the PagedAttention paper's metric): mean over requests of e2e / output_tokens.
Latencies come out in milliseconds (normalized latency in seconds per token).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one request of a serving benchmark saw; times in seconds."""
    success: bool
    prompt_len: int
    output_tokens: int = 0      # from the usage chunk when the server sent one, else the output chunks
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0        # end to end
    start_time: float = 0.0     # when it was sent, from the benchmark's start
    error: str = ""


def summarize(values: list[float], name: str, unit: str = "ms", scale: float = 1000.0,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict:
    """{mean_<name>_<unit>, median_..., std_..., p50_..., ...} of values (seconds) * scale; None when empty."""
    arr = np.asarray(values, dtype=np.float64) * scale
    empty = arr.size == 0
    out = {f"mean_{name}_{unit}": None if empty else float(arr.mean()),
           f"median_{name}_{unit}": None if empty else float(np.median(arr)),
           f"std_{name}_{unit}": None if empty else float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_{unit}"] = None if empty else float(np.percentile(arr, p))
    return out


def tpot(r: RequestResult) -> float | None:
    """Time per output token after the first, or None for a one-token (or failed) request."""
    if not r.success or r.output_tokens < 2:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def serving_metrics(results: list[RequestResult], duration_s: float,
                    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict:
    """The aggregate numbers of a serving run: counts, throughputs and latency distributions."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
         "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
         "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
         "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0}
    m.update(summarize([r.ttft for r in ok], "ttft", percentiles=percentiles))
    m.update(summarize([t for r in ok if (t := tpot(r)) is not None], "tpot", percentiles=percentiles))
    m.update(summarize([g for r in ok for g in r.itl], "itl", percentiles=percentiles))
    m.update(summarize([r.latency for r in ok], "e2el", percentiles=percentiles))
    norm = [r.latency / r.output_tokens for r in ok if r.output_tokens > 0]
    m["mean_normalized_latency_s_per_token"] = float(np.mean(norm)) if norm else None
    return m
