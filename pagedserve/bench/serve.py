"""A load generator for any OpenAI-compatible server (ours, vLLM, llama.cpp's server).

Each workload item is sent to /v1/completions as a token-id prompt with its exact output
length (max_tokens = min_tokens, ignore_eos), streamed with usage in the last chunk.
Arrivals are Poisson at request_rate (inf: all at once), at most max_concurrency in flight.
Metrics are defined in pagedserve.bench.metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import time

import httpx

from pagedserve.bench.metrics import DEFAULT_PERCENTILES, RequestResult, serving_metrics
from pagedserve.bench.results import LoadMonitor
from pagedserve.bench.workload import WorkloadItem


def completion_payload(item: WorkloadItem, model: str | None) -> dict:
    payload = {"prompt": item.prompt_token_ids, "max_tokens": item.max_tokens, "min_tokens": item.max_tokens,
               "ignore_eos": True, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}}
    if model is not None:
        payload["model"] = model
    return payload


def arrival_times(n: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times (s from start) of n requests: a Poisson process at request_rate; all 0 if inf."""
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, prompt_len: int,
                       headers: dict, t_start: float) -> RequestResult:
    """Stream one completion; a chunk counts as output when its first choice carries text."""
    res = RequestResult(success=False, prompt_len=prompt_len)
    st = time.perf_counter()
    res.start_time = st - t_start
    last = st
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return res
                now = time.perf_counter()
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                    if chunks == 0:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    res.latency = last - st
    res.success = chunks > 0
    if not res.success:
        res.error = "the stream carried no output"
    return res


async def _discover_model(client: httpx.AsyncClient, base_url: str, headers: dict) -> str | None:
    """The first model of /v1/models, or None if the server does not say (the field is then omitted)."""
    try:
        r = await client.get(base_url + "/v1/models", headers=headers)
        data = r.json().get("data") or []
        return data[0]["id"] if r.status_code == 200 and data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


async def run_serve_benchmark_async(base_url: str, items: list[WorkloadItem], *, endpoint: str = "/v1/completions",
                                    model: str | None = None, api_key: str | None = None,
                                    request_rate: float = math.inf, max_concurrency: int | None = None,
                                    seed: int = 0, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
                                    progress: bool = False) -> dict:
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(items) or 1, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        if model is None:
            model = await _discover_model(client, base_url, headers)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        times = arrival_times(len(items), request_rate, seed)
        done = 0

        async def one(item: WorkloadItem, at: float) -> RequestResult:
            nonlocal done
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with gate:
                r = await send_request(client, base_url + endpoint, completion_payload(item, model),
                                       item.prompt_len, headers, t0)
            done += 1
            load.poll()
            if progress and (done % max(1, len(items) // 10) == 0 or done == len(items)):
                print(f"  {done}/{len(items)} requests done, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            return r

        load = LoadMonitor()  # the machine's load during the run (server included when it is local)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(it, at) for it, at in zip(items, times)))
        duration = time.perf_counter() - t0

    metrics = serving_metrics(results, duration, percentiles)
    errors = [r.error for r in results if not r.success]
    return {"base_url": base_url, "endpoint": endpoint, "model": model, "num_requests": len(items),
            "request_rate": request_rate if not math.isinf(request_rate) else "inf",
            "max_concurrency": max_concurrency, "seed": seed, **metrics, **load.summary(),
            "errors": errors[:10],
            "per_request": {"input_lens": [r.prompt_len for r in results],
                            "output_lens": [r.output_tokens for r in results],
                            "ttfts": [r.ttft for r in results], "e2els": [r.latency for r in results],
                            "start_times": [r.start_time for r in results],
                            "success": [r.success for r in results]}}


def run_serve_benchmark(base_url: str, items: list[WorkloadItem], **kwargs) -> dict:
    """Synchronous wrapper of run_serve_benchmark_async (call it from code without a running event loop)."""
    return asyncio.run(run_serve_benchmark_async(base_url, items, **kwargs))
