"""The report's figures (matplotlib, Agg backend): one function per section, each writes one PNG."""
from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.report_claims import (
    PAPER_BEAM_SAVING,
    PAPER_SAMPLING_SAVING,
    PAPER_SLOT_SHARES,
    by_policy,
    sustainable_rates,
)

COLORS = {"none": "#1b9e77", "request": "#7570b3", "max_model_len": "#d95f02", "hf": "#666666"}
# Policies often coincide when the budget is generous: distinct markers and dashes keep each visible.
STYLES = {"none": {"marker": "o", "linestyle": "-", "linewidth": 2.5, "markersize": 7},
          "request": {"marker": "D", "linestyle": "--", "linewidth": 1.5, "markersize": 5},
          "max_model_len": {"marker": "^", "linestyle": "-", "linewidth": 1.5, "markersize": 7}}
LABELS = {"none": "paged (none)", "request": "reserve prompt+output (request)",
          "max_model_len": "reserve window (max_model_len)", "hf": "transformers static batch"}


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory(runs: list[dict], path: str) -> None:
    """Stacked bars: token states / reserved / fragmentation for each policy (paper Fig. 2)."""
    blocks = max(r["num_kv_blocks"] for r in runs)
    p = by_policy(runs, blocks)
    names = ["max_model_len", "request", "none"]
    parts = [("token_states", "token states", "#1b9e77"), ("reserved", "reserved for future tokens", "#e6ab02"),
             ("fragmentation", "internal fragmentation", "#d95f02")]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bottom = [0.0] * len(names)
    for key, label, color in parts:
        vals = [100 * p[n]["slot_shares"][key] for n in names]
        ax.bar([LABELS[n] for n in names], vals, bottom=bottom, color=color, label=label, width=0.6)
        for i, v in enumerate(vals):
            if v >= 4:
                ax.text(i, bottom[i] + v / 2, f"{v:.1f}%", ha="center", va="center", fontsize=9, color="white")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("share of allocated KV slots (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Where the KV memory goes (chat workload, {blocks} blocks;\n"
                 f"paper: token states {100 * PAPER_SLOT_SHARES['Orca (Max)']:.1f}% / "
                 f"{100 * PAPER_SLOT_SHARES['Orca (Oracle)']:.1f}% / {100 * PAPER_SLOT_SHARES['vLLM']:.1f}%)",
                 fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    ax.tick_params(axis="x", labelsize=8)
    _save(fig, path)


def budgets(runs: list[dict], hf: list[dict], path: str) -> None:
    """Two line plots against the KV budget: mean running requests, output tokens/s."""
    budget_list = sorted({r["num_kv_blocks"] for r in runs})
    block_size = runs[0]["block_size"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "mean_running_requests", "mean running requests per step"),
                            (axes[1], "output_tokens_per_s", "output tokens/s")):
        for policy in ("none", "request", "max_model_len"):
            pts = sorted((r["num_kv_blocks"], r[key]) for r in runs if r["kv_reservation"] == policy)
            if pts:
                ax.plot(*zip(*pts), color=COLORS[policy], label=LABELS[policy], **STYLES[policy])
        hf_key = "batch_size" if key == "mean_running_requests" else "output_tokens_per_s"
        hf_pts = [(h["num_kv_blocks"], h[hf_key]) for h in hf if h.get("output_tokens_per_s")]
        if hf_pts:
            ax.plot(*zip(*hf_pts), marker="s", linestyle="none", markersize=8, color=COLORS["hf"],
                    label=LABELS["hf"] + (" (batch size)" if key == "mean_running_requests" else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(budget_list)
        ax.set_xticklabels([f"{b}\n({b * block_size:,} tokens)" for b in budget_list], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel(f"KV budget (blocks of {block_size} tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title("Concurrency at a fixed KV budget", fontsize=10)
    axes[1].set_title("Throughput at a fixed KV budget", fontsize=10)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def prefix(section: dict, path: str) -> None:
    """Bars, prefix caching off vs on: peak KV blocks, prefill tokens computed, output tokens/s."""
    metrics = [("kv_blocks_peak", "peak KV blocks"), ("prefill_tokens_computed", "prefill tokens computed"),
               ("output_tokens_per_s", "output tokens/s")]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (key, title) in zip(axes, metrics):
        vals = [section["off"][key], section["on"][key]]
        bars = ax.bar(["caching off", "caching on"], vals, color=["#999999", "#1b9e77"], width=0.6)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,}" if isinstance(v, int) else f"{v:,.1f}",
                    ha="center", va="bottom", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(vals) * 1.15)
    fig.suptitle(f"Shared system prompt: prefix-cache hit rate {100 * section['on']['prefix_hit_rate']:.1f}%",
                 fontsize=10)
    _save(fig, path)


def _savings(ax, xs: list[int], rows: list[dict], paper: dict[str, tuple[float, float]], xlabel: str) -> None:
    """Saved % (rows' saving_mean and saving_peak) against xs, with the paper's ranges as bands."""
    for (name, (lo, hi)), color in zip(paper.items(), ("#fdd0a2", "#c6dbef")):
        ax.axhspan(100 * lo, 100 * hi, color=color, alpha=0.7, label=f"paper, {name}")
    ax.plot(xs, [100 * r["saving_mean"] for r in rows], marker="o", color="#1b9e77", label="measured (mean over steps)")
    ax.plot(xs, [100 * r["saving_peak"] for r in rows], marker="^", linestyle="--", color="#7570b3",
            label="measured (peak)")
    ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KV blocks saved by sharing (%)")
    top = max([hi for _, hi in paper.values()] + [r[k] for r in rows for k in ("saving_mean", "saving_peak")])
    ax.set_ylim(0, max(50, 115 * top))
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)


def sampling(rows: list[dict], path: str) -> None:
    """KV blocks saved by sharing against n, with the paper's ranges as bands."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _savings(ax, [r["n"] for r in rows], rows, PAPER_SAMPLING_SAVING, "parallel samples n")
    ax.set_title("Parallel sampling: memory saved by sharing the prompt", fontsize=10)
    _save(fig, path)


def latency(section: dict, path: str) -> None:
    """Normalized latency against request rate, one line per policy; the threshold and knees marked."""
    s = sustainable_rates(section)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for policy, pts in section["policies"].items():
        xy = [(p["request_rate"], p["mean_normalized_latency_s_per_token"]) for p in pts
              if p["mean_normalized_latency_s_per_token"] is not None]
        if xy:
            ax.plot(*zip(*xy), color=COLORS[policy], label=LABELS[policy], **STYLES[policy])
        rate, how = s[policy]
        if rate is not None and how == "crossed":
            ax.axvline(rate, color=COLORS[policy], linestyle=":", alpha=0.8)
    if s["threshold_s_per_token"] is not None:
        ax.axhline(s["threshold_s_per_token"], color="#444444", linestyle="--", linewidth=1,
                   label="2x the unloaded latency (sustainable limit)")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        lo, hi = ax.get_ylim()
        if hi / lo < 10:  # under a decade only minor ticks carry values; over it they would crowd
            ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("request rate (req/s, Poisson arrivals)")
    ax.set_ylabel("normalized latency (s/token, log)")
    ax.set_title(f"Latency under load (server, {section['num_kv_blocks']} KV blocks)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def recompute(rows: list[dict], path: str) -> None:
    """Time per generated token with the cache and recomputing the prefix, against context length."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [r["length"] for r in rows]
    ax.plot(x, [r["cached_ms"] for r in rows], marker="o", color="#1b9e77", label="with the KV cache (decode step)")
    ax.plot(x, [r["recompute_ms"] for r in rows], marker="s", color="#d95f02", label="recomputing the whole prefix")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per generated token (ms, log)")
    ax.set_title("Why a KV cache (one sequence)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def beam(section: dict, path: str) -> None:
    """Beam search: blocks held against the same beams unshared (mean and peak) per width; saved % per width."""
    runs = section["runs"]
    widths = [r["beam_width"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax, step = axes[0], 0.2
    bars = [("blocks_mean", "held, mean", "#1b9e77", None), ("unshared_blocks_mean", "unshared, mean", "#999999", None),
            ("blocks_peak", "held, peak", "#1b9e77", "//"), ("unshared_blocks_peak", "unshared, peak", "#999999", "//")]
    for i, (key, label, color, hatch) in enumerate(bars):
        xs = [j + (i - 1.5) * step for j in range(len(runs))]
        ax.bar(xs, [r[key] for r in runs], width=step, color=color, hatch=hatch, edgecolor="white", label=label)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([str(k) for k in widths])
    ax.set_xlabel("beam width")
    ax.set_ylabel(f"KV blocks ({section['block_size']} tokens each)")
    ax.set_title(f"Blocks held with and without sharing ({runs[0]['num_prompts']} searches at once)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _savings(axes[1], widths, runs, PAPER_BEAM_SAVING, "beam width")
    axes[1].set_title("Beam search: memory saved by sharing blocks", fontsize=10)
    _save(fig, path)


def tier(section: dict, path: str) -> None:
    """Section 8: prefill tokens computed and time to first token per mode."""
    runs = section["runs"]
    modes = [r["mode"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.bar(modes, [r["prefill_tokens_computed"] for r in runs], color="#1b9e77", label="computed")
    ax.axhline(runs[0]["prompt_tokens_submitted"], color="#999999", linestyle="--", label="prompt tokens sent")
    ax.set_ylabel("prefill tokens")
    ax.set_title(f"Prefill computed ({runs[0]['num_conversations']} conversations, pool "
                 f"{section['num_kv_blocks']} blocks)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], [r["ttft_mean_s"] for r in runs], width=0.4, color="#7570b3", label="mean")
    ax.bar([x + 0.2 for x in xs], [r["ttft_p90_s"] for r in runs], width=0.4, color="#d95f02", label="p90")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(modes)
    ax.set_ylabel("time to first token (s)")
    ax.set_title("Time to first token per turn", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def swap(section: dict, path: str) -> None:
    """Section 9: the mechanism's cost by block size, and end-to-end time by block size per mode."""
    mech, e2e = section["mechanism"], section["end_to_end"]
    sizes = [r["block_size"] for r in mech]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot(sizes, [1e3 * (r["swap_out_s"] + r["swap_in_s"]) for r in mech], marker="o", color="#1b9e77",
            label="swap: copies out and back")
    ax.plot(sizes, [1e3 * r["recompute_s"] for r in mech], marker="s", color="#d95f02", label="recompute: a forward")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("ms")
    ax.set_title(f"Restoring a {section['context_tokens']}-token context", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    for mode, color in (("recompute", "#d95f02"), ("swap", "#1b9e77")):
        rows = [r for r in e2e if r["mode"] == mode]
        ax.plot([r["block_size"] for r in rows], [r["elapsed_s"] for r in rows], marker="o", color=color, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("seconds for the workload")
    ax.set_title(f"End to end: {section['workload']['num_requests']} requests, pool of {section['pool_tokens']} tokens",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
