"""The command line: `pagedserve serve | generate | chat | export-tokenizer | audit verify|summary | bench ...`."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from datetime import datetime, timezone

from pagedserve.config import (ATTENTION_BACKENDS, DTYPES, KV_RESERVATIONS, PREEMPTION_MODES, QUANTIZATIONS,
                               EngineConfig)

ENGINE_HELP = {
    "model": "Hugging Face model folder or .gguf file",
    "tokenizer": "tokenizer folder or .gguf file",
    "dtype": f"weights and activations dtype: {' | '.join(DTYPES)} (auto: bfloat16 where the CPU has it natively)",
    "device": "cpu or cuda",
    "block_size": "tokens per KV cache block",
    "kv_cache_memory": "KV cache budget, e.g. 512MiB or 1GiB (ignored if --num-kv-blocks is given)",
    "gpu_memory_utilization": "on a GPU, without --kv-cache-memory or --num-kv-blocks: the share of the device's "
                              "memory the engine may take; the KV cache gets what the weights and a profiling "
                              "step at the largest batch leave of it",
    "num_kv_blocks": "KV cache size in blocks",
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "token budget of one step (decode tokens plus prefill chunks)",
    "max_model_len": "context window in tokens",
    "enable_prefix_caching": "share KV blocks of identical prompt prefixes between requests",
    "enable_chunked_prefill": "split long prompts into chunks that fit the step's token budget",
    "kv_reservation": f"KV allocation policy: {' | '.join(KV_RESERVATIONS)} (none: paged; the others reserve up front)",
    "seed": "seed for requests that bring none",
    "num_threads": "torch CPU threads",
    "attention_backend": "paged-attention implementation: auto | torch | cpu | triton (auto: on the CPU, cpu, "
                         "the fused C decode kernel, where it builds; on CUDA, triton; else torch, the reference)",
    "quantization": "none: a GGUF model is dequantized into --dtype at load; gguf: its Q4_0/Q4_1/Q8_0 weights "
                    "stay quantized and decode reads them through a C kernel (CPU; activations rounded to int8 "
                    "per 32 values, as llama.cpp does)",
    "enforce_eager": "run every step through the eager model; without it, pure-decode steps replay as a graph: "
                     "in float32 on the CPU a fixed list of kernel calls (the decode graph), on CUDA with the "
                     "triton backend CUDA graphs captured per batch size (the same results, less overhead)",
    "kv_offload_memory": "size of a second KV tier behind the pool, e.g. 4GiB: full blocks the pool evicts are "
                         "kept there under their hash and loaded back on a prefix hit instead of recomputed",
    "kv_offload_dir": "keep the second KV tier in a memory-mapped file in this folder (the OS pages it to disk) "
                      "instead of in memory; needs --kv-offload-memory",
    "tensor_parallel_size": "ranks each holding 1/N of every layer (heads, MLP columns, vocabulary) and of the KV "
                            "cache, as processes on this host over torch.distributed (gloo on the CPU, NCCL on "
                            "CUDA, one GPU a rank); this process is rank 0 and samples",
    "distributed_init_method": "where the tensor-parallel ranks meet: tcp://HOST:PORT (rank 0's host), or env:// "
                               "for torch.distributed's MASTER_ADDR and MASTER_PORT; the other ranks are then "
                               "started with `pagedserve worker --rank R` and the same options, on any host",
    "preemption_mode": f"how a request is preempted when the pool is full: {' | '.join(PREEMPTION_MODES)} (swap "
                       "parks its blocks in the second tier and loads them back; needs --kv-offload-memory)",
}
# What an engine option left unset (None) means, for --help.
ENGINE_UNSET = {
    "model": "the bundled SmolLM2-135M-Instruct",
    "tokenizer": "the model's own",
    "num_kv_blocks": "as many as --kv-cache-memory holds",
    "kv_cache_memory": "1GiB on the CPU; on a GPU, what --gpu-memory-utilization leaves",
    "max_model_len": "the model's",
    "num_threads": "torch's choice",
    "kv_offload_memory": "no second tier",
    "kv_offload_dir": "in memory",
    "distributed_init_method": "the other ranks are spawned on this host",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default means
    (`(default: the model's)` reads better than `(default: None)`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with HelpFormatter. Subcommand parsers are built with the parent's class
    (add_subparsers' default parser_class), so every subcommand, wherever its options are declared
    (server.args, bench), shows its defaults too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_engine_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per EngineConfig field. defaults: this command's own defaults for some fields
    (`bench report` runs at a 2048-token window), shown as such in --help."""
    g = parser.add_argument_group("engine options")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        text = ENGINE_HELP[f.name] + (f" (default: {ENGINE_UNSET[f.name]})" if default is None else "")
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif f.name in ("num_kv_blocks", "max_model_len", "num_threads") or f.type in ("int", int):
            g.add_argument(flag, type=int, default=default, help=text)
        elif f.type in ("float", float):
            g.add_argument(flag, type=float, default=default, help=text)
        else:
            choices = {"dtype": DTYPES, "kv_reservation": KV_RESERVATIONS,
                       "attention_backend": ATTENTION_BACKENDS, "quantization": QUANTIZATIONS,
                       "preemption_mode": PREEMPTION_MODES}.get(f.name)
            g.add_argument(flag, default=default, choices=choices, help=text)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128, from_model: bool = False) -> None:
    """Sampling flags. from_model: temperature, top-p and top-k default to None, meaning the model's
    generation config (then the chat's own defaults), resolved once the model is loaded."""
    from pagedserve.chat import FALLBACK_SAMPLING
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate")
    if from_model:
        model = "(default: the model's generation config if it has one, else {})"
        g.add_argument("--temperature", type=float, default=None,
                       help="0 is greedy " + model.format(FALLBACK_SAMPLING["temperature"]))
        g.add_argument("--top-p", type=float, default=None,
                       help="nucleus sampling mass " + model.format(FALLBACK_SAMPLING["top_p"]))
        g.add_argument("--top-k", type=int, default=None,
                       help="sample among the k most likely tokens, 0: all " + model.format(0))
    else:
        g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
        g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="per-request sampling seed (default: none, draws from the engine's generator, which "
                        "--seed seeds)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The SamplingParams fields the sampling flags set (a flag left at None sets nothing)."""
    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.sampling_seed}
    return {k: v for k, v in given.items() if v is not None}


def sampling_params(args: argparse.Namespace):
    from pagedserve.sampling_params import SamplingParams
    return SamplingParams(**sampling_overrides(args))


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedserve.llm import LLM
    llm = LLM(**dataclasses.asdict(engine_config(args)))
    params = sampling_params(args)
    if args.chat_template:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outs):
        print(f"--- {prompt!r}\n{out.outputs[0].text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pagedserve.chat import interactive_chat
    return interactive_chat(engine_config(args), sampling_overrides(args), system=args.system)


def cmd_serve(args: argparse.Namespace) -> int:
    from pagedserve.server.app import run_server
    return run_server(args, engine_config(args))


def cmd_export_tokenizer(args: argparse.Namespace) -> int:
    """Save the model's tokenizer and chat template as a Hugging Face folder (tokenizer.json,
    tokenizer_config.json, chat template), for clients that tokenize themselves (lm-eval's huggingface
    backend: tokenizer=DIR) with no hub; for a GGUF model this is the tokenizer the file carries."""
    from pagedserve.model.loader import default_model_path, load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer or args.model or default_model_path())
    written = tokenizer.save_pretrained(args.out)
    print(f"saved the tokenizer of {args.tokenizer or args.model or 'the default model'} to {args.out}: "
          f"{', '.join(sorted(os.path.basename(f) for f in written))}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pagedserve.distributed.workers import run_worker
    run_worker(engine_config(args), args.rank)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="pagedserve", description="LLM inference and serving with a paged KV cache")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate completions for prompts and print them")
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap each prompt as a user message in the model's chat template")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat that streams tokens")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    add_sampling_args(p, max_tokens=512, from_model=True)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    from pagedserve.server.args import add_server_args
    add_server_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a tensor-parallel rank of an engine started elsewhere with the same "
                                      "engine options and --distributed-init-method")
    p.add_argument("--rank", type=int, required=True, help="this process's rank, 1 .. tensor-parallel-size - 1")
    add_engine_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("export-tokenizer", help="save the model's tokenizer and chat template as a HF folder",
                       description=cmd_export_tokenizer.__doc__)
    p.add_argument("out", help="folder to write")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: the default model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf file (default: the model's own)")
    p.set_defaults(func=cmd_export_tokenizer)

    p = sub.add_parser("audit", help="check an audit log")
    audit = p.add_subparsers(dest="audit_command", required=True)
    a = audit.add_parser("verify", help="check an audit log's hash chain and head; exit 1 at the first break",
                         description=cmd_audit_verify.__doc__)
    a.add_argument("files", nargs="+", metavar="FILE", help="the log (a rotated log: its files, oldest first)")
    a.add_argument("--key-file", default=None, help="the server's --audit-key-file, to check the head's HMAC")
    a.set_defaults(func=cmd_audit_verify)
    a = audit.add_parser("summary", help="per identity: requests, denials, errors, tokens and latency",
                         description=cmd_audit_summary.__doc__)
    a.add_argument("files", nargs="+", metavar="FILE", help="the log (a rotated log: its files, oldest first)")
    a.add_argument("--window", type=float, default=None, metavar="MINUTES",
                   help="one row per identity and window of this many minutes (default: the whole log)")
    a.set_defaults(func=cmd_audit_summary)

    p = sub.add_parser("bench", help="benchmarks: workload, throughput, serve, report")
    bench = p.add_subparsers(dest="bench_command", required=True)
    from pagedserve.bench import cli as bench_cli
    bench_cli.add_subcommands(bench, add_engine_args)
    return parser


def cmd_audit_verify(args) -> int:
    """Check an audit log written by `pagedserve serve --audit-log FILE`: every line's sequence number and the
    hash of the line before it, and FILE.head (the last line's number and hash, and its HMAC when the server
    had --audit-key-file). Prints the first edited, inserted, deleted or reordered line, or a cut-off tail."""
    from pagedserve.server.args import read_key_file
    from pagedserve.server.audit import verify_chain
    lines, problems = verify_chain(args.files, read_key_file(args.key_file))
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {lines} lines, the chain unbroken and its head matching")
    return 1 if problems else 0


def cmd_audit_summary(args) -> int:
    """Per identity (and per time window with --window): requests, denials (4xx), errors (5xx), prompt and
    completion tokens, mean and largest latency, from an audit log written by `pagedserve serve --audit-log`."""
    from pagedserve.bench.results import format_table
    from pagedserve.server.audit import summarize
    if args.window is not None and not args.window > 0:
        raise ValueError(f"--window must be a positive number of minutes, got {args.window}")
    rows = summarize(args.files, args.window * 60 if args.window else None)
    head = (["window start (UTC)"] if args.window else []) + [
        "identity", "requests", "denied", "errors", "prompt tokens", "completion tokens", "latency mean s",
        "latency max s"]
    print(format_table(head, [
        ([datetime.fromtimestamp(r["window_start"], timezone.utc).strftime("%Y-%m-%d %H:%M")] if args.window else [])
        + [r["identity"], r["requests"], r["denied"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
           f"{r['latency_mean_s']:.3f}", f"{r['latency_max_s']:.3f}"] for r in rows]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
