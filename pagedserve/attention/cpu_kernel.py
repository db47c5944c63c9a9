"""Fused CPU decode attention: a small C kernel (csrc/paged_decode.c), built at first use, registered as
the torch operator `torch.ops.pagedserve.paged_decode`.

The torch decode path gathers every sequence's K/V through its block table into a padded copy, then
runs a masked SDPA; the kernel reads the paged cache in place. pagedserve/native.py builds it once per
machine and runs it on torch's own OpenMP team. The operator registration (torch.library)
makes it visible to torch.profiler and opaque to torch.compile. Without a compiler, or when the build
fails, one warning is logged and `available()` answers False; the `cpu` attention backend then cannot
be chosen, and `auto` falls back to `torch`.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from pagedserve import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the C side's *_bf16 flags
DTYPES = tuple(_DTYPE_CODES)  # what the kernel reads and writes


class DecodeArgs(ctypes.Structure):
    """Mirror of DecodeArgs in paged_decode.c (same field order and types; strides in elements)."""
    _fields_ = [
        ("q", ctypes.c_void_p), ("q_stride_s", ctypes.c_int64), ("q_stride_h", ctypes.c_int64),
        ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
        ("block_tables", ctypes.c_void_p), ("block_table_stride", ctypes.c_int64),
        ("seq_lens", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("out_stride_s", ctypes.c_int64), ("out_stride_h", ctypes.c_int64),
        ("num_seqs", ctypes.c_int32), ("num_q_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("block_size", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("q_bf16", ctypes.c_int32), ("cache_bf16", ctypes.c_int32),
    ]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None, after one warning, when it cannot be built."""
    lib = native.try_load(SOURCE, log, "fused CPU decode attention unavailable, decode attention uses the torch path")
    if lib is None:
        return None
    lib.paged_decode.argtypes = [ctypes.POINTER(DecodeArgs), ctypes.c_int]
    lib.paged_decode.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    return load_library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these inputs: CPU tensors of float32/bfloat16, and the kernel built."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in _DTYPE_CODES
            and k_cache.dtype in _DTYPE_CODES and available())


def decode_args(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> DecodeArgs:
    """The kernel's argument struct (pointers into these tensors, which must outlive it)."""
    return DecodeArgs(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1), q.shape[0], q.shape[1], k_cache.shape[2], q.shape[2],
        k_cache.shape[1], scale, _DTYPE_CODES[q.dtype], _DTYPE_CODES[k_cache.dtype])


def _paged_decode(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_threads: int) -> None:
    """The kernel behind torch.ops.pagedserve.paged_decode; see decode_attention for the arguments."""
    args = decode_args(out, q, k_cache, v_cache, block_tables, seq_lens, scale)
    if load_library().paged_decode(ctypes.byref(args), num_threads) != 0:
        raise MemoryError("paged_decode: scratch allocation failed")


# Registered with torch.library's low-level API rather than the custom_op decorator: the decorator's
# Python wrapper costs about 50 us a call (measured), 1.5 ms a step over 30 layers; this one about 10 us.
_LIBRARY = torch.library.Library("pagedserve", "DEF")
_LIBRARY.define("paged_decode(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
                "Tensor seq_lens, float scale, int num_threads) -> ()")
_LIBRARY.impl("paged_decode", _paged_decode, "CPU")


@torch.library.register_fake("pagedserve::paged_decode")
def _(out, q, k_cache, v_cache, block_tables, seq_lens, scale, num_threads) -> None:
    return None


def decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_threads: int | None = None) -> None:
    """One query token per sequence, attended straight from the paged cache, written into out.

    out, q: [S, Hq, D], any strides with a contiguous last dim (q may be a view into a fused QKV
    buffer); out has q's dtype. Caches: [N, block_size, Hkv, D], same dtype. block_tables: [S, >=
    ceil(max seq_len / block_size)]; seq_lens: [S]. num_threads: default torch.get_num_threads().
    Check supports(q, k_cache) first.
    """
    _, hq, _ = q.shape
    hkv = k_cache.shape[2]
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError("out must match q's shape and dtype and have a contiguous last dim")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or hq % hkv:
        raise ValueError("caches must match and Hq must be a multiple of Hkv")
    if q.stride(2) != 1:
        q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # no-ops for engine caches
    block_tables = block_tables.to(torch.int64)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    threads = native.thread_count(num_threads)
    torch.ops.pagedserve.paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale, threads)
