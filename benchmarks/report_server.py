"""Section 5 of `bench report`: our server under Poisson arrivals, one server process per policy.

The server runs as `python -m pagedserve.cli serve` on a free 127.0.0.1 port with the report's
engine options; bench.serve.run_serve_benchmark drives it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from benchmarks.report_runs import Log
from pagedserve.bench.serve import run_serve_benchmark
from pagedserve.bench.workload import WorkloadItem
from pagedserve.config import EngineConfig

# The aggregate numbers kept per rate point (run_serve_benchmark's per-request lists are dropped).
_KEEP = ("request_rate", "num_requests", "completed", "failed", "duration_s", "request_throughput",
         "output_throughput", "mean_normalized_latency_s_per_token", "mean_ttft_ms", "median_ttft_ms",
         "mean_tpot_ms", "mean_e2el_ms", "p90_e2el_ms", "loadavg_1min_mean", "errors")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_flags(config: EngineConfig) -> list[str]:
    """EngineConfig -> the `pagedserve serve` flags that reproduce it (None fields left to the default)."""
    flags = []
    for f in dataclasses.fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


@contextlib.contextmanager
def running_server(config: EngineConfig, log_path: str, startup_timeout_s: float = 300.0):
    """Start `pagedserve serve` for config on a free port; yields its base URL; stops it on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagedserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--max-waiting", "0", *engine_flags(config)]
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, base_url, startup_timeout_s, log_path)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready; see {log_path}")
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s; see {log_path}")


def rates_from_capacity(requests_per_s: float, multipliers: list[float]) -> list[float]:
    """Request rates as multiples of an offline capacity, rounded to two significant digits."""
    out = []
    for m in multipliers:
        r = requests_per_s * m
        digits = 1 - math.floor(math.log10(r))
        out.append(round(r, digits))
    return sorted(set(out))


def latency_sweep(base: EngineConfig, items: list[WorkloadItem], rates: list[float], policies: list[str],
                  log: Log, seed: int = 0) -> dict:
    """Normalized latency at each request rate, for each reservation policy (a fresh server per policy).

    Prefix caching is off: every rate point sends the same prompts, and a later point must not
    find an earlier point's blocks in the cache. Server logs go to a temporary folder.
    """
    log_dir = tempfile.mkdtemp(prefix="pagedserve-report-")
    log(f"server logs in {log_dir}")
    out = {}
    for policy in policies:
        config = base.replace(kv_reservation=policy, enable_prefix_caching=False)
        log_path = os.path.join(log_dir, f"server-{policy}.log")
        points = []
        with running_server(config, log_path) as url:
            run_serve_benchmark(url, items[:1])  # warm-up: the first forward allocates and picks kernels
            for rate in rates:
                r = run_serve_benchmark(url, items, request_rate=rate, seed=seed)
                point = {k: r.get(k) for k in _KEEP}
                point["request_rate"] = rate
                points.append(point)
                log(f"kv_reservation={policy} at {rate:g} req/s: normalized latency "
                    f"{_fmt(point['mean_normalized_latency_s_per_token'])} s/token, "
                    f"{r['completed']}/{len(items)} completed in {r['duration_s']:.0f} s")
        out[policy] = points
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def sustainable_rate(rates: list[float], latencies: list[float | None], threshold: float) -> tuple[float | None, str]:
    """The request rate where normalized latency crosses threshold (linear interpolation between points).

    Returns (rate, how): how is 'crossed', 'above' (never crossed: at least the highest rate) or
    'below' (already over the threshold at the lowest rate: rate is None).
    """
    pts = [(r, lat) for r, lat in sorted(zip(rates, latencies)) if lat is not None]
    if not pts:
        return None, "below"
    if pts[0][1] > threshold:
        return None, "below"
    for (r0, l0), (r1, l1) in itertools.pairwise(pts):
        if l1 > threshold:
            return r0 + (r1 - r0) * (threshold - l0) / (l1 - l0), "crossed"
    return pts[-1][0], "above"
