"""AttentionBackend: the one interface every paged-attention implementation offers the model runner.

A backend says what it supports (device, dtype, head size, block size), chooses the order of a step's
sequences its kernels want (the scheduler's order does not matter to it), and runs the per-layer op:
write the step's new K/V into the paged cache at the slot mapping, then attend every sequence through its
block table. Every backend writes all of a layer's new K/V before it attends, so a sequence may read K/V
that another sequence of the same step writes.

Backends: `torch` (plain torch, any device: the reference), `cpu` (the fused C decode kernel of
cpu_kernel.py, prefill chunks as `torch`), `triton` (Triton kernels for CUDA, triton_backend.py). `auto`
takes the fastest one that supports the run: cpu then torch on the CPU, triton then torch elsewhere.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from pagedserve.config import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from pagedserve.attention.metadata import AttentionMetadata



class AttentionBackend(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def unsupported(cls, device: torch.device, dtype: torch.dtype, head_size: int, block_size: int) -> str | None:
        """Why this backend cannot run this configuration, or None when it can."""

    def order(self, query_lens: list[int]) -> list[int]:
        """The order in which the step's sequences are laid out (indices into query_lens).

        Decodes (one query token) first, each group in the given order: both CPU backends attend the
        decode rows as one batch."""
        return sorted(range(len(query_lens)), key=lambda i: query_lens[i] != 1)

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Write k, v at meta.slot_mapping, then attend. q: [T, Hq, D]; k, v: [T, Hkv, D];
        caches: [N, block_size, Hkv, D]. Returns [T, Hq, D] in q's dtype."""


def backend_classes() -> dict[str, type[AttentionBackend]]:
    from pagedserve.attention.cpu_backend import CpuBackend
    from pagedserve.attention.torch_backend import TorchBackend
    from pagedserve.attention.triton_backend import TritonBackend
    return {"cpu": CpuBackend, "torch": TorchBackend, "triton": TritonBackend}


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype, head_size: int,
                   block_size: int) -> AttentionBackend:
    """The backend called `name` (or, for "auto", the first of cpu, torch on the CPU, of triton, torch
    elsewhere, that supports the run).

    Raises ValueError naming the reason when an explicitly chosen backend cannot run here."""
    device = torch.device(device)
    classes = backend_classes()
    if name == "auto":
        for candidate in ("cpu", "torch") if device.type == "cpu" else ("triton", "torch"):
            if classes[candidate].unsupported(device, dtype, head_size, block_size) is None:
                return classes[candidate]()
        raise ValueError(f"no attention backend supports {device} / {dtype}")  # torch supports everything
    if name not in classes:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    reason = classes[name].unsupported(device, dtype, head_size, block_size)
    if reason is not None:
        raise ValueError(f"attention_backend={name!r} cannot run here: {reason}")
    return classes[name]()
