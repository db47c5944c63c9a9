"""One prepared check of the CUDA path (issue 15), for a single `device` call of under 8 minutes on one H200.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out gpu_check.json       # on the GPU, from the repo root
    .venv/bin/python benchmarks/gpu_check.py --smoke                                # every section, tiny, on this CPU

Sections (`--sections`, comma-separated; default all), each printed with the ceiling it is measured against:

1. `parity`: the `triton` attention backend against the `torch` backend (the reference) in bfloat16 and
   float16: head_dim 128 and 64, GQA (32 query / 8 KV heads) and MHA, block sizes 16 and 32, ragged decode
   contexts up to a few thousand tokens, prefill chunks with and without cached context, and the
   flash-decoding split forced. Max abs / relative error against torch, and both against float32 torch.
2. `bandwidth`: decode attention at 64 x 2k and 16 x 8k context (32 q / 8 KV heads, head_dim 64 and 128):
   achieved GB/s of K/V read, against the device-to-device copy bandwidth measured here (goal: >= 70%).
3. `e2e_parity` and `throughput` (`e2e` = both) on a random-initialised ~1B LLaMA (Llama-3.2-1B's shape)
   built here, with an offline tokenizer whose vocabulary is the model's: greedy tokens against transformers
   in float32, then output tokens/s on pagedserve's chat workload, bf16, against transformers' static-batch
   `generate` and its continuous batching, pagedserve with CUDA graphs and with enforce_eager (goal: >= 3x).
   To fit the time, transformers' static `generate` runs only the first 256 of the 1,000 requests (batches of
   128); every run has a time budget past which it stops and its rate is taken over what it finished (marked
   partial). Rates are output tokens per second, so runs over different request counts still compare.

Everything that can fail is caught per section (and per engine), so one failure keeps the other numbers.
Each section has a time budget, and a watchdog prints the summary so far and exits before the device call's
limit. The last line of stdout is the JSON summary (also written to --out, after every section).

`--smoke` runs on the CPU at toy sizes, with Triton's interpreter: it checks this script's logic, and its
numbers mean nothing. This file needs only the standard library at import; pagedserve is found from the
repository root (the script inserts it into sys.path), not from an install.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("parity", "bandwidth", "e2e_parity", "throughput")
ENGINES = ("pagedserve_graphs", "hf_static", "hf_continuous", "pagedserve_eager")
BANDWIDTH_GOAL = 0.70
THROUGHPUT_GOAL = 3.0
# Relative error (max |triton - torch| / max |torch|) a half-precision case may show: a few units in the last
# place of the output's dtype (bf16 keeps 8 bits of mantissa, fp16 11).
PARITY_TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3}


# ---- the plan: every size and budget, for the GPU and for the smoke run ----------------------------------------
@dataclass(frozen=True)
class ParityCase:
    name: str
    dtype: str
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    block_size: int
    specs: tuple[tuple[int, int], ...]  # (cached_len, query_len) per sequence, decodes (query_len 1) first
    split: str  # the decode rows' flash-decoding split: "auto" (the backend's choice), "never" or "forced"


@dataclass(frozen=True)
class BandwidthCase:
    num_seqs: int
    context: int
    head_dim: int
    num_q_heads: int = 32
    num_kv_heads: int = 8
    block_size: int = 16


@dataclass(frozen=True)
class Plan:
    smoke: bool
    device: str
    total_budget_s: float  # the watchdog ends the run (summary printed) after this long
    section_budget_s: dict[str, float]
    parity_cases: tuple[ParityCase, ...]
    split_options: dict[str, int]  # TritonBackend(**split_options) forces the split in "forced" parity cases
    bandwidth_cases: tuple[BandwidthCase, ...]
    copy_bytes: int
    timing_warmup: int
    timing_iters: int
    model_shape: dict[str, Any]  # LlamaConfig keyword arguments
    parity_prompt_lens: tuple[int, ...]
    parity_new_tokens: int
    workload: dict[str, int]  # pagedserve.bench.workload.chat keyword arguments
    max_prompt_len: int | None  # the smoke run cuts the workload down; None keeps it as generated
    max_output_len: int | None
    static_requests: int  # transformers' static generate runs the first this many requests
    static_batch_size: int
    engine_budget_s: dict[str, float]  # timed part of each throughput run; past it the run stops, marked partial
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_memory_cpu: str


def _ragged(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _decodes(lens: list[int]) -> list[tuple[int, int]]:
    return [(n - 1, 1) for n in lens]


def parity_cases(head_dims: tuple[int, int], gqa: tuple[int, int], mha: tuple[int, int],
                 mixed: list[tuple[int, int]], split: list[tuple[int, int]], prefill: list[tuple[int, int]]
                 ) -> tuple[ParityCase, ...]:
    """The case matrix: both dtypes, both head dims, GQA and MHA, block sizes 16 and 32, mixed steps (decode rows
    through the varlen kernel, or split as the backend chooses), forced splits and prefill-only steps. Not the full
    cross product: each axis is covered, and the compile time stays low."""
    big, small = head_dims
    rows = [  # dtype, head_dim, heads, block_size, batch, split
        ("bfloat16", big, gqa, 16, "mixed", "auto"), ("bfloat16", big, gqa, 16, "long", "forced"),
        ("bfloat16", small, gqa, 32, "mixed", "never"), ("bfloat16", big, mha, 32, "mixed", "auto"),
        ("bfloat16", small, gqa, 16, "prefill", "auto"), ("float16", big, gqa, 32, "mixed", "never"),
        ("float16", small, gqa, 16, "long", "forced"), ("float16", small, mha, 16, "mixed", "auto"),
        ("float16", big, mha, 32, "long", "forced"),
    ]
    batches = {"mixed": mixed, "long": split, "prefill": prefill}
    short = {"bfloat16": "bf16", "float16": "fp16"}
    return tuple(ParityCase(f"{short[dt]} d{d} {h[0]}q/{h[1]}kv bs{bs} {kind} split:{sp}", dt, d, h[0], h[1], bs,
                            tuple(batches[kind]), sp) for dt, d, h, bs, kind, sp in rows)


def gpu_plan() -> Plan:
    rng = random.Random(15)
    mixed = _decodes(_ragged(24, 1, 3000, rng)) + [(0, 512), (1000, 256), (37, 64)]
    split = _decodes(_ragged(6, 1000, 4000, rng)) + [(500, 100)]
    return Plan(
        smoke=False, device="cuda", total_budget_s=455,
        section_budget_s={"parity": 80, "bandwidth": 50, "e2e_parity": 90, "throughput": 320},
        parity_cases=parity_cases((128, 64), (32, 8), (32, 32), mixed, split, [(0, 2048), (3000, 500), (16, 16)]),
        split_options=dict(target_programs=4096, split_tokens=256),
        bandwidth_cases=(BandwidthCase(64, 2048, 64), BandwidthCase(16, 8192, 64), BandwidthCase(64, 2048, 128),
                         BandwidthCase(16, 8192, 128)),
        copy_bytes=2 << 30, timing_warmup=5, timing_iters=30,
        model_shape=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         tie_word_embeddings=True, initializer_range=0.02),
        parity_prompt_lens=(12, 100, 700, 1500), parity_new_tokens=32,
        workload=dict(n=1000, seed=0), max_prompt_len=None, max_output_len=None,
        static_requests=256, static_batch_size=128,
        engine_budget_s={"pagedserve_graphs": 70, "hf_static": 60, "hf_continuous": 90, "pagedserve_eager": 60},
        max_num_seqs=256, max_num_batched_tokens=8192, kv_cache_memory_cpu="1GiB")


def smoke_plan() -> Plan:
    rng = random.Random(15)
    mixed = _decodes(_ragged(4, 1, 90, rng)) + [(0, 20), (33, 9)]
    split = _decodes(_ragged(3, 40, 150, rng)) + [(20, 5)]
    return Plan(
        smoke=True, device="cpu", total_budget_s=300,
        section_budget_s={"parity": 60, "bandwidth": 30, "e2e_parity": 60, "throughput": 120},
        parity_cases=parity_cases((32, 16), (8, 2), (4, 4), mixed, split, [(0, 40), (50, 12)]),
        split_options=dict(target_programs=1024, split_tokens=32),
        bandwidth_cases=(BandwidthCase(4, 64, 16, 4, 2), BandwidthCase(2, 160, 32, 4, 2)),
        copy_bytes=8 << 20, timing_warmup=1, timing_iters=2,
        model_shape=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=True, initializer_range=0.1),
        parity_prompt_lens=(5, 17, 40), parity_new_tokens=8,
        workload=dict(n=5, seed=0, prompt_median=16, output_median=8), max_prompt_len=40, max_output_len=8,
        static_requests=4, static_batch_size=2,
        engine_budget_s={"pagedserve_graphs": 60, "hf_static": 30, "hf_continuous": 30, "pagedserve_eager": 60},
        max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_cpu="64MiB")


# ---- run bookkeeping: the summary, deadlines, the watchdog ------------------------------------------------------
@dataclass
class Report:
    """What the run found so far; printed as JSON at the end (or by the watchdog) and written to `out`."""
    out: str | None
    data: dict[str, Any] = field(default_factory=lambda: {"header": {}, "sections": {}})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_section(self, name: str, result: dict) -> None:
        with self.lock:
            self.data["sections"][name] = result
        self.save()

    def save(self) -> None:
        if self.out:
            with self.lock:
                text = json.dumps(self.data, default=str)
            with open(self.out, "w") as f:
                f.write(text + "\n")

    def final_line(self) -> str:
        with self.lock:
            return json.dumps(self.data, default=str)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def start_watchdog(report: Report, seconds: float) -> None:
    """After `seconds`, print the summary so far and end the process, so a run that overstays its budget
    still leaves its numbers before the device call's own limit kills it."""
    def fire() -> None:
        with report.lock:
            report.data["watchdog"] = f"the run passed its {seconds:.0f} s budget; sections still running were cut"
        report.save()
        print(f"\nWATCHDOG: {seconds:.0f} s passed, the summary so far:", flush=True)
        print(report.final_line(), flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


Progress = Callable[[dict], None]


def run_section(name: str, fn: Callable[[Progress], dict], report: Report) -> None:
    """Run one section; an exception is recorded as its result and the run goes on. fn gets a `progress`
    callback to record what it has so far (status "running"), which is what the watchdog shows if it fires
    in the middle; an exception keeps that too."""
    print(f"\n==== {name} ====", flush=True)
    t0 = time.perf_counter()
    so_far: dict = {}

    def progress(partial: dict) -> None:
        so_far.update(partial)
        report.set_section(name, {**partial, "status": "running"})

    try:
        result = fn(progress)
        result.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
        traceback.print_exc()
        result = {**so_far, "status": "error", "error": f"{type(e).__name__}: {e}"}
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    print(f"---- {name}: {result['status']} in {result['elapsed_s']} s", flush=True)
    report.set_section(name, result)


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def call_supported(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) without the keyword arguments fn does not take (APIs that differ across
    transformers versions); returns (result, names dropped)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs), []
    dropped = [k for k in kwargs if k not in params]
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params}), dropped


# ---- the environment and the header ------------------------------------------------------------------------------
def configure_environment(smoke: bool) -> None:
    """Before torch, triton or pagedserve are imported: the repository on sys.path, no hub access, and (smoke
    only) Triton's interpreter, which is read when the kernels are defined."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; fail fast instead of waiting on a network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def header(plan: Plan) -> dict:
    import torch
    import transformers
    import triton
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "smoke (CPU, Triton interpreter; numbers mean nothing)" if plan.smoke else "gpu",
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton.__version__, "transformers": transformers.__version__,
        "pagedserve_commit": _git_commit(), "device": plan.device,
    }
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, device_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device_name=platform.processor() or "cpu", cpu_count=os.cpu_count())
    for k, v in info.items():
        print(f"{k:>20}: {v}")
    return info


# ---- timing ------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median seconds of one fn() call: CUDA events around each call on the GPU, the wall clock elsewhere."""
    import torch
    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_graph_replays(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """fn captured once as a CUDA graph; median seconds of one replay. Replays cost no Python launch overhead,
    so a kernel shorter than its launches is timed as the GPU runs it (and as the engine's decode graphs do)."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_calls(graph.replay, "cuda", warmup, iters)


def free_device_memory(device: str) -> None:
    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- 1. kernel parity ----------------------------------------------------------------------------------------------
@dataclass
class PagedBatch:
    q: Any
    k: Any
    v: Any
    k_cache: Any
    v_cache: Any
    tables: list[list[int]]
    query_lens: list[int]
    seq_lens: list[int]
    null_block: int


def make_paged_batch(num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                     specs: tuple[tuple[int, int], ...] | list[tuple[int, int]], dtype, device: str,
                     seed: int, spare_blocks: float = 0.25) -> PagedBatch:
    """Sequences given as (cached_len, query_len), decodes first, on shuffled blocks of a pool with spares (so
    tables are scattered, as after some serving), plus a zero null block at the end that pads tables. The
    caches start as random garbage (unmasked padding would show), the cached context is written straight into
    its blocks, not through the op under test."""
    import torch
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    need = [math.ceil((c + n) / block_size) for c, n in specs]
    num_blocks = sum(need) + int(spare_blocks * sum(need)) + 1
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, start = [], 0
    for n in need:
        tables.append(pool[start:start + n])
        start += n

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    k_cache = randn(num_blocks + 1, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks + 1, block_size, num_kv_heads, head_dim)
    k_cache[num_blocks] = 0
    v_cache[num_blocks] = 0
    new_k, new_v = [], []
    for (cached, qlen), table in zip(specs, tables):
        full_k, full_v = randn(cached + qlen, num_kv_heads, head_dim), randn(cached + qlen, num_kv_heads, head_dim)
        if cached:
            pos = torch.arange(cached, device=device)
            blocks = torch.tensor(table, device=device)[pos // block_size]
            k_cache[blocks, pos % block_size] = full_k[:cached]
            v_cache[blocks, pos % block_size] = full_v[:cached]
        new_k.append(full_k[cached:])
        new_v.append(full_v[cached:])
    k, v = torch.cat(new_k), torch.cat(new_v)
    q = randn(k.shape[0], num_q_heads, head_dim)
    return PagedBatch(q, k, v, k_cache, v_cache, tables, [n for _, n in specs], [c + n for c, n in specs],
                      num_blocks)


def attend(batch: PagedBatch, backend, device: str, scale: float, upcast: bool = False):
    """backend.forward on fresh copies of the caches: (output, k_cache, v_cache after the call, metadata)."""
    import torch
    from pagedserve.attention import AttentionMetadata
    meta = AttentionMetadata.build(batch.tables, batch.query_lens, batch.seq_lens, batch.k_cache.shape[1],
                                   device=device, backend=backend, null_block=batch.null_block)
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    k_cache, v_cache = cast(batch.k_cache).clone(), cast(batch.v_cache).clone()
    out = backend.forward(cast(batch.q), cast(batch.k), cast(batch.v), k_cache, v_cache, meta, scale)
    sync(device)
    return out, k_cache, v_cache, meta


def errors(out, ref) -> dict[str, float]:
    diff = (out.double() - ref.double()).abs().max().item()
    return {"max_abs": diff, "rel": diff / max(ref.double().abs().max().item(), 1e-30)}


def run_parity_case(case: ParityCase, plan: Plan, seed: int) -> dict:
    import torch
    from pagedserve.attention import TorchBackend
    from pagedserve.attention.triton_backend import TritonBackend
    dtype = getattr(torch, case.dtype)
    batch = make_paged_batch(case.num_q_heads, case.num_kv_heads, case.head_dim, case.block_size, case.specs,
                             dtype, plan.device, seed)
    scale = case.head_dim ** -0.5
    triton_backend = {"auto": TritonBackend, "never": lambda: TritonBackend(target_programs=1),
                      "forced": lambda: TritonBackend(**plan.split_options)}[case.split]()
    out, kc, vc, meta = attend(batch, triton_backend, plan.device, scale)
    splits = triton_backend.num_splits(meta.num_decodes, case.num_kv_heads,
                                       max(meta.seq_lens_list[:meta.num_decodes], default=0), batch.q.device)
    ref, kc_ref, vc_ref, _ = attend(batch, TorchBackend(), plan.device, scale)
    truth = attend(batch, TorchBackend(), plan.device, scale, upcast=True)[0]
    vs_torch, triton_vs_f32, torch_vs_f32 = errors(out, ref), errors(out, truth), errors(ref, truth)
    caches_equal = bool(torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref))
    finite = bool(torch.isfinite(out).all())
    tol = PARITY_TOLERANCE[case.dtype]
    ok = finite and caches_equal and vs_torch["rel"] <= tol
    decodes = [s for s, q in zip(batch.seq_lens, batch.query_lens) if q == 1]
    chunks = [(s - q, q) for s, q in zip(batch.seq_lens, batch.query_lens) if q > 1]
    return {"case": case.name, "dtype": case.dtype, "head_dim": case.head_dim, "heads": [case.num_q_heads,
            case.num_kv_heads], "block_size": case.block_size, "num_decodes": len(decodes),
            "max_decode_context": max(decodes, default=0), "prefill_chunks": chunks, "splits": splits,
            "tokens": int(batch.q.shape[0]), "vs_torch": vs_torch, "triton_vs_fp32": triton_vs_f32,
            "torch_vs_fp32": torch_vs_f32, "caches_equal": caches_equal, "finite": finite, "tolerance": tol,
            "pass": ok}


def section_parity(plan: Plan, progress: Progress) -> dict:
    deadline = Deadline(plan.section_budget_s["parity"])
    print("triton vs torch backend (the reference); rel = max|diff| / max|reference|; ceiling: the torch backend's\n"
          "own error against float32 (torch_vs_fp32) and a tolerance of a few output ulps (bf16 2e-2, fp16 5e-3)")
    print(f"{'case':<46} {'splits':>6} {'tokens':>6} {'abs vs torch':>12} {'rel vs torch':>12} "
          f"{'triton/f32':>10} {'torch/f32':>10} {'kv equal':>8}")
    cases, skipped = [], []
    for i, case in enumerate(plan.parity_cases):
        if deadline.passed():
            skipped.append(case.name)
            continue
        try:
            r = run_parity_case(case, plan, seed=1000 + i)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = {"case": case.name, "pass": False, "error": f"{type(e).__name__}: {e}"}
            print(f"{case.name:<46} ERROR {r['error']}")
        else:
            print(f"{case.name:<46} {r['splits']:>6} {r['tokens']:>6} {r['vs_torch']['max_abs']:>12.3e} "
                  f"{r['vs_torch']['rel']:>12.3e} {r['triton_vs_fp32']['rel']:>10.2e} {r['torch_vs_fp32']['rel']:>10.2e} "
                  f"{str(r['caches_equal']):>8}  {pass_fail(r['pass'])}")
        cases.append(r)
        progress({"cases": cases})
    all_pass = bool(cases) and all(c["pass"] for c in cases) and not skipped
    if skipped:
        print(f"skipped (out of the section's time): {skipped}")
    print(f"parity: {sum(c['pass'] for c in cases)}/{len(plan.parity_cases)} cases pass -> {pass_fail(all_pass)}")
    return {"cases": cases, "skipped": skipped, "all_pass": all_pass}


# ---- 2. decode attention bandwidth --------------------------------------------------------------------------------
def copy_bandwidth(plan: Plan) -> dict:
    """Device-to-device copy of copy_bytes: GB/s counting the read and the write (2 x bytes / time)."""
    import torch
    src = torch.empty(plan.copy_bytes, dtype=torch.uint8, device=plan.device).fill_(7)
    dst = torch.empty_like(src)
    seconds = time_calls(lambda: dst.copy_(src), plan.device, plan.timing_warmup, plan.timing_iters)
    del src, dst
    free_device_memory(plan.device)
    return {"bytes": plan.copy_bytes, "seconds": seconds, "gb_per_s": 2 * plan.copy_bytes / seconds / 1e9}


def run_bandwidth_case(case: BandwidthCase, plan: Plan, copy_gbps: float, seed: int) -> dict:
    import torch
    from pagedserve.attention import AttentionMetadata, TorchBackend
    from pagedserve.attention.triton_backend import TritonBackend
    dtype = torch.bfloat16
    specs = [(case.context - 1, 1)] * case.num_seqs
    batch = make_paged_batch(case.num_q_heads, case.num_kv_heads, case.head_dim, case.block_size, specs, dtype,
                             plan.device, seed, spare_blocks=0.0)
    scale = case.head_dim ** -0.5
    kv_bytes = 2 * sum(batch.seq_lens) * case.num_kv_heads * case.head_dim * batch.k_cache.element_size()
    result: dict[str, Any] = {"num_seqs": case.num_seqs, "context": case.context, "head_dim": case.head_dim,
                              "heads": [case.num_q_heads, case.num_kv_heads], "block_size": case.block_size,
                              "dtype": "bfloat16", "kv_bytes": kv_bytes}
    for name, backend in (("triton", TritonBackend()), ("torch", TorchBackend())):
        meta = AttentionMetadata.build(batch.tables, batch.query_lens, batch.seq_lens, case.block_size,
                                       device=plan.device, backend=backend, null_block=batch.null_block)
        if name == "triton":
            result["splits"] = backend.num_splits(meta.num_decodes, case.num_kv_heads, case.context, batch.q.device)

        def call(backend=backend, meta=meta):
            return backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, scale)

        iters = plan.timing_iters if name == "triton" else max(2, plan.timing_iters // 3)
        seconds = time_calls(call, plan.device, plan.timing_warmup, iters)
        result[f"{name}_eager_s"] = seconds
        result[f"{name}_eager_gb_per_s"] = kv_bytes / seconds / 1e9
        if name == "triton" and plan.device == "cuda":
            try:
                graph_s = time_graph_replays(call, plan.timing_warmup, plan.timing_iters)
                result["triton_graph_s"] = graph_s
                result["triton_graph_gb_per_s"] = kv_bytes / graph_s / 1e9
            except Exception as e:  # noqa: BLE001 - the eager number still stands
                result["triton_graph_error"] = f"{type(e).__name__}: {e}"
    best = result.get("triton_graph_gb_per_s", result["triton_eager_gb_per_s"])
    result["timed_as"] = "cuda graph replay" if "triton_graph_gb_per_s" in result else "eager launches"
    result["fraction_of_copy"] = best / copy_gbps
    result["pass"] = result["fraction_of_copy"] >= BANDWIDTH_GOAL
    del batch
    free_device_memory(plan.device)
    return result


def section_bandwidth(plan: Plan, progress: Progress) -> dict:
    deadline = Deadline(plan.section_budget_s["bandwidth"])
    copy = copy_bandwidth(plan)
    progress({"copy": copy})
    print(f"ceiling: device-to-device copy of {copy['bytes'] / 2**30:.2f} GiB: {copy['gb_per_s']:.0f} GB/s "
          f"(read + write)")
    print("decode attention, bf16, K/V bytes read = 2 x sum(context) x Hkv x D x 2; 'graph' = CUDA graph replay")
    print(f"{'seqs x ctx':>11} {'D':>4} {'splits':>6} {'triton us':>10} {'GB/s':>7} {'graph us':>9} {'GB/s':>7} "
          f"{'torch us':>9} {'GB/s':>7} {'of copy':>8}")
    cases, skipped = [], []
    for i, case in enumerate(plan.bandwidth_cases):
        if deadline.passed():
            skipped.append(f"{case.num_seqs}x{case.context} d{case.head_dim}")
            continue
        try:
            r = run_bandwidth_case(case, plan, copy["gb_per_s"], seed=2000 + i)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = {"num_seqs": case.num_seqs, "context": case.context, "head_dim": case.head_dim, "pass": False,
                 "error": f"{type(e).__name__}: {e}"}
            print(f"{case.num_seqs:>4} x {case.context:<5} ERROR {r['error']}")
        else:
            graph = (f"{r['triton_graph_s'] * 1e6:>9.1f} {r['triton_graph_gb_per_s']:>7.0f}" if "triton_graph_s" in r
                     else f"{'-':>9} {'-':>7}")
            print(f"{case.num_seqs:>4} x {case.context:<5} {case.head_dim:>4} {r['splits']:>6} "
                  f"{r['triton_eager_s'] * 1e6:>10.1f} {r['triton_eager_gb_per_s']:>7.0f} {graph} "
                  f"{r['torch_eager_s'] * 1e6:>9.1f} {r['torch_eager_gb_per_s']:>7.0f} {r['fraction_of_copy']:>7.0%}  "
                  f"{pass_fail(r['pass'])} (goal >= {BANDWIDTH_GOAL:.0%} of copy)")
        cases.append(r)
        progress({"copy": copy, "cases": cases})
    all_pass = bool(cases) and all(c["pass"] for c in cases) and not skipped
    print(f"bandwidth: {sum(c['pass'] for c in cases)}/{len(plan.bandwidth_cases)} cases reach "
          f"{BANDWIDTH_GOAL:.0%} of the copy bandwidth -> {pass_fail(all_pass)}")
    return {"copy": copy, "cases": cases, "skipped": skipped, "goal": BANDWIDTH_GOAL, "all_pass": all_pass}


# ---- 3. end to end: the model, the tokenizer, the workload -------------------------------------------------------
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad 0, bos 1, eos 2


def _letters(i: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa', ...: distinct ASCII words for the synthetic tokens."""
    word = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        word = chr(97 + r) + word
    return word


def build_tokenizer(folder: str, vocab_size: int):
    """An offline byte-level BPE tokenizer with exactly vocab_size entries: the three specials, the 256 byte
    symbols, then synthetic words (" a", " b", ..., " aa", ...), so every id the model can produce decodes to
    plain ASCII text (as cheap to detokenize as real text) and no id is outside the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *alphabet])}
    space = "\u0120"  # the byte-level symbol of " "
    i = 0
    while len(vocab) < vocab_size:
        vocab[space + _letters(i)] = len(vocab)
        i += 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIAL_TOKENS[1], eos_token=SPECIAL_TOKENS[2],
                                  pad_token=SPECIAL_TOKENS[0])
    if len(tok) != vocab_size:
        raise RuntimeError(f"the synthetic tokenizer has {len(tok)} entries, not {vocab_size}")
    tok.save_pretrained(folder)
    return tok


def build_model_folder(folder: str, plan: Plan) -> dict:
    """A random-initialised LlamaForCausalLM of plan.model_shape, initialised on the device (a 1B model's init
    on the CPU alone would take a minute), saved in bfloat16 as safetensors with the tokenizer. bfloat16 on
    disk is exact in float32 too, so both engines load the very same weights in either dtype."""
    import torch
    import transformers
    t0 = time.perf_counter()
    cfg = transformers.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **plan.model_shape)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = transformers.LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(folder)  # saved from host memory, the GPU freed
    del model
    free_device_memory(plan.device)
    build_tokenizer(folder, cfg.vocab_size)
    info = {"folder": folder, "parameters": params, "shape": plan.model_shape, "saved_dtype": "bfloat16",
            "build_s": round(time.perf_counter() - t0, 1)}
    print(f"model: {params / 1e6:.1f} M parameters ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}), built and saved in "
          f"{info['build_s']} s")
    return info


def fit_to_vocab(ids: list[int], vocab_size: int) -> list[int]:
    """The workload's ids (ordinary tokens of a 49k vocabulary, [1000, 40000)) folded into the synthetic words of
    a smaller vocabulary; unchanged when the vocabulary holds them."""
    first = len(SPECIAL_TOKENS) + 256
    if vocab_size >= 40000:
        return ids
    return [first + t % (vocab_size - first) for t in ids]


def chat_workload(plan: Plan) -> list:
    """pagedserve's chat workload (bench/workload.py), fitted to the model's vocabulary; the smoke run cuts its
    prompts and outputs short."""
    from pagedserve.bench.workload import WorkloadItem, chat
    vocab = plan.model_shape["vocab_size"]
    items = []
    for d in chat(**plan.workload):
        ids = fit_to_vocab(d["prompt_token_ids"], vocab)[:plan.max_prompt_len]
        out = d["max_tokens"] if plan.max_output_len is None else min(d["max_tokens"], plan.max_output_len)
        items.append(WorkloadItem(d["id"], ids, out))
    return items


def describe_workload(items: list) -> dict:
    p, o = [len(it.prompt_token_ids) for it in items], [it.max_tokens for it in items]
    return {"requests": len(items), "prompt_tokens": sum(p), "output_tokens": sum(o), "mean_prompt": sum(p) / len(p),
            "mean_output": sum(o) / len(o), "max_prompt": max(p), "max_output": max(o)}


def random_prompts(lengths: tuple[int, ...] | list[int], vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [fit_to_vocab([rng.randrange(1000, 40000) for _ in range(n)], vocab_size) for n in lengths]


def parity_prompts(plan: Plan) -> list[list[int]]:
    return random_prompts(plan.parity_prompt_lens, plan.model_shape["vocab_size"], seed=7)


def warmup_prompts(plan: Plan) -> list[list[int]]:
    """Prompts for the engines' warm-up, none of them the workload's (a warm-up on the workload's own prompts
    would leave their blocks in pagedserve's prefix cache)."""
    return random_prompts((64, 40, 24, 8), plan.model_shape["vocab_size"], seed=99)


def pagedserve_memory_options(plan: Plan) -> dict:
    """How the KV pool is sized: on the GPU by gpu_memory_utilization (after a profiling step, as vLLM); on the
    CPU a small fixed budget."""
    if plan.device != "cuda":
        return {"kv_cache_memory": plan.kv_cache_memory_cpu}
    return {"gpu_memory_utilization": 0.9}


# ---- 3a. greedy parity with transformers in float32 ---------------------------------------------------------------
def hf_greedy(folder: str, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[list, list]:
    """transformers' greedy tokens, each step a full forward over the sequence so far (no cache: the plainest
    reference), and each step's logits (kept on the CPU, for the margins at a mismatch)."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).eval()
    tokens, logits = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            toks, steps = [], []
            for _ in range(new_tokens):
                row = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
                tok = int(row.argmax())
                toks.append(tok)
                steps.append(row.cpu())
                ids = torch.cat([ids, torch.tensor([[tok]], device=device)], dim=1)
            tokens.append(toks)
            logits.append(steps)
    del model
    free_device_memory(device)
    return tokens, logits


def pagedserve_greedy(folder: str, prompts: list[list[int]], new_tokens: int, plan: Plan) -> tuple[list, dict]:
    from pagedserve import LLM, SamplingParams
    memory = {"kv_cache_memory": "4GiB"} if plan.device == "cuda" else {"kv_cache_memory": plan.kv_cache_memory_cpu}
    llm = LLM(model=folder, device=plan.device, dtype="float32", attention_backend="triton",
              max_num_seqs=max(8, len(prompts)), max_num_batched_tokens=max(2048, max(map(len, prompts)) + 8), **memory)
    info = {"cuda_graphs": cuda_graphs_captured(llm)}
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
    del llm
    free_device_memory(plan.device)
    return [list(o.outputs[0].token_ids) for o in outs], info


def compare_greedy(hf_tokens: list[int], ours: list[int], hf_logits: list) -> dict:
    """Tokens equal up to where, and at the first mismatch how close transformers' own top two were."""
    match = next((i for i, (a, b) in enumerate(zip(hf_tokens, ours)) if a != b), min(len(hf_tokens), len(ours)))
    r: dict[str, Any] = {"tokens": len(hf_tokens), "matching_prefix": match,
                         "all_match": match == len(hf_tokens) == len(ours)}
    if match < min(len(hf_tokens), len(ours)):
        row = hf_logits[match]
        top2 = row.topk(2).values
        r.update(first_mismatch=match, hf_token=hf_tokens[match], pagedserve_token=ours[match],
                 hf_top2_margin=float(top2[0] - top2[1]),
                 hf_logit_gap_to_ours=float(row[hf_tokens[match]] - row[ours[match]]))
    return r


def section_e2e_parity(plan: Plan, folder: str) -> dict:
    prompts = parity_prompts(plan)
    print(f"greedy, float32, {len(prompts)} prompts of {[len(p) for p in prompts]} tokens, "
          f"{plan.parity_new_tokens} new tokens each; ceiling: transformers (sdpa, no KV cache) on the same weights")
    hf_tokens, hf_logits = hf_greedy(folder, prompts, plan.parity_new_tokens, plan.device)
    ours, info = pagedserve_greedy(folder, prompts, plan.parity_new_tokens, plan)
    rows = [compare_greedy(h, o, lg) for h, o, lg in zip(hf_tokens, ours, hf_logits)]
    for n, r in zip(plan.parity_prompt_lens, rows):
        line = f"prompt {n:>5} tokens: {r['matching_prefix']}/{r['tokens']} tokens match"
        if "first_mismatch" in r:
            line += (f"; first mismatch at {r['first_mismatch']}: transformers {r['hf_token']} vs ours "
                     f"{r['pagedserve_token']}, transformers' top-2 margin {r['hf_top2_margin']:.3e}, "
                     f"its logit gap to our token {r['hf_logit_gap_to_ours']:.3e}")
        print(line)
    all_match = all(r["all_match"] for r in rows)
    print(f"greedy parity (triton backend, cuda graphs: {info['cuda_graphs']}): {pass_fail(all_match)}")
    return {"prompts": rows, "all_match": all_match, **info}


# ---- 3b. throughput -------------------------------------------------------------------------------------------------
def cuda_graphs_captured(llm) -> bool | None:
    """Whether the engine's runner holds captured CUDA graphs (None: this engine version has no such attribute)."""
    runner = getattr(llm.llm_engine, "runner", None)
    if runner is None or not hasattr(runner, "cuda_graphs"):
        return None
    return runner.cuda_graphs is not None


def triton_compiled_variants() -> dict[str, int] | None:
    """How many specialisations of each attention kernel Triton has compiled in this process (a variant compiled
    during a timed run costs its compile time there). None where this Triton keeps them elsewhere."""
    try:
        from pagedserve.attention import triton_kernels as kern
        out = {}
        for name in ("write_kv", "varlen_attention", "decode_split", "merge_splits"):
            caches = getattr(kern, name).device_caches
            out[name] = sum(len(entry[0]) for entry in caches.values())
        return out
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def rate(output_tokens: int, seconds: float) -> float:
    return output_tokens / seconds if seconds > 0 else 0.0


def run_pagedserve(folder: str, items: list, plan: Plan, enforce_eager: bool, budget_s: float) -> dict:
    """All requests submitted at once, stepped to the end (or the budget); output tokens counted as they come."""
    from pagedserve import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=folder, device=plan.device, dtype="bfloat16", attention_backend="triton",
              enforce_eager=enforce_eager, max_num_seqs=plan.max_num_seqs,
              max_num_batched_tokens=plan.max_num_batched_tokens, **pagedserve_memory_options(plan))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in warmup_prompts(plan)],
                 SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    engine = llm.llm_engine
    variants_before = triton_compiled_variants()
    deadline = Deadline(budget_s)
    produced, done = 0, 0
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        engine.add_request(f"tp-{i}", {"prompt_token_ids": it.prompt_token_ids},
                           SamplingParams(max_tokens=it.max_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests() and not deadline.passed():
        for out in engine.step():
            produced += sum(len(c.token_ids) for c in out.outputs)
            done += out.finished
    sync(plan.device)
    elapsed = time.perf_counter() - t0
    partial = engine.has_unfinished_requests()
    stats = llm.stats()
    result = {"engine": "pagedserve", "enforce_eager": enforce_eager, "cuda_graphs": cuda_graphs_captured(llm),
              "requests": len(items), "finished_requests": done, "output_tokens": produced,
              "expected_output_tokens": sum(it.max_tokens for it in items), "elapsed_s": elapsed,
              "output_tokens_per_s": rate(produced, elapsed), "partial": partial, "load_s": load_s,
              "warmup_s": warmup_s, "num_kv_blocks": stats.get("num_kv_blocks"),
              "num_preemptions": stats.get("num_preemptions"), "num_steps": stats.get("num_steps"),
              "triton_variants_before": variants_before, "triton_variants_after": triton_compiled_variants()}
    if partial:
        engine.abort_request([f"tp-{i}" for i in range(len(items))])
    del engine, llm
    free_device_memory(plan.device)
    return result


def load_hf_model(folder: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.to(device).eval()


def left_pad(prompts: list[list[int]], pad_id: int, device: str):
    """The throughput benchmark's left padding (pagedserve/bench/hf_baseline.py), on the device."""
    from pagedserve.bench.hf_baseline import left_pad as left_pad_cpu
    ids, mask = left_pad_cpu(prompts, pad_id)
    return ids.to(device), mask.to(device)


def run_hf_static(model, items: list, plan: Plan, budget_s: float) -> dict:
    """transformers' generate over static, left-padded batches in workload order, each batch generating to its
    longest request (min_new_tokens holds EOS off): only each request's own max_tokens count as output."""
    import torch
    items = items[:plan.static_requests]
    bs = plan.static_batch_size
    with torch.inference_mode():
        ids, mask = left_pad(warmup_prompts(plan)[:2], 0, plan.device)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up
    deadline = Deadline(budget_s)
    useful = generated = done = 0
    t0 = time.perf_counter()
    for start in range(0, len(items), bs):
        if deadline.passed():
            break
        batch = items[start:start + bs]
        longest = max(it.max_tokens for it in batch)
        ids, mask = left_pad([it.prompt_token_ids for it in batch], 0, plan.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=False, pad_token_id=0)
        new = out.shape[1] - ids.shape[1]
        if new != longest:  # a shorter run would overstate its speed
            raise RuntimeError(f"transformers generated {new} tokens where {longest} were asked")
        useful += sum(it.max_tokens for it in batch)
        generated += new * len(batch)
        done += len(batch)
    sync(plan.device)
    elapsed = time.perf_counter() - t0
    return {"engine": "transformers generate (static batches)", "batch_size": bs, "requests": len(items),
            "finished_requests": done, "output_tokens": useful, "generated_incl_padding": generated,
            "elapsed_s": elapsed, "output_tokens_per_s": rate(useful, elapsed), "partial": done < len(items),
            "attn_implementation": model.config._attn_implementation}


def continuous_batching_config(plan: Plan):
    """transformers' own sizing on the GPU (from its free memory); on the CPU a small explicit pool (its
    auto-sizing there takes a long time)."""
    if plan.device == "cuda":
        return None
    from transformers import ContinuousBatchingConfig
    return call_supported(ContinuousBatchingConfig, num_blocks=64, max_batch_tokens=256)[0]


def workload_hints(items: list):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(max_prompt_length=max(len(it.prompt_token_ids) for it in items),
                         max_generated_length=max(it.max_tokens for it in items), num_requests=len(items))


def run_hf_continuous(model, items: list, plan: Plan, budget_s: float) -> dict:
    """transformers' continuous batching (the manager behind `generate_batch`: paged KV cache, its scheduler),
    each request with its own max_new_tokens and EOS off (-1), as ours ignore_eos. Its warm-up (CUDA graph
    capture) happens before the clock starts."""
    from transformers import GenerationConfig
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(it.max_tokens for it in items), pad_token_id=0,
                           eos_token_id=2)
    t0 = time.perf_counter()
    cm, dropped = call_supported(model.continuous_batching_context_manager, generation_config=gen, block=True,
                                 timeout=10, continuous_batching_config=continuous_batching_config(plan),
                                 workload_hints=workload_hints(items), warmup=True)
    results: dict[str, Any] = {}
    with cm as manager:
        warmup_s = time.perf_counter() - t0
        attn = model.config._attn_implementation  # the one it switched to for the run (restored at the end)
        deadline = Deadline(budget_s)
        t0 = time.perf_counter()
        for i, it in enumerate(items):
            manager.add_request(it.prompt_token_ids, request_id=f"cb-{i}", max_new_tokens=it.max_tokens,
                                eos_token_id=-1)
        while len(results) < len(items) and not deadline.passed():
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError(f"transformers' generation thread stopped after {len(results)} requests")
        elapsed = time.perf_counter() - t0
        if len(results) < len(items):  # past the budget: fail what is left, so the thread ends now
            call_supported(manager.stop, block=True, timeout=10, hard_stop=True)
    errors_ = [rid for rid, r in results.items() if r.error is not None]
    produced = sum(len(r.generated_tokens) for r in results.values() if r.error is None)
    short = [rid for rid, r in results.items() if r.error is None
             and len(r.generated_tokens) != items[int(rid.split("-")[1])].max_tokens]
    return {"engine": "transformers continuous batching", "requests": len(items), "finished_requests": len(results),
            "failed_requests": len(errors_), "requests_with_other_lengths": len(short), "output_tokens": produced,
            "expected_output_tokens": sum(it.max_tokens for it in items), "elapsed_s": elapsed,
            "output_tokens_per_s": rate(produced, elapsed), "partial": len(results) < len(items),
            "warmup_s": warmup_s, "attn_implementation": attn, "dropped_arguments": dropped}


def run_engine(name: str, fn: Callable[[], dict], device: str) -> dict:
    """One throughput run; its failure is recorded, the other engines still run (on memory it may have left:
    freed first)."""
    print(f"-- {name} ...", flush=True)
    free_device_memory(device)
    try:
        r = fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = {"error": f"{type(e).__name__}: {e}", "output_tokens_per_s": None}
    if r.get("error"):
        print(f"   {name}: ERROR {r['error']}")
    else:
        note = " (PARTIAL: stopped at its time budget, rate over what finished)" if r.get("partial") else ""
        print(f"   {name}: {r['output_tokens']} output tokens in {r['elapsed_s']:.1f} s = "
              f"{r['output_tokens_per_s']:.0f} tok/s over {r['finished_requests']}/{r['requests']} requests{note}")
    return r


def hf_runs(folder: str, items: list, plan: Plan, engines: tuple[str, ...], record: Callable[[str, dict], None]
            ) -> None:
    """Both transformers baselines on one loaded model (record(name, result) after each): static first, because
    continuous batching switches the model's attention implementation while it runs."""
    wanted = [e for e in ("hf_static", "hf_continuous") if e in engines]
    if not wanted:
        return
    try:
        model = load_hf_model(folder, plan.device)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        for name in wanted:
            record(name, {"error": f"loading the transformers model: {type(e).__name__}: {e}"})
        return
    if "hf_static" in wanted:
        record("hf_static", run_engine(
            f"transformers generate, static batches of {plan.static_batch_size}, the first "
            f"{min(plan.static_requests, len(items))} requests",
            lambda: run_hf_static(model, items, plan, plan.engine_budget_s["hf_static"]), plan.device))
    if "hf_continuous" in wanted:
        record("hf_continuous", run_engine(
            "transformers continuous batching",
            lambda: run_hf_continuous(model, items, plan, plan.engine_budget_s["hf_continuous"]), plan.device))
    del model
    free_device_memory(plan.device)


def throughput_verdict(runs: dict) -> dict:
    """pagedserve (CUDA graphs, and eager) against the better transformers run."""
    def tps(name):
        r = runs.get(name) or {}
        return r.get("output_tokens_per_s") if not r.get("error") else None

    best_hf = max((v for v in (tps("hf_static"), tps("hf_continuous")) if v), default=None)
    verdict: dict[str, Any] = {"best_transformers_tok_s": best_hf, "goal": THROUGHPUT_GOAL}
    for name in ("pagedserve_graphs", "pagedserve_eager"):
        ours = tps(name)
        verdict[f"{name}_over_best_transformers"] = ours / best_hf if ours and best_hf else None
    ratio = verdict["pagedserve_graphs_over_best_transformers"]
    verdict["pass"] = ratio is not None and ratio >= THROUGHPUT_GOAL
    return verdict


def section_throughput(plan: Plan, folder: str, engines: tuple[str, ...], num_requests: int | None,
                       progress: Progress) -> dict:
    items = chat_workload(plan)
    if num_requests is not None:
        items = items[:num_requests]
    work = describe_workload(items)
    print(f"workload: pagedserve's chat workload, {work['requests']} requests, prompts {work['mean_prompt']:.0f} "
          f"tokens on average (max {work['max_prompt']}), outputs {work['mean_output']:.0f} (max {work['max_output']}), "
          f"{work['output_tokens']} output tokens; bf16; every request generates exactly its max_tokens")
    print(f"pagedserve: triton backend, max_num_seqs {plan.max_num_seqs}, max_num_batched_tokens "
          f"{plan.max_num_batched_tokens}, {pagedserve_memory_options(plan)}")
    runs: dict[str, dict] = {}

    def record(name: str, result: dict) -> None:
        runs[name] = result
        progress({"workload": work, "runs": runs})

    if "pagedserve_graphs" in engines:
        record("pagedserve_graphs", run_engine("pagedserve, CUDA graphs", lambda: run_pagedserve(
            folder, items, plan, False, plan.engine_budget_s["pagedserve_graphs"]), plan.device))
    hf_runs(folder, items, plan, engines, record)
    if "pagedserve_eager" in engines:
        record("pagedserve_eager", run_engine("pagedserve, enforce_eager", lambda: run_pagedserve(
            folder, items, plan, True, plan.engine_budget_s["pagedserve_eager"]), plan.device))
    verdict = throughput_verdict(runs)
    print("output tokens/s: " + ", ".join(f"{k} {v['output_tokens_per_s']:.0f}" for k, v in runs.items()
                                          if v.get("output_tokens_per_s")))
    for name in ("pagedserve_graphs", "pagedserve_eager"):
        ratio = verdict[f"{name}_over_best_transformers"]
        if ratio is not None:
            print(f"{name} / best transformers = {ratio:.2f}x (goal >= {THROUGHPUT_GOAL:.0f}x)"
                  + (f" -> {pass_fail(ratio >= THROUGHPUT_GOAL)}" if name == "pagedserve_graphs" else ""))
    if verdict["pagedserve_graphs_over_best_transformers"] is None:
        print(f"throughput ratio: not measured -> {pass_fail(False)}")
    return {"workload": work, "runs": runs, "verdict": verdict}


# ---- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every section at toy sizes on the CPU (Triton interpreter)")
    p.add_argument("--sections", default="all",
                   help=f"comma-separated, of {', '.join(SECTIONS)}; 'e2e' = e2e_parity,throughput; 'all'")
    p.add_argument("--engines", default=",".join(ENGINES), help="throughput runs, comma-separated")
    p.add_argument("--requests", type=int, default=None, help="throughput: only the first N workload requests")
    p.add_argument("--budget-s", type=float, default=None, help="the watchdog's total (default: the plan's)")
    p.add_argument("--out", default=None, help="also write the JSON summary here (rewritten after every section)")
    return p.parse_args(argv)


def chosen(names: str, allowed: tuple[str, ...], aliases: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    picked: list[str] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        for n in aliases.get(name, (name,)):
            if n not in allowed:
                raise SystemExit(f"unknown name {n!r}; choose from {', '.join(allowed)}")
            if n not in picked:
                picked.append(n)
    return tuple(n for n in allowed if n in picked)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = chosen(args.sections, SECTIONS, {"all": SECTIONS, "e2e": ("e2e_parity", "throughput")})
    engines = chosen(args.engines, ENGINES, {})
    configure_environment(args.smoke)
    plan = smoke_plan() if args.smoke else gpu_plan()
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, total_budget_s=args.budget_s)
    report = Report(args.out)
    start_watchdog(report, plan.total_budget_s)

    import torch
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --smoke on a CPU", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    print(f"==== gpu_check: pagedserve's CUDA path (issue 15) ====  sections: {', '.join(sections)}")
    report.data["header"] = header(plan)
    report.data["header"]["sections"] = list(sections)
    report.save()

    if "parity" in sections:
        run_section("parity", lambda progress: section_parity(plan, progress), report)
    if "bandwidth" in sections:
        run_section("bandwidth", lambda progress: section_bandwidth(plan, progress), report)
    if "e2e_parity" in sections or "throughput" in sections:
        with tempfile.TemporaryDirectory(prefix="gpu_check_model_") as folder:
            run_section("model", lambda progress: build_model_folder(folder, plan), report)
            if report.data["sections"]["model"]["status"] == "ok":
                if "e2e_parity" in sections:
                    run_section("e2e_parity", lambda progress: section_e2e_parity(plan, folder), report)
                if "throughput" in sections:
                    run_section("throughput", lambda progress: section_throughput(
                        plan, folder, engines, args.requests, progress), report)
    report.data["goals"] = goals(report.data["sections"])
    if plan.smoke:
        report.data["goals"]["note"] = "smoke run on a CPU: these verdicts check the script, not the engine"
    report.save()
    print("\n==== goals ====")
    for k, v in report.data["goals"].items():
        print(f"{k:>22}: {v}")
    print("\n==== summary (JSON, one line) ====")
    print(report.final_line(), flush=True)
    return 0


def goals(sections: dict) -> dict:
    """The issue's three goals as PASS / FAIL / not run, from the sections' results."""
    def verdict(name: str, key: Callable[[dict], bool]) -> str:
        s = sections.get(name)
        if s is None:
            return "not run"
        if s.get("status") != "ok":
            return f"FAIL (section error: {s.get('error')})"
        return pass_fail(key(s))

    return {"kernel_parity": verdict("parity", lambda s: s["all_pass"]),
            "decode_bandwidth_70pct": verdict("bandwidth", lambda s: s["all_pass"]),
            "greedy_parity_fp32": verdict("e2e_parity", lambda s: s["all_match"]),
            "throughput_3x": verdict("throughput", lambda s: s["verdict"]["pass"])}


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a library thread left behind (transformers' generation loop after a failure) must not hold the
    # process open past the device call's limit.
    os._exit(code)
