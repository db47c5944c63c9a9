"""How many blocks the KV pool and the offload tier get.

Given outright (`num_kv_blocks`) or as bytes (`kv_cache_memory`), or on a GPU measured as vLLM does: after
the weights are loaded, a profiling forward at the largest step the scheduler may send shows what a step
needs at its peak; the pool takes what is left of `gpu_memory_utilization` x the device's memory.
Everything else in use on the device (the CUDA context, other processes) counts against that share too.

The device is read through a `MemoryProbe`, so the arithmetic and the engine's path through it run in the
tests on the CPU with a probe of their own (`memory_probe` is the seam they replace).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from pagedserve.config import EngineConfig, parse_memory

DEFAULT_KV_CACHE_MEMORY = "1GiB"  # where there is no device memory to measure (the CPU)


class MemoryProbe(Protocol):
    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device, as the driver sees them (all processes)."""

    def reset_peak(self) -> None:
        """Start a new peak of this process's tensor allocations."""

    def peak_allocated(self) -> int:
        """Bytes of tensors this process held at once, at most, since reset_peak."""

    def allocated(self) -> int:
        """Bytes of tensors this process holds now."""

    def release_cached(self) -> None:
        """Give the allocator's cached free memory back to the device."""


@dataclass(frozen=True)
class CudaMemoryProbe:
    device: torch.device

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def release_cached(self) -> None:
        torch.cuda.empty_cache()


def memory_probe(device: torch.device | str) -> MemoryProbe | None:
    """The probe of a device whose memory the engine measures; None for the CPU (a budget is given there)."""
    device = torch.device(device)
    return CudaMemoryProbe(device) if device.type == "cuda" else None


def kv_cache_bytes(free: int, total: int, peak_allocated: int, allocated: int, utilization: float) -> int:
    """Bytes the KV pool may take: utilization x total, less what the device holds now (weights, the
    context, other processes: total - free, measured with the allocator's cache released) and less the
    activations a step needs at its peak beyond what stays allocated (peak_allocated - allocated)."""
    return int(utilization * total) - (total - free) - max(0, peak_allocated - allocated)


def profile_kv_cache_bytes(probe: MemoryProbe, profile_run: Callable[[], None], utilization: float) -> int:
    """Run the profiling forward under the probe; the bytes the KV pool may take (kv_cache_bytes)."""
    probe.reset_peak()
    profile_run()
    peak = probe.peak_allocated()
    probe.release_cached()
    free, total = probe.mem_get_info()
    budget = kv_cache_bytes(free, total, peak, probe.allocated(), utilization)
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization={utilization} leaves no room for the KV cache: of {total / 2**30:.1f} GiB, "
            f"{(total - free) / 2**30:.1f} GiB are in use (weights, other processes) and a step needs "
            f"{max(0, peak - probe.allocated()) / 2**30:.2f} GiB more; raise it, or give kv_cache_memory")
    return budget


def num_blocks(config: EngineConfig, bytes_per_block: int, measured_bytes: Callable[[], int] | None
               ) -> tuple[int, int]:
    """(blocks of the pool, blocks of the offload tier, 0: none). measured_bytes: the device's measured
    budget (profile_kv_cache_bytes), used when the config gives neither num_kv_blocks nor kv_cache_memory;
    None where nothing is measured (the CPU): DEFAULT_KV_CACHE_MEMORY then."""
    def blocks_of(option: str, value: str | int) -> int:
        n = parse_memory(value) // bytes_per_block
        if n < 1:
            raise ValueError(f"{option}={value!r} holds no block of {bytes_per_block} bytes")
        return n

    if config.num_kv_blocks is not None:
        pool = config.num_kv_blocks
    elif config.kv_cache_memory is not None:
        pool = blocks_of("kv_cache_memory", config.kv_cache_memory)
    elif measured_bytes is not None:
        pool = blocks_of(f"gpu_memory_utilization={config.gpu_memory_utilization} (measured)", measured_bytes())
    else:
        pool = blocks_of("kv_cache_memory", DEFAULT_KV_CACHE_MEMORY)
    tier = blocks_of("kv_offload_memory", config.kv_offload_memory) if config.kv_offload_memory is not None else 0
    return pool, tier
