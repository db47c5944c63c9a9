"""Prometheus metrics of one server, in its own registry (so several servers can live in one process).

Gauges and counters are read at scrape time from the engine's last stats snapshot (taken by the
engine thread; the HTTP side never touches the engine). Latency histograms are observed as each
request's deltas arrive, from the engine's own timestamps.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.outputs import RequestOutput

PREFIX = "pagedserve:"

# name (without prefix), stats key, help
GAUGES = (
    ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV cache blocks in use (1 = all); evictable cached blocks count as free."),
    ("num_requests_running", "num_requests_running", "Sequences running in the engine."),
    ("num_requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled."),
    ("kv_offload_usage_perc", "kv_offload_usage", "Fraction of the second KV tier's slots holding a block (0 without one)."),
)
# Counter names are given without "_total": prometheus_client appends it.
COUNTERS = (
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "num_preemptions", "Requests preempted (recomputed or swapped) for lack of KV cache blocks."),
    ("num_swapped_out", "num_swapped_out", "Preemptions that parked the request's blocks in the second KV tier."),
    ("kv_offload_hits", "kv_offload_hits", "Prompt tokens loaded from the second KV tier (part of the prefix-cache hits)."),
    ("kv_blocks_offloaded", "kv_blocks_offloaded", "KV blocks copied from the pool to the second tier."),
    ("kv_blocks_loaded", "kv_blocks_loaded", "KV blocks copied from the second tier back into the pool."),
    ("prefill_tokens_computed", "prefill_tokens_computed", "Tokens run through the model other than decode tokens "
                                                           "(prompts, and contexts recomputed after preemption)."),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens of accepted requests."),
    ("generation_tokens", "generation_tokens", "Tokens generated."),
)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)


class _StatsCollector:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, key, doc in GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(s.get(key, 0)))
        for name, key, doc in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=float(s.get(key, 0)))


class ServerMetrics:
    """One server's metrics. stats: returns the engine's latest stats() dict."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(stats))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between two steps that gave a request tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token of finished requests.")
        # Per identity: for the admin scope only (/metrics is refused to tenants under --auth-config).
        self.identity_requests = Counter(PREFIX + "identity_requests", "Requests per identity, by outcome (ok: "
                                         "answered below 400; denied: 4xx; error: 5xx).", ["identity", "outcome"],
                                         registry=self.registry)
        self.identity_tokens = Counter(PREFIX + "identity_tokens", "Prompt and completion tokens per identity.",
                                       ["identity", "kind"], registry=self.registry)

    def observe_identity(self, identity: str, status: int, usage: dict) -> None:
        """One identified request ended (AuthMiddleware's on_done)."""
        outcome = "ok" if status < 400 else "denied" if status < 500 else "error"
        self.identity_requests.labels(identity, outcome).inc()
        for kind in ("prompt", "completion"):
            if usage.get(f"{kind}_tokens"):
                self.identity_tokens.labels(identity, kind).inc(usage[f"{kind}_tokens"])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def tracker(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Observes one request's latencies from its deltas' engine timestamps (time.monotonic())."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_token_time: float | None = None

    def observe(self, delta: RequestOutput) -> None:
        m = delta.metrics or {}
        arrival, first, last = m.get("arrival_time"), m.get("first_token_time"), m.get("last_token_time")
        if last is not None and last != self.last_token_time:
            if self.last_token_time is None:
                if first is not None and arrival is not None:
                    self.metrics.ttft.observe(max(first - arrival, 0.0))
            else:
                self.metrics.itl.observe(max(last - self.last_token_time, 0.0))
            self.last_token_time = last
        if delta.finished and last is not None and arrival is not None:
            self.metrics.e2e.observe(max(last - arrival, 0.0))
