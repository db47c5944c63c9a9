"""The `cpu` attention backend: decodes through the fused C kernel (cpu_kernel.py), which reads K/V in place
through the block tables; prefill chunks as the `torch` backend does."""
from __future__ import annotations

import torch

from pagedserve.attention import cpu_kernel
from pagedserve.attention.torch_backend import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"

    @classmethod
    def unsupported(cls, device, dtype, head_size, block_size):
        if torch.device(device).type != "cpu":
            return f"it runs on the CPU, not {device}"
        if dtype not in cpu_kernel.DTYPES:
            return f"it supports float32 and bfloat16, not {dtype}"
        if not cpu_kernel.available():
            return "its C kernel did not build (see the warning above)"
        return None

    def decode(self, out, q, k_cache, v_cache, meta, scale):
        nd = meta.num_decodes
        cpu_kernel.decode_attention(out, q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale)
