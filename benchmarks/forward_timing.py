"""Load time and single-forward latency of a model (default: SmolLM2-135M-Instruct).

    python -m benchmarks.forward_timing [--model M] [--dtypes float32,bfloat16]
        [--decode-batches 1,16,64] [--context 256] [--prefill 512] [--threads N] [--repeat 10]

Load: `load_model` timed in a fresh interpreter (after `import torch`), as a server start sees it.
Decode rows: B sequences, each with `context` tokens in the cache, one new token each. Prefill
row: one sequence of `prefill` new tokens. "forward" is the model's forward (all layers and the
final norm); "attention" is the part of it spent in the paged attention op (the forward again
with the op stubbed out, subtracted); "+logits" adds compute_logits on the rows a runner samples
(the last token of each sequence). GB/s: weight bytes a forward reads (the lm_head excluded) per
second; GFLOP/s: 2 x matmul weights x tokens per second. Output: a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch

from pagedserve.attention import AttentionMetadata, select_backend

_LOAD_SNIPPET = """
import time, torch
torch.set_num_threads({threads})
from pagedserve.model import load_model
t = time.perf_counter()
load_model({model!r}, dtype={dtype!r})
print(time.perf_counter() - t)
"""


def _time(fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load_seconds(model: str | None, dtype: str) -> float:
    """Seconds load_model takes in a fresh interpreter (imports of torch and pagedserve excluded)."""
    code = _LOAD_SNIPPET.format(threads=torch.get_num_threads(), model=model, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def _batch(cfg, dtype, num_seqs: int, context: int, new: int, block_size: int = 16):
    """Caches, metadata and inputs for num_seqs sequences of `context` tokens, `new` of them computed now."""
    per_seq = -(-context // block_size)
    shape = (num_seqs * per_seq, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]
    backend = select_backend("auto", "cpu", dtype, cfg.head_dim, block_size)  # as the engine picks it
    meta = AttentionMetadata.build(tables, [new] * num_seqs, [context] * num_seqs, block_size, backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (num_seqs * new,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(context - new, context).repeat(num_seqs)
    last = torch.arange(new - 1, num_seqs * new, new)  # each sequence's last token
    return kv, meta, ids, positions, last


def run(model: str | None, dtypes: list[str], decode_batches: list[int], context: int, prefill: int,
        repeat: int) -> list[str]:
    from pagedserve.model import load_model
    from pagedserve.model.packed_linear import pack_linears

    rows = ["| dtype | load (s) | batch | tokens | forward (ms) | attention (ms) | +logits (ms) | tokens/s "
            "| weights GB/s | GFLOP/s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in dtypes:
        load_s = load_seconds(model, name)
        lm = load_model(model, dtype=name)
        m, cfg = lm.model, lm.config
        body = [p for n, p in m.named_parameters() if n.startswith("layers.") and p.dim() == 2]
        body_bytes = sum(p.numel() * p.element_size() for p in body)
        body_params = sum(p.numel() for p in body)
        pack_linears(m, lm.dtype, lm.device)  # as the engine's runner does: the forward the engine runs
        cases = [(f"decode x{b}, ctx {context}", b, context, 1) for b in decode_batches]
        cases.append((f"prefill {prefill}", 1, prefill, prefill))
        for label, num_seqs, ctx, new in cases:
            kv, meta, ids, pos, last = _batch(cfg, lm.dtype, num_seqs, ctx, new)
            fwd = _time(lambda: m(ids, pos, kv, meta), repeat)
            with mock.patch("pagedserve.model.llama.paged_attention", lambda q, *a: q):
                no_attn = _time(lambda: m(ids, pos, kv, meta), repeat)
            full = _time(lambda: m.compute_logits(m(ids, pos, kv, meta)[last]), repeat)
            rows.append(f"| {name} | {load_s:.1f} | {label} | {len(ids)} | {fwd * 1e3:.1f} | "
                        f"{max(fwd - no_attn, 0) * 1e3:.1f} | {full * 1e3:.1f} | {len(ids) / full:,.0f} | "
                        f"{body_bytes / fwd / 1e9:.1f} | {2 * body_params * len(ids) / fwd / 1e9:.0f} |")
        del lm
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--decode-batches", default="1,16,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=10)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = run(a.model, a.dtypes.split(","), [int(b) for b in a.decode_batches.split(",")], a.context, a.prefill,
               a.repeat)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
