"""`pagedserve bench report`: measure the PagedAttention paper's claims on this machine, write plots and a README.

Every section runs our engine (and its baselines) on the workloads of
pagedserve.bench.workload; the numbers go to results.json (saved after each section), the
plots to PNG files and the summary to README.md in the output folder. `--render-only`
redraws the plots and README from an existing results.json.

This lives in the source checkout, not in the installed package: run it from a clone as
`pagedserve bench report ...` (the CLI finds benchmarks/ beside its package) or, the same,
`python -m benchmarks.report ...` in the repository root.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from pagedserve.bench.results import machine_info, result_header, save_result
from pagedserve.bench.workload import workload_summary

POLICIES = ["none", "request", "max_model_len"]
LATENCY_POLICIES = ["none", "max_model_len"]
REPORT_MAX_MODEL_LEN = 2048  # OPT's window, as in the paper; the reservation baseline reserves this much
DEFAULT_TIER = "2GiB"  # the second KV tier of sections 8-9 unless --kv-offload-memory says otherwise


@dataclass
class ReportPlan:
    """How much of each measurement to run (request counts, budgets, rates); quick and full presets below."""
    chat_requests: int
    budgets: list[int]            # KV budgets of sections 1-2, in blocks
    hf_budgets: list[int]         # the budgets where transformers' static batching also runs
    shared_requests: int
    sampling_prompts: int
    sampling_ns: list[int]
    serve_requests: int
    rate_multipliers: list[float]  # request rates as multiples of the offline capacity of section 2
    recompute_lengths: list[int]
    beam_prompts: int
    beam_widths: list[int]
    tier_conversations: int          # section 8: multiturn conversations, this many at once, in this pool
    tier_concurrency: int
    tier_pool_blocks: int
    swap_block_sizes: list[int]      # section 9: block sizes; chat requests in a pool of this many tokens
    swap_requests: int
    swap_pool_tokens: int
    swap_context_tokens: int         # section 9: the context restored by the mechanism alone
    serve_budget: int | None = None   # KV blocks of the server (default: the smallest budget)
    rates: list[float] | None = None  # explicit request rates (override the multipliers)
    workload_scale: float = 1.0
    seed: int = 0
    sections: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8, 9])


# Sized for two shared CPU cores at 100-400 output tokens/s: full about 20 minutes, quick about 5.
# The server's budget is the tightest, where memory limits the batch (at generous budgets the
# policies converge, as section 2 shows).
FULL = ReportPlan(chat_requests=24, budgets=[256, 512, 1024], hf_budgets=[1024], shared_requests=24,
                  sampling_prompts=4, sampling_ns=[2, 4, 6], serve_requests=20, rate_multipliers=[0.5, 1.0, 2.0],
                  recompute_lengths=[64, 128, 256, 512, 1024, 2000], beam_prompts=8, beam_widths=[2, 4, 6],
                  tier_conversations=16, tier_concurrency=16, tier_pool_blocks=128, swap_block_sizes=[8, 16, 32, 64],
                  swap_requests=16, swap_pool_tokens=2048, swap_context_tokens=1024, serve_budget=256)
QUICK = ReportPlan(chat_requests=8, budgets=[256, 1024], hf_budgets=[1024], shared_requests=8,
                   sampling_prompts=2, sampling_ns=[2, 6], serve_requests=8, rate_multipliers=[0.5, 2.0],
                   recompute_lengths=[64, 256, 1024], beam_prompts=2, beam_widths=[2, 4], tier_conversations=6,
                   tier_concurrency=6, tier_pool_blocks=128, swap_block_sizes=[8, 32], swap_requests=6,
                   swap_pool_tokens=2048, swap_context_tokens=512, serve_budget=256)


# ---- command line -----------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


_PLAN_FLAGS = {  # flag -> (type, help); each overrides the preset's field of the same name
    "chat_requests": (int, "chat requests of sections 1-2 (and the server's pool of prompts)"),
    "budgets": (_ints, "KV budgets of sections 1-2 in blocks, comma-separated, tight to generous"),
    "hf_budgets": (_ints, "budgets (of --budgets) where transformers' static batching runs too"),
    "shared_requests": (int, "requests of the shared-prefix workload (section 3)"),
    "sampling_prompts": (int, "chat prompts of section 4"),
    "sampling_ns": (_ints, "parallel sample counts n of section 4"),
    "serve_requests": (int, "requests per request-rate point of section 5"),
    "rate_multipliers": (_floats, "section 5's request rates as multiples of section 2's offline req/s"),
    "rates": (_floats, "section 5's request rates in req/s (instead of --rate-multipliers)"),
    "serve_budget": (int, "KV blocks of the server in section 5 (default: the smallest budget)"),
    "recompute_lengths": (_ints, "context lengths of section 6"),
    "beam_prompts": (int, "chat prompts of section 7 (a beam search each, all submitted at once)"),
    "beam_widths": (_ints, "beam widths of section 7"),
    "tier_conversations": (int, "multiturn conversations of section 8"),
    "tier_concurrency": (int, "conversations in flight at once in section 8"),
    "tier_pool_blocks": (int, "KV pool of section 8, in blocks (the histories should outgrow it)"),
    "swap_block_sizes": (_ints, "block sizes of section 9"),
    "swap_requests": (int, "chat requests of section 9's end-to-end runs"),
    "swap_pool_tokens": (int, "KV pool of section 9's end-to-end runs, in tokens at every block size"),
    "swap_context_tokens": (int, "the context section 9 restores by copies or by a forward"),
    "workload_scale": (float, ("multiply the workload generators' length medians (1: as the paper-like defaults; "
                              "smaller for tiny test models)")),
    "sections": (_ints, "sections to run, e.g. 1,2,3 (default all)"),
}


def add_subcommand(sub, add_engine_args) -> None:
    p = sub.add_parser("report", help="measure the PagedAttention claims; write plots and a README",
                       description="Run the evidence report (KV memory use, throughput at fixed KV budgets, "
                                   "prefix sharing, parallel sampling, latency under load, cache vs recompute, "
                                   "beam search) and write PNG plots, results.json and README.md into --out. The "
                                   f"context window defaults to {REPORT_MAX_MODEL_LEN} tokens (OPT's, as in the "
                                   "paper).")
    p.add_argument("--out", default="docs/report", help="output folder")
    p.add_argument("--quick", action="store_true", help="a smaller draw: fewer requests, budgets and rates (minutes)")
    p.add_argument("--render-only", action="store_true", help="redraw plots and README from --out/results.json")
    p.add_argument("--keep-sections", action="store_true",
                   help="keep the sections of --out/results.json this run does not measure (the README names the "
                        "run they came from); without it a run replaces the whole file")
    p.add_argument("--quiet", action="store_true", help="no progress lines within a run")
    g = p.add_argument_group("plan (each overrides the --quick or full preset)")
    for name, (typ, help_text) in _PLAN_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)
    g.add_argument("--workload-seed", type=int, default=0, help="seed of the workload draws")
    add_engine_args(p, max_model_len=REPORT_MAX_MODEL_LEN)
    p.set_defaults(func=cmd_report)


def plan_from_args(args) -> ReportPlan:
    plan = dataclasses.replace(QUICK if args.quick else FULL)
    for name in _PLAN_FLAGS:
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    plan.seed = args.workload_seed
    if not set(plan.hf_budgets) <= set(plan.budgets):
        plan.hf_budgets = [b for b in plan.hf_budgets if b in plan.budgets] or [max(plan.budgets)]
    if plan.serve_budget is None or args.budgets is not None and args.serve_budget is None:
        plan.serve_budget = min(plan.budgets)
    return plan


def choose_threads(requested: int | None) -> tuple[int, str]:
    """torch threads for every engine of the report: as asked, else one.

    On cores other processes also use, two OpenMP threads wait on each other: with a test suite
    running alongside, a two-thread report fell from about 100 to 15 output tokens/s. One thread
    degrades gracefully; give --num-threads on a machine of your own.
    """
    if requested:
        return requested, "--num-threads"
    return 1, (f"the default on shared cores, where competing OpenMP threads stall each other; 1-minute load "
               f"average {os.getloadavg()[0]:.2f} at the start")


def cmd_report(args) -> int:
    from benchmarks.report_render import render
    if args.render_only:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
    else:
        results = run_report(args, plan_from_args(args))
    render(results, args.out)
    print(f"wrote {args.out}/README.md, the plots and results.json")
    return 0


# ---- the measurements --------------------------------------------------------------------------
def run_report(args, plan: ReportPlan) -> dict:
    import torch

    from benchmarks import report_runs as runs
    from benchmarks.report_server import latency_sweep, rates_from_capacity
    from pagedserve.cli import engine_config

    start = time.perf_counter()
    log = runs.stderr_log(start)
    threads, why_threads = choose_threads(args.num_threads)
    torch.set_num_threads(threads)  # the transformers baseline runs in this process too
    base = engine_config(args).replace(num_threads=threads)
    os.makedirs(args.out, exist_ok=True)
    model = runs.model_facts(base)
    window = min(base.max_model_len or model["context_len"], model["context_len"])
    _check_budgets(plan, window, base.block_size)

    def items(kind: str, n: int):
        return runs.workload_items(kind, n, plan.seed, plan.workload_scale, model["vocab_size"])

    chat = items("chat", plan.chat_requests)
    results = {**result_header(args), "plan": dataclasses.asdict(plan), "threads": threads,
               "threads_reason": why_threads, "engine": dataclasses.asdict(base), "model": model,
               "max_model_len": window,
               "workloads": {"chat": {"call": _call("chat", plan.chat_requests, plan), **workload_summary(chat)}},
               "loadavg": {"start": os.getloadavg()[0]}, "sections": {}}
    progress = not args.quiet
    path = os.path.join(args.out, "results.json")
    if getattr(args, "keep_sections", False) and os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        results["sections"] = dict(earlier["sections"])
        results["workloads"] = {**earlier["workloads"], **results["workloads"]}
        results["earlier"] = {k: earlier.get(k) for k in ("date", "command", "plan", "machine", "earlier")}

    def done(name: str, value) -> None:
        results["sections"][name] = value
        results["loadavg"][f"after {name}"] = os.getloadavg()[0]
        results["elapsed_s"] = time.perf_counter() - start
        save_result(path, results)

    want = set(plan.sections)
    tier_memory = base.kv_offload_memory or DEFAULT_TIER  # sections 8-9's second tier
    if want & {1, 2}:
        budgets = plan.budgets if 2 in want else [max(plan.budgets)]
        log(f"sections 1-2: {len(chat)} chat requests at KV budgets {budgets} blocks ({threads} torch threads)")
        sweep = runs.budget_sweep(base, chat, budgets, POLICIES, log, progress)
        hf = []
        if 2 in want:
            from pagedserve.model.loader import default_model_path, resolve_dtype
            hf = runs.hf_static_at_budgets(base.model or default_model_path(), resolve_dtype(base.dtype, base.device),
                                           chat, plan.hf_budgets, base.block_size, log, progress)
        done("budgets", {"runs": sweep, "hf": hf})
    if 3 in want:
        shared = items("shared", plan.shared_requests)
        results["workloads"]["shared"] = {"call": _call("shared", plan.shared_requests, plan),
                                          "shared_prefix_len": max(it.shared_prefix_len for it in shared),
                                          **workload_summary(shared)}
        log(f"section 3: {len(shared)} shared-prefix requests, prefix caching on and off")
        done("prefix", runs.prefix_sharing(base.replace(num_kv_blocks=max(plan.budgets)), shared, log, progress))
    if 4 in want:
        prompts = chat[:plan.sampling_prompts]
        log(f"section 4: parallel sampling n={plan.sampling_ns} on {len(prompts)} chat prompts")
        done("sampling", runs.parallel_sampling(base, prompts, plan.sampling_ns, log))
    if 5 in want:
        rates = plan.rates or rates_from_capacity(_capacity(results, plan.serve_budget), plan.rate_multipliers)
        serve_items = items("chat", plan.serve_requests)
        results["workloads"]["serve"] = {"call": _call("chat", plan.serve_requests, plan),
                                         **workload_summary(serve_items)}
        log(f"section 5: servers at {plan.serve_budget} KV blocks, {len(serve_items)} requests at rates {rates} req/s")
        points = latency_sweep(base.replace(num_kv_blocks=plan.serve_budget), serve_items, rates, LATENCY_POLICIES,
                               log, seed=plan.seed)
        done("latency", {"num_kv_blocks": plan.serve_budget, "block_size": base.block_size, "max_model_len": window,
                         "rates": rates, "num_requests": len(serve_items),
                         "rates_from": "--rates" if plan.rates else
                         f"multiples {plan.rate_multipliers} of section 2's offline req/s with kv_reservation=none "
                         f"at {plan.serve_budget} blocks",
                         "policies": points})
    if 6 in want:
        lengths = [L for L in plan.recompute_lengths if L + 9 <= window]
        tokens = [t for it in chat for t in it.prompt_token_ids]
        log(f"section 6: cache vs recompute at context lengths {lengths}")
        done("recompute", runs.cache_vs_recompute(base, tokens, lengths, log))
    if 7 in want:
        prompts = chat[:plan.beam_prompts]
        log(f"section 7: beam search widths {plan.beam_widths} on {len(prompts)} chat prompts, all at once")
        done("beam", runs.beam_search(base, prompts, plan.beam_widths, log))
    if 8 in want:
        multiturn = items("multiturn", plan.tier_conversations)
        results["workloads"]["multiturn"] = {"call": _call("multiturn", plan.tier_conversations, plan),
                                             **workload_summary(multiturn)}
        log(f"section 8: a second KV tier on multi-turn conversations")
        done("tier", runs.kv_tier(base, multiturn, plan.tier_pool_blocks, tier_memory, plan.tier_concurrency, log,
                                  progress))
    if 9 in want:
        log(f"section 9: swap or recompute preemption at block sizes {plan.swap_block_sizes}")
        done("swap", runs.swap_or_recompute(base, chat[:plan.swap_requests], plan.swap_block_sizes,
                                            plan.swap_pool_tokens, plan.swap_context_tokens, tier_memory, log,
                                            progress))
    results["machine_end"] = machine_info()
    results["loadavg"]["end"] = os.getloadavg()[0]
    results["elapsed_s"] = time.perf_counter() - start
    save_result(path, results)
    log("all sections done")
    return results


def _runs(results: dict) -> list[dict]:
    return results["sections"].get("budgets", {}).get("runs", [])


def _capacity(results: dict, budget: int) -> float:
    """Offline req/s of paged allocation (none) at the server's budget (or the nearest measured)."""
    runs = [r for r in _runs(results) if r["kv_reservation"] == "none"]
    if not runs:
        raise ValueError("section 5 sets its request rates from section 2's throughput: run section 2 "
                         "or give --rates")
    return min(runs, key=lambda r: abs(r["num_kv_blocks"] - budget))["requests_per_s"]


def _check_budgets(plan: ReportPlan, window: int, block_size: int) -> None:
    """Every budget must hold at least one whole window, or max_model_len reservation could run nothing."""
    need = -(-window // block_size)
    small = sorted({b for b in plan.budgets + [plan.serve_budget] if b < need})
    if small:
        raise ValueError(f"KV budgets {small} hold less than one {window}-token window ({need} blocks of "
                         f"{block_size}): max_model_len reservation could never admit a request")


def _call(kind: str, n: int, plan: ReportPlan) -> str:
    from benchmarks.report_runs import generator_kwargs
    kw = {"n": n, "seed": plan.seed, **generator_kwargs(kind, plan.workload_scale)}
    return f"workload.{kind}({', '.join(f'{k}={v}' for k, v in kw.items())})"


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.report ...`: the same as `pagedserve bench report ...`."""
    import sys

    from pagedserve.cli import main as cli_main
    if argv is None:
        argv = sys.argv[1:]
        # results.json records sys.argv as the command: record the equivalent pagedserve command line.
        sys.argv = ["pagedserve", "bench", "report", *argv]
    return cli_main(["bench", "report", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
