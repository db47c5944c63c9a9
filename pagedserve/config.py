"""EngineConfig: every engine option in one frozen, validated dataclass; unknown options raise."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

KV_RESERVATIONS = ("none", "request", "max_model_len")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "gguf")
PREEMPTION_MODES = ("recompute", "swap")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30}


def parse_memory(value: str | int) -> int:
    """'1GiB', '512MiB', '2GB', 1073741824 -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}: use a number with a unit such as '512MiB' or '1GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class EngineConfig:
    """Options of LLM(...), LLMEngine and the CLI (as --kebab-case flags)."""
    model: str | None = None          # HF folder or .gguf file; None: the default SmolLM2-135M-Instruct
    tokenizer: str | None = None      # defaults to the model's own
    dtype: str = "auto"               # auto | float32 | bfloat16 | float16
    device: str = "cpu"               # cpu | cuda
    block_size: int = 16              # tokens per KV cache block
    kv_cache_memory: str | int | None = None  # KV cache budget; None: 1GiB on the CPU, measured on a GPU
    num_kv_blocks: int | None = None  # KV cache size in blocks (overrides kv_cache_memory)
    gpu_memory_utilization: float = 0.9  # on a GPU, the share of its memory weights + activations + KV may take
    max_num_seqs: int = 256           # most requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_model_len: int | None = None  # context window; default: the model's
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_reservation: str = "none"      # none (paged) | request | max_model_len
    seed: int = 0                     # seed for requests that bring none
    num_threads: int | None = None    # torch CPU threads; None: torch's default
    attention_backend: str = "auto"   # auto | torch | cpu | triton: the paged-attention implementation
    quantization: str = "none"        # none | gguf: keep a GGUF's Q4_0/Q4_1/Q8_0 weights quantized (CPU)
    enforce_eager: bool = False       # never replay pure-decode steps as a graph (decode_graph.py, cuda_graph.py)
    kv_offload_memory: str | int | None = None  # size of the second KV tier (kv_cache/offload.py); None: none
    kv_offload_dir: str | None = None  # the tier as a memory-mapped file in this folder instead of in memory
    preemption_mode: str = "recompute"  # recompute | swap (to the second tier)
    tensor_parallel_size: int = 1     # ranks each holding 1/N of every layer (distributed/); 1: one process
    # Where the ranks meet ("tcp://host:port", or "env://" for MASTER_ADDR/MASTER_PORT): the other ranks are
    # then started by `pagedserve worker`, on any host. None: this process spawns them on this host.
    distributed_init_method: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {KV_RESERVATIONS}, got {self.kv_reservation!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None:
            parse_memory(self.kv_cache_memory)
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.distributed_init_method is not None and self.tensor_parallel_size == 1:
            raise ValueError("distributed_init_method is for tensor_parallel_size > 1")
        if self.tensor_parallel_size > 1 and self.quantization != "none":
            raise ValueError("quantization='gguf' runs on one process: it cannot be split over tensor_parallel_size > 1")
        if self.kv_offload_memory is None:
            for name, unset in (("kv_offload_dir", None), ("preemption_mode", "recompute")):
                if getattr(self, name) != unset:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs a second KV tier: set kv_offload_memory")
        elif parse_memory(self.kv_offload_memory) < 1:
            raise ValueError(f"kv_offload_memory must be positive, got {self.kv_offload_memory!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
