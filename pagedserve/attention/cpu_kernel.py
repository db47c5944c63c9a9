"""Fused CPU decode attention: a small C kernel (csrc/paged_decode.c) built at first use, called via ctypes.

The torch decode path gathers every sequence's K/V through its block table into a padded copy and
then runs a masked SDPA; the kernel reads the paged cache in place instead. It is compiled once per
machine with the system C compiler into a cache folder (no torch headers, no ninja) and loaded with
ctypes, which releases the GIL during the call. Without a compiler, or when the build fails, one
warning is logged and callers keep the torch path.

Environment:
  PAGEDSERVE_ATTENTION_KERNEL=torch  never use the kernel (compare, debug)
  CC                                 the compiler (default `cc`)
  XDG_CACHE_HOME                     the cache root (default ~/.cache); .so files go to pagedserve/kernels/
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.c"
CFLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11"]
LIBS = ["-lpthread"]
ENV_SWITCH = "PAGEDSERVE_ATTENTION_KERNEL"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class DecodeArgs(ctypes.Structure):
    """Mirror of DecodeArgs in paged_decode.c (same field order and types)."""
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


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pagedserve" / "kernels"


def _machine_key() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the architecture name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(cc: list[str], out_dir: Path) -> Path:
    """Compile SOURCE into out_dir (once: the name hashes source, command and machine). Raises on failure."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(cc + CFLAGS + LIBS).encode(), _machine_key().encode()]))
    so = out_dir / f"paged_decode-{key.hexdigest()[:16]}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=so.stem + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([*cc, *CFLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} exited with {res.returncode}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, so)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None (after one warning) when it cannot be built."""
    try:
        lib = ctypes.CDLL(str(_build(compiler(), cache_dir())))
    except Exception as e:  # no compiler, build error, unwritable cache, bad .so: the torch path still works
        log.warning("fused CPU decode attention unavailable, using the torch path: %s", e)
        return None
    lib.paged_decode.argtypes = [ctypes.POINTER(DecodeArgs), ctypes.c_int]
    lib.paged_decode.restype = ctypes.c_int
    return lib


def enabled() -> bool:
    """False when PAGEDSERVE_ATTENTION_KERNEL=torch asks for the torch path."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() != "torch"


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention can take these inputs (and the kernel is enabled and builds)."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in _DTYPES
            and k_cache.dtype in _DTYPES and enabled() and load_library() is not None)


def decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     num_threads: int | None = None) -> None:
    """Decode attention straight from the paged cache into out. Check supports(q, k_cache) first.

    out, q: [S, Hq, D] (any strides with a contiguous last dim; out has q's dtype);
    caches: [N, block_size, Hkv, D]; block_tables: [S, >= max blocks] int64; seq_lens: [S] int64.
    """
    s, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1 and v_cache.dtype == k_cache.dtype
    if q.stride(2) != 1:
        q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # no-ops for engine caches
    block_tables = block_tables.to(torch.int64)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.to(torch.int64).contiguous()
    args = DecodeArgs(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1), s, hq, hkv, d, bs, scale,
        _DTYPES[q.dtype], _DTYPES[k_cache.dtype])
    rc = load_library().paged_decode(ctypes.byref(args), num_threads or torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged_decode: scratch allocation failed")
