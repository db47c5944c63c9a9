"""The `triton` attention backend: paged attention as Triton kernels (triton_kernels.py), the `auto` choice
on CUDA.

A layer is two launches: `write_kv`, then `varlen_attention` over every sequence of the step. When the
step has few decode rows with long contexts (fewer programs than the GPU has room for), the decode rows
go to the flash-decoding pair instead (`decode_split` + `merge_splits`) and `varlen_attention` takes the
rest. The host picks tile sizes and the number of splits from Python numbers it already has (the
metadata's lists, never a tensor read), so a step costs no device sync; the kernels read the lengths
from device tensors, so a CUDA graph captured for one batch size replays any batch of that size.

On the CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1` before the first import
of triton_kernels): that is how the suite checks them against the `torch` backend without a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import math

import torch

from pagedserve.attention.backend import AttentionBackend
from pagedserve.attention.metadata import AttentionMetadata

LOG2E = 1.4426950408889634
MAX_SPLITS = 32


@functools.cache
def _kernels():
    from pagedserve.attention import triton_kernels
    return triton_kernels


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (so on CPU tensors) rather than compiled."""
    import triton
    return not isinstance(_kernels().write_kv, triton.runtime.JITFunction)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, target_programs: int | None = None, split_tokens: int = 512) -> None:
        """target_programs: how many programs fill the device (default 4 per SM); split_tokens: the fewest
        context tokens worth a split of their own."""
        self.target_programs = target_programs
        self.split_tokens = split_tokens

    @classmethod
    def unsupported(cls, device, dtype, head_size, block_size):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        device = torch.device(device)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"it supports float32, bfloat16 and float16, not {dtype}"
        if head_size > 256:
            return f"head size {head_size} is over 256"
        if device.type == "cuda":
            if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
                return "bfloat16 needs a GPU of compute capability 8.0 or newer"
            return None
        if device.type == "cpu":
            return None if interpreted() else "on the CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1)"
        return f"it runs on CUDA, not {device}"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        kern = _kernels()
        _, bs, hkv, d = k_cache.shape
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the triton backend needs contiguous KV caches")
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("the triton backend needs q, k, v with a contiguous head dimension")
        T = q.shape[0]
        if T:
            row = hkv * d
            kern.write_kv[(T,)](k, v, k_cache, v_cache, meta.slot_mapping, k.stride(0), k.stride(1),
                                v.stride(0), v.stride(1), HEAD_DIM=d, ROW=row, ROW_P=_pow2(row))
        out = torch.empty_like(q)
        S, nd = meta.num_seqs, meta.num_decodes
        if S == 0:
            return out
        g = q.shape[1] // hkv
        dot_f32 = q.dtype == torch.bfloat16 and interpreted()  # the interpreter's bfloat16 dot is wrong
        common = dict(HEAD_DIM=d, HEAD_DIM_P=max(16, _pow2(d)), BLOCK_SIZE=bs, DOT_F32=dot_f32,
                      DOT_PRECISION="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32")
        splits = self.num_splits(nd, hkv, max(meta.seq_lens_list[:nd], default=0), q.device)
        first = 0
        if splits > 1:
            self._decode_split(out, q, k_cache, v_cache, meta, scale, splits, g, common)
            first = nd
        if first < S:
            max_q = max(meta.query_lens_list[first:])
            block_m = 16 if max_q * g <= 16 else 64
            block_m = max(block_m, _pow2(g))
            block_q = block_m // g
            grid = ((T - first) // block_q + S - first, hkv)  # first sequences are decodes: one token each
            kern.varlen_attention[grid](
                out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                first, S, scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                meta.block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                G=g, BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=64 if block_m == 16 else 32, **common)
        return out

    def num_splits(self, rows: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
        """How many ranges each decode row's context is cut into: enough programs to fill the device,
        each range at least split_tokens long. 1 means no flash-decoding."""
        if rows == 0:
            return 1
        target = self.target_programs
        if target is None:
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        by_occupancy = math.ceil(target / (rows * num_kv_heads))
        by_length = math.ceil(max_context / self.split_tokens)
        # A power of two: the count is a compile-time constant, so this bounds the kernel variants to six.
        return _pow2(max(1, min(by_occupancy, by_length, MAX_SPLITS)))

    def _decode_split(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, splits: int, g: int, common: dict) -> None:
        kern = _kernels()
        nd, hq = meta.num_decodes, q.shape[1]
        hkv = k_cache.shape[2]
        part_acc = torch.empty((nd, hq, splits, common["HEAD_DIM_P"]), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((nd, hq, splits, 2), dtype=torch.float32, device=q.device)
        kern.decode_split[(nd, hkv, splits)](
            part_acc, part_ml, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale * LOG2E,
            q.stride(0), q.stride(1), meta.block_tables.stride(0), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), NUM_HEADS=hq, NUM_SPLITS=splits, G=g, BLOCK_M=max(16, _pow2(g)), TILE_N=64,
            **common)
        kern.merge_splits[(nd, hq)](out, part_acc, part_ml, out.stride(0), out.stride(1), NUM_HEADS=hq,
                                    NUM_SPLITS=splits, SPLITS_P=_pow2(splits), HEAD_DIM=common["HEAD_DIM"],
                                    HEAD_DIM_P=common["HEAD_DIM_P"])
