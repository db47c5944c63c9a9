"""Load time and single-forward latency of a model (default: SmolLM2-135M-Instruct).

    python -m pagedserve.bench.forward_timing [--model M] [--dtypes float32,bfloat16]
        [--decode-batches 1,16,64] [--context 256] [--prefill 512] [--threads N] [--repeat 10]

Decode rows: B sequences, each with `context` tokens already cached, one new token each.
Prefill row: one sequence of `prefill` new tokens. "forward" is the model's forward (all layers
and final norm); "+logits" adds compute_logits on the rows a runner samples (last token of each
sequence). GB/s counts the weight bytes one forward must read (the lm_head only in +logits).
Output: a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedserve.attention import AttentionMetadata


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


def _batch(cfg, dtype, num_seqs: int, context: int, new: int, block_size: int = 16):
    """Caches, metadata and inputs for num_seqs sequences of `context` tokens, `new` of them computed now."""
    per_seq = -(-context // block_size)
    shape = (num_seqs * per_seq, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]
    meta = AttentionMetadata.build(tables, [new] * num_seqs, [context] * num_seqs, block_size)
    ids = torch.randint(0, cfg.vocab_size, (num_seqs * new,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(context - new, context).repeat(num_seqs)
    last = torch.arange(new - 1, num_seqs * new, new)  # each sequence's last token
    return kv, meta, ids, positions, last


def run(model: str | None, dtypes: list[str], decode_batches: list[int], context: int, prefill: int,
        repeat: int) -> list[str]:
    from pagedserve.model import load_model
    import transformers  # noqa: F401  (imported up front, so load times exclude it)

    rows = ["| dtype | load (s) | batch | tokens | forward (ms) | +logits (ms) | tokens/s | weights GB/s |",
            "|---|---|---|---|---|---|---|---|"]
    for name in dtypes:
        t = time.perf_counter()
        lm = load_model(model, dtype=name)
        load_s = time.perf_counter() - t
        m, cfg = lm.model, lm.config
        body_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                         if not n.startswith(("embed_tokens", "lm_head")))
        cases = [(f"decode x{b}, ctx {context}", b, context, 1) for b in decode_batches]
        cases.append((f"prefill {prefill}", 1, prefill, prefill))
        for label, num_seqs, ctx, new in cases:
            kv, meta, ids, pos, last = _batch(cfg, lm.dtype, num_seqs, ctx, new)
            fwd = _time(lambda: m(ids, pos, kv, meta), repeat)
            full = _time(lambda: m.compute_logits(m(ids, pos, kv, meta)[last]), repeat)
            gbs = body_bytes / fwd / 1e9
            rows.append(f"| {name} | {load_s:.1f} | {label} | {len(ids)} | {fwd * 1e3:.1f} | {full * 1e3:.1f} | "
                        f"{len(ids) / full:,.0f} | {gbs:.1f} |")
        del lm, m
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
