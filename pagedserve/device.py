"""Host values onto the device without a sync.

`torch.tensor(values, device="cuda")` copies from pageable memory, which waits for the GPU's queue to
drain: a step's metadata built that way would stall on the previous work. Through pinned memory the copy
is queued like a kernel, so the step's one sync is the sampled tokens coming back.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, device: torch.device | str,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """values (a list, or a CPU tensor) as a tensor on device; values that are a tensor keep their dtype."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def on_device(method):
    """Run a method of an object with a `device` on that device: CUDA's current device is per thread (the
    server steps the engine on a thread of its own), and Triton, CUDA graphs and NCCL use the current one."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        ctx = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return method(self, *args, **kwargs)
    return run
