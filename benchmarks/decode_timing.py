"""Per-layer-call time of decode attention: the fused CPU kernel against the torch gather + SDPA path.

    python -m benchmarks.decode_timing [--batches 16,64,128] [--contexts 300,100-1000]
        [--threads 1,2] [--layers 30] [--repeat 20] [--dtype bfloat16]
    python -m benchmarks.decode_timing --forward --batches 64 --contexts 300 [--threads 1,2]

Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64, block size 16). A context "a-b"
draws each sequence's length uniformly from [a, b]; "n" draws from [0.9 n, 1.1 n]. Blocks are
shuffled over the pool, as after some serving. Each of `layers` layers has its own caches and the
calls cycle through them, so the K/V come from memory as in a forward, not from a warm cache.
Kernel and torch calls are interleaved; the table shows the minimum wall time per layer call over
the repeats (the machine may be shared) and the CPU time per call (the stable number with one thread).

--forward times the whole decode forward of the default model (SmolLM2-135M-Instruct, all layers,
bfloat16, uniform contexts as in benchmarks.forward_timing) with the kernel on and off
(the `cpu` and `torch` attention backends), interleaved, minimum over the repeats.
"""
from __future__ import annotations

import argparse
import time

import torch

from pagedserve.attention import cpu_kernel, select_backend
from pagedserve.attention.torch_backend import _decode_attention

HQ, HKV, D, BLOCK = 9, 3, 64, 16


def _lens(spec: str, n: int, g: torch.Generator) -> list[int]:
    lo, hi = (int(x) for x in spec.split("-")) if "-" in spec else (int(int(spec) * 0.9), int(int(spec) * 1.1))
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def make_case(n: int, spec: str, layers: int, dtype: torch.dtype, seed: int = 0):
    """Inputs of one decode batch: q [n, Hq, D], per-layer caches, block tables, lengths."""
    g = torch.Generator().manual_seed(seed)
    lens = _lens(spec, n, g)
    need = [-(-length // BLOCK) for length in lens]
    pool = torch.randperm(sum(need) + 8, generator=g)
    tables = torch.zeros(n, max(need), dtype=torch.int64)
    start = 0
    for i, k in enumerate(need):
        tables[i, :k] = pool[start:start + k]
        start += k
    shape = (len(pool), BLOCK, HKV, D)
    caches = [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
              for _ in range(layers)]
    q = torch.randn(n, HQ, D, generator=g).to(dtype)
    return q, caches, tables, torch.tensor(lens), lens


def time_case(q, caches, tables, seq_lens, lens, repeat: int) -> dict[str, float]:
    """Minimum wall and CPU seconds per layer call, kernel and torch, interleaved."""
    out = torch.empty_like(q)
    scale = D ** -0.5
    fns = {
        "kernel": lambda kc, vc: cpu_kernel.decode_attention(out, q, kc, vc, tables, seq_lens, scale),
        "torch": lambda kc, vc: _decode_attention(q, kc, vc, tables, seq_lens, lens, scale),
    }
    best = {name: float("inf") for name in fns}
    cpu = {name: float("inf") for name in fns}
    for r in range(repeat + 1):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            for kc, vc in caches:
                fn(kc, vc)
            w, c = time.perf_counter() - w, time.process_time() - c
            if r:  # the first round warms up
                best[name] = min(best[name], w / len(caches))
                cpu[name] = min(cpu[name], c / len(caches))
    return {**{f"{k}_wall": v for k, v in best.items()}, **{f"{k}_cpu": v for k, v in cpu.items()}}


def forward_ab(lm, batch: int, context: int, repeat: int) -> dict[str, float]:
    """Minimum wall and CPU seconds of a loaded model's decode forward, kernel on and off, interleaved."""
    from benchmarks.forward_timing import _batch

    m = lm.model
    kv, meta, ids, pos, _ = _batch(lm.config, lm.dtype, batch, context, 1)
    best = {f"{name}_{clock}": float("inf") for name in ("kernel", "torch") for clock in ("wall", "cpu")}
    backends = {"kernel": select_backend("cpu", "cpu", lm.dtype, lm.config.head_dim, meta.block_size),
                "torch": select_backend("torch", "cpu", lm.dtype, lm.config.head_dim, meta.block_size)}
    for r in range(repeat + 1):
        for name in ("kernel", "torch"):
            meta.backend = backends[name]
            w, c = time.perf_counter(), time.process_time()
            m(ids, pos, kv, meta)
            w, c = time.perf_counter() - w, time.process_time() - c
            if r:  # the first round warms up
                best[f"{name}_wall"] = min(best[f"{name}_wall"], w)
                best[f"{name}_cpu"] = min(best[f"{name}_cpu"], c)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="16,64,128")
    p.add_argument("--contexts", default="300,100-1000")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--forward", action="store_true", help="time the default model's whole decode forward")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    assert cpu_kernel.load_library() is not None, "the kernel did not build"
    if a.forward:
        from pagedserve.model import load_model

        lm = load_model(None, dtype="bfloat16")
        print(f"torch {torch.__version__}, SmolLM2-135M-Instruct bfloat16 decode forward, min of {a.repeat} "
              "interleaved repeats")
        print("| threads | batch | context | torch path (ms) | kernel (ms) | speed-up | torch CPU (ms) | kernel CPU (ms) |")
        print("|---|---|---|---|---|---|---|---|")
        for threads in (int(t) for t in a.threads.split(",")):
            torch.set_num_threads(threads)
            for n in (int(b) for b in a.batches.split(",")):
                for ctx in (int(c) for c in a.contexts.split(",")):
                    r = forward_ab(lm, n, ctx, a.repeat)
                    print(f"| {threads} | {n} | {ctx} | {r['torch_wall'] * 1e3:.1f} | {r['kernel_wall'] * 1e3:.1f} | "
                          f"{r['torch_wall'] / r['kernel_wall']:.2f}x | {r['torch_cpu'] * 1e3:.1f} | "
                          f"{r['kernel_cpu'] * 1e3:.1f} |", flush=True)
        return
    print(f"torch {torch.__version__}, {a.dtype}, Hq {HQ}, Hkv {HKV}, D {D}, block {BLOCK}, {a.layers} layers' "
          f"caches, min of {a.repeat} interleaved repeats")
    print("| threads | batch | context | torch (ms) | kernel (ms) | speed-up | torch CPU (ms) | kernel CPU (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in a.contexts.split(","):
        for n in (int(b) for b in a.batches.split(",")):
            case = make_case(n, spec, a.layers, dtype)
            for threads in (int(t) for t in a.threads.split(",")):
                torch.set_num_threads(threads)
                r = time_case(*case, a.repeat)
                print(f"| {threads} | {n} | {spec} | {r['torch_wall'] * 1e3:.3f} | {r['kernel_wall'] * 1e3:.3f} | "
                      f"{r['torch_wall'] / r['kernel_wall']:.2f}x | {r['torch_cpu'] * 1e3:.3f} | "
                      f"{r['kernel_cpu'] * 1e3:.3f} |", flush=True)


if __name__ == "__main__":
    main()
