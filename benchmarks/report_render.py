"""results.json -> the report's plots and README.md (markdown: claim, method, numbers, plot, verdict)."""
from __future__ import annotations

import os

from benchmarks import report_claims as claims
from benchmarks.report_claims import Claim, pct
from pagedserve.bench.results import fmt

FIGURES = {"budgets": "memory.png", "budgets_line": "budgets.png", "prefix": "prefix.png",
           "sampling": "sampling.png", "latency": "latency.png", "recompute": "recompute.png", "beam": "beam.png",
           "tier": "tier.png", "swap": "swap.png"}


def md_table(headers: list[str], rows: list[list]) -> str:
    cells = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def render(results: dict, out: str) -> str:
    """Write the plots and README.md for whatever sections results holds; returns the markdown."""
    from benchmarks import report_plots as plots
    os.makedirs(out, exist_ok=True)
    s = results["sections"]
    parts, summary = [], []

    def add(claim: Claim, body: str) -> None:
        summary.append(claim)
        parts.append(f"## {claim.section}\n\n**The paper.** {claim.paper}\n\n{body}\n\n"
                     f"**Measured.** {claim.measured}.\n\n**Verdict: {claim.verdict}.** {claim.why}\n")

    if s.get("budgets"):
        runs, hf = s["budgets"]["runs"], s["budgets"]["hf"]
        plots.memory(runs, os.path.join(out, FIGURES["budgets"]))
        add(claims.memory_claim(runs), _memory_body(results, runs))
        if len({r["num_kv_blocks"] for r in runs}) > 1:
            plots.budgets(runs, hf, os.path.join(out, FIGURES["budgets_line"]))
            add(claims.throughput_claim(runs, hf), _budget_body(results, runs, hf))
    if s.get("prefix"):
        plots.prefix(s["prefix"], os.path.join(out, FIGURES["prefix"]))
        add(claims.prefix_claim(s["prefix"], results["workloads"]["shared"]), _prefix_body(results, s["prefix"]))
    if s.get("sampling"):
        plots.sampling(s["sampling"], os.path.join(out, FIGURES["sampling"]))
        add(claims.sampling_claim(s["sampling"], results["workloads"]["chat"]), _sampling_body(s["sampling"]))
    if s.get("latency"):
        plots.latency(s["latency"], os.path.join(out, FIGURES["latency"]))
        add(claims.latency_claim(s["latency"], results["workloads"].get("serve")), _latency_body(s["latency"]))
    if s.get("recompute"):
        plots.recompute(s["recompute"], os.path.join(out, FIGURES["recompute"]))
        add(claims.recompute_claim(s["recompute"]), _recompute_body(s["recompute"]))
    if s.get("beam"):
        plots.beam(s["beam"], os.path.join(out, FIGURES["beam"]))
        add(claims.beam_claim(s["beam"], s.get("sampling")), _beam_body(s["beam"]))
    if s.get("tier"):
        plots.tier(s["tier"], os.path.join(out, FIGURES["tier"]))
        add(claims.tier_claim(s["tier"]), _tier_body(s["tier"]))
    if s.get("swap"):
        plots.swap(s["swap"], os.path.join(out, FIGURES["swap"]))
        add(claims.swap_claim(s["swap"]), _swap_body(s["swap"]))

    text = "\n".join([_header(results), _summary(summary), *parts, _footer(results)])
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    return text


# ---- header and summary -----------------------------------------------------------------------
def _header(r: dict) -> str:
    m, e = r["machine"], r["engine"]
    loads = ", ".join(f"{k} {v:.2f}" for k, v in r["loadavg"].items())
    model, dtype = r["model"]["name"], r["model"]["dtype"]
    wl = "\n".join(f"  - {k}: `{w['call']}` from pagedserve.bench.workload: {w['num_requests']} requests, mean prompt "
                   f"{w['mean_prompt_len']:.0f} tokens, mean output {w['mean_output_len']:.0f} tokens (exact "
                   f"lengths, EOS ignored)" for k, w in r["workloads"].items())
    return f"""# Evidence report: the PagedAttention claims, measured on this machine

Regenerate with the command below (the `--quick` preset runs a smaller draw in a few minutes).
Every number here is in [results.json](results.json); the paper is Kwon et al., *Efficient Memory
Management for Large Language Model Serving with PagedAttention*, SOSP 2023.

- **Command:** `{r['command']}`
- **Date:** {r['date']} (the run took {r.get('elapsed_s', 0) / 60:.1f} min){_earlier(r)}
- **Machine:** {m['cpu']}, {m['cpu_count']} cores ({', '.join(m.get('cpu_flags', []))}), {m['platform']},
  Python {m['python']}, torch {m.get('torch', '?')}
- **Threads:** {r['threads']} torch thread(s) per engine. Why: {r['threads_reason']}.
- **Load average (1 min)** at the start and after each section: {loads}. The machine is shared with
  other jobs (each run's mean load is in the tables); read absolute tokens/s as lower bounds.
- **Model:** {model}, {dtype}; KV blocks of {e['block_size']} tokens; context window {r['max_model_len']}
  (the paper's OPT window; `max_model_len` reservation reserves this much per request); step budget
  {e['max_num_batched_tokens']} tokens, at most {e['max_num_seqs']} running requests.
- **Workloads** (token-id prompts with exact output lengths, so every engine does the same work):
{wl}
- **Baselines** run through the same engine code: `kv_reservation=request` reserves prompt + output at
  admission (an oracle that knows each output length, the paper's *Orca (Oracle)*), `max_model_len`
  reserves the whole window (*Orca (Max)*, a contiguous cache); plus Hugging Face transformers' own
  static batching (section 2).
"""


def _earlier(r: dict) -> str:
    """Where sections kept from an earlier run (--keep-sections) came from."""
    e, lines = r.get("earlier"), []
    while e:
        lines.append(f"\n- **Kept from an earlier run** (`--keep-sections`): sections this run did not measure "
                     f"come from `{e['command']}` on {e['date']}; its plan: {e['plan']}")
        e = e.get("earlier")
    return "".join(lines)


def _summary(cs: list[Claim]) -> str:
    rows = [[c.section, c.paper, c.measured, f"**{c.verdict}**"] for c in cs]
    return "## Summary\n\n" + md_table(["section", "the paper", "measured here", "verdict"], rows) + "\n"


def _footer(r: dict) -> str:
    p = r["plan"]
    plan = ", ".join(f"{k}={v}" for k, v in p.items())
    return (f"## How this was measured\n\nPlan (`ReportPlan` in benchmarks/report.py): {plan}.\n\n"
            f"Each engine run submits all its requests at once "
            f"(sections 1-4, 7 and 9) and steps until the last finishes; timing excludes model loading. Shares of KV "
            f"slots come from the engine's own per-step accounting (`engine.kv_cache.usage_sum`), block counts from "
            f"its block pool, prefill and hit counts from its prefix-cache counters.\n")


# ---- section bodies -----------------------------------------------------------------------------
def _memory_body(r: dict, runs: list[dict]) -> str:
    blocks = max(x["num_kv_blocks"] for x in runs)
    rows = []
    for x in sorted(runs, key=lambda x: (x["num_kv_blocks"], x["kv_reservation"])):
        sh = x["slot_shares"]
        rows.append([str(x["num_kv_blocks"]), x["kv_reservation"], pct(sh["token_states"]), pct(sh["reserved"]),
                     pct(sh["fragmentation"]), x["num_preemptions"]])
    return (f"**How.** The chat workload ({runs[0]['num_requests']} requests) through the engine under each "
            f"`kv_reservation`; after the run, `engine.kv_cache.usage_sum` holds the allocated KV slots summed "
            f"over steps, split into slots holding a token's K/V, slots reserved for a future token of their "
            f"request, and slots no token will ever fill (internal fragmentation). The figure is the run at "
            f"{blocks} blocks; the table has every budget of section 2 (the shares barely depend on it).\n\n"
            f"![KV slot shares](memory.png)\n\n"
            + md_table(["KV blocks", "kv_reservation", "token states", "reserved", "fragmentation",
                        "preemptions"], rows))


def _budget_body(r: dict, runs: list[dict], hf: list[dict]) -> str:
    rows = []
    for x in sorted(runs, key=lambda x: (x["num_kv_blocks"], x["kv_reservation"])):
        rows.append([str(x["num_kv_blocks"]), f"pagedserve {x['kv_reservation']}", x["mean_running_requests"],
                     x["max_running_requests"], x["output_tokens_per_s"], x["elapsed_s"], x["num_preemptions"],
                     x["loadavg_1min_mean"]])
    for h in hf:
        if h.get("output_tokens_per_s"):
            rows.append([str(h["num_kv_blocks"]), f"transformers static, batch {h['batch_size']}",
                         float(h["batch_size"]), h["batch_size"], h["output_tokens_per_s"], h["elapsed_s"], "-",
                         h["loadavg_1min_mean"]])
    hf_note = ""
    if hf:
        waste = [1 - h["output_tokens"] / h["generated_tokens_incl_padding"] for h in hf if h.get("output_tokens")]
        sizes = ", ".join(f"{h['batch_size']} at {h['num_kv_blocks']} blocks "
                          f"({fmt(h['cache_tokens_needed'], 0)} of {h['budget_tokens']:,} token slots)" for h in hf)
        hf_note = (f" Transformers' static batching runs at the largest batch whose contiguous cache fits the same "
                   f"budget (a batch of b requests needs b x (longest prompt + longest output in the batch) "
                   f"token slots; batches taken in workload order): {sizes}. Each batch generates until its longest "
                   f"request is done; only each request's own tokens count as output (the rest, "
                   f"{', '.join(pct(w) for w in waste)} of the tokens it generated, is waste). "
                   f"It runs only at the budgets "
                   f"listed, since it is slow on this CPU (transformers {hf[0].get('transformers')}, "
                   f"{hf[0].get('attn_implementation')} attention, {hf[0].get('mlp_layers')}).")
    ratio_rows = [[str(x["num_kv_blocks"]), x["running_ratio"], x["throughput_ratio"],
                   x.get("throughput_ratio_request", "-"), x.get("throughput_ratio_hf", "-")]
                  for x in claims.budget_ratios(runs, hf)]
    return (f"**How.** The same chat requests, all submitted at once, at each KV budget (num_kv_blocks) under each "
            f"policy: the mean number of running requests per step and the output tokens/s.{hf_note}\n\n"
            f"![concurrency and throughput against the KV budget](budgets.png)\n\n"
            + md_table(["KV blocks", "engine", "mean running", "max running", "output tok/s", "time s",
                        "preemptions", "load avg"], rows)
            + "\n\nPaging over each baseline at the same budget:\n\n"
            + md_table(["KV blocks", "running: none / max_model_len", "tok/s: none / max_model_len",
                        "tok/s: none / request", "tok/s: none / transformers"], ratio_rows))


def _prefix_body(r: dict, sec: dict) -> str:
    rows = [[name, x["kv_blocks_peak"], x["prefill_tokens_computed"], pct(x["prefix_hit_rate"]),
             x["output_tokens_per_s"], x["elapsed_s"], x["num_preemptions"]]
            for name, x in (("prefix caching off", sec["off"]), ("prefix caching on", sec["on"]))]
    w = r["workloads"]["shared"]
    return (f"**How.** The shared workload ({w['num_requests']} requests, {w['shared_prefix_requests']} starting "
            f"with the same system prompt) with `enable_prefix_caching` on and off, paged allocation, "
            f"{sec['on']['num_kv_blocks']} KV blocks. Prefill tokens computed = tokens looked up at admission "
            f"minus prefix-cache hits (the engine's counters); peak KV blocks = most blocks referenced at once.\n\n"
            f"![prefix caching off and on](prefix.png)\n\n"
            + md_table(["run", "peak KV blocks", "prefill tokens computed", "hit rate", "output tok/s", "time s",
                        "preemptions"], rows))


def _sampling_body(rows_in: list[dict]) -> str:
    rows = [[r["n"], r["num_prompts"], r["shared"]["blocks_mean"], r["independent"]["blocks_mean"],
             pct(r["saving_mean"]), r["shared"]["blocks_peak"], r["independent"]["blocks_peak"], pct(r["saving_peak"]),
             r["shared"]["output_tokens_per_s"], r["independent"]["output_tokens_per_s"]] for r in rows_in]
    return ("**How.** For each n, the first chat prompts sampled n times at temperature 1 with the workload's "
            "output lengths: once as one request with `n` (the engine forks the samples after the prompt, "
            "sharing its blocks, copy-on-write), once as n independent requests. Prefix caching is off in both, "
            "so the independent requests share nothing, and the pool holds every sequence, so nothing is "
            "preempted. Saved = 1 - blocks with sharing / blocks without, from the block pool's count of blocks "
            "in use; the headline is the mean over engine steps (the memory held over the run), peak alongside.\n\n"
            "![KV blocks saved by parallel sampling](sampling.png)\n\n"
            + md_table(["n", "prompts", "mean blocks, shared", "mean blocks, independent", "saved (mean)",
                        "peak, shared", "peak, independent", "saved (peak)", "tok/s shared", "tok/s independent"],
                       rows))


def _latency_body(sec: dict) -> str:
    s = claims.sustainable_rates(sec)
    rows = []
    for policy, pts in sec["policies"].items():
        for p in pts:
            rows.append([policy, fmt(p["request_rate"], 2), fmt(p["mean_normalized_latency_s_per_token"], 4),
                         p["mean_ttft_ms"],
                         p["mean_tpot_ms"], p["output_throughput"], f"{p['completed']}/{p['num_requests']}",
                         p["duration_s"], p.get("loadavg_1min_mean")])
    return (f"**How.** `pagedserve serve` as a subprocess on a free 127.0.0.1 port with {sec['num_kv_blocks']} KV "
            f"blocks (a fresh server per policy, prefix caching off so repeated prompts find nothing cached), "
            f"driven by `bench.serve` with {sec['num_requests']} chat requests per rate, Poisson arrivals, streamed "
            f"completions with exact output lengths; one warm-up request first. Rates: {sec['rates_from']}. "
            f"Normalized latency is the mean over requests of end-to-end latency / output tokens. A policy's "
            f"sustainable rate is where its normalized latency crosses {claims.LATENCY_THRESHOLD:g}x the unloaded "
            f"one (the lower of the two policies' at the lowest rate, {fmt(s['threshold_s_per_token'], 3)} "
            f"s/token), interpolated between rates. With "
            f"{sec['num_requests']} requests per point an overloaded server's latency grows with the queue rather "
            f"than without bound, so past the knee the curve rises steeply but finitely.\n\n"
            f"![normalized latency against request rate](latency.png)\n\n"
            + md_table(["kv_reservation", "rate req/s", "normalized latency s/token", "mean TTFT ms", "mean TPOT ms",
                        "output tok/s", "completed", "duration s", "load avg"], rows))


def _recompute_body(rows_in: list[dict]) -> str:
    rows = [[r["length"], r["cached_ms"], r["recompute_ms"], f"{r['recompute_ms'] / r['cached_ms']:.1f}x"]
            for r in rows_in]
    return ("**How.** One sequence at a time in the engine (prefix caching off): a prompt of L tokens is computed "
            "in one forward, which is what every generated token costs when nothing is cached (the whole prefix "
            "again); the following decode steps, each one new token attending to the cached keys and values, are "
            "timed and their median taken.\n\n![time per token with and without the cache](recompute.png)\n\n"
            + md_table(["context length", "with the cache ms/token", "recomputing ms/token", "ratio"], rows))


def _beam_body(sec: dict) -> str:
    rows = [[r["beam_width"], r["num_prompts"], r["blocks_mean"], r["unshared_blocks_mean"], pct(r["saving_mean"]),
             r["blocks_peak"], r["unshared_blocks_peak"], pct(r["saving_peak"]), r["beam_tokens_per_s"],
             r["elapsed_s"], r["num_preemptions"]] for r in sec["runs"]]
    w = sec["workload"]
    return (f"**How.** The first {w['num_requests']} chat prompts (mean {w['mean_prompt_len']:.0f} tokens), each a "
            f"beam search of the workload's output length (mean {w['mean_output_len']:.0f} tokens; EOS ignored, "
            f"`early_stopping=\"never\"`, so every search runs its whole length), all submitted at once to one "
            f"engine: the searches share its batch and its pool of {sec['num_kv_blocks']} blocks, which holds every "
            f"beam unshared, so nothing waits for memory. Prefix caching is off, so only the beams' own sharing "
            f"counts. After every engine step: the blocks the engine holds (a continuation forks its parent's "
            f"block table, copy-on-write) and the blocks the same live beams would hold each with its own table "
            f"(the sum over the beams of every search of ceil(tokens in its cache / {sec['block_size']})), the "
            f"counterfactual of an engine without sharing, from the same run. Saved = 1 - held / unshared; the "
            f"headline is the mean over steps, peak alongside. Beam tokens/s counts width x output length per "
            f"search; transformers' beam search is not timed here (slow on this CPU): "
            f"`python -m benchmarks.beam_memory` does (docs/PERFORMANCE.md).\n\n"
            f"![KV blocks held and saved by beam search](beam.png)\n\n"
            + md_table(["width", "searches", "mean blocks held", "mean unshared", "saved (mean)", "peak held",
                        "peak unshared", "saved (peak)", "beam tok/s", "time s", "preemptions"], rows))


def _tier_body(sec: dict) -> str:
    rows = [[r["mode"], r["prompt_tokens_submitted"], r["prefill_tokens_computed"], pct(r["prefix_hit_rate"]),
             r["kv_offload_hits"], r["num_preemptions"], r["num_swapped_out"], r["ttft_mean_s"], r["ttft_p90_s"],
             r["output_tokens_per_s"], r["elapsed_s"]] for r in sec["runs"]]
    w = sec["workload"]
    return (f"**How.** `pagedserve bench multiturn`'s driver: {sec['runs'][0]['num_conversations']} conversations "
            f"of the multiturn workload ({sec['runs'][0]['num_turns']} turns; each turn adds a user message of mean "
            f"{w['mean_prompt_len']:.0f} tokens, the first opening with a shared system prompt, and asks for an "
            f"answer of mean {w['mean_output_len']:.0f} tokens), {sec['concurrency']} in flight: a conversation "
            f"sends its next turn, with its whole history (the engine's own answers included), once its answer is "
            f"complete. A pool of {sec['num_kv_blocks']} blocks of {sec['block_size']} tokens, prefix caching on; "
            f"the same conversations three times: no tier; a tier of {sec['kv_offload_memory']} (recompute "
            f"preemption); the tier with swap preemption. Prefill tokens count every token the model ran except "
            f"the one-token decode steps; TTFT is from a turn's submission to its first token.\n\n"
            f"![prefill computed and time to first token, without and with the tier](tier.png)\n\n"
            + md_table(["mode", "prompt tokens sent", "prefill computed", "hit rate", "tier hits (tokens)",
                        "preemptions", "swapped", "TTFT mean s", "TTFT p90 s", "out tok/s", "time s"], rows))


def _swap_body(sec: dict) -> str:
    mech = [[r["block_size"], r["blocks"], 1e3 * r["swap_out_s"], 1e3 * r["swap_in_s"], 1e3 * r["recompute_s"]]
            for r in sec["mechanism"]]
    e2e = [[r["block_size"], r["mode"], r["num_kv_blocks"], r["elapsed_s"], r["output_tokens_per_s"],
            r["num_preemptions"], r["num_swapped_out"], r["prefill_tokens_computed"], r["kv_blocks_offloaded"],
            r["kv_blocks_loaded"], r["copy_s"]] for r in sec["end_to_end"]]
    return (f"**How.** `benchmarks/preemption_modes.py`. The mechanism alone: a {sec['context_tokens']}-token "
            f"context's blocks copied to the tier and back by the runner's own copies, against one prefill forward "
            f"over those tokens (medians of 5). End to end: the first {sec['workload']['num_requests']} chat "
            f"requests all at once in a pool of {sec['pool_tokens']} tokens at every block size (prefix caching "
            f"off, so a recomputed context is computed whole), preemption by recompute and by swap to a tier of "
            f"{sec['kv_offload_memory']}; copy seconds are timed around the runner's copies.\n\n"
            f"![swap against recompute by block size](swap.png)\n\n"
            + md_table(["block size", "blocks", "copy out ms", "copy back ms", "recompute ms"], mech) + "\n\n"
            + md_table(["block size", "mode", "pool blocks", "time s", "out tok/s", "preemptions", "swapped",
                        "prefill computed", "blocks out", "blocks back", "copy s"], e2e))
