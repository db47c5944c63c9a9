"""Fused CPU decode attention: a small C kernel (csrc/paged_decode.c), built at first use, registered as
the torch operator `torch.ops.pagedserve.paged_decode`.

The torch decode path gathers every sequence's K/V through its block table into a padded copy, then
runs a masked SDPA; the kernel reads the paged cache in place. It is compiled once per machine with
the system C compiler (no torch headers, no ninja: about a second) into a cache folder and loaded with
ctypes, which releases the GIL during the call. It is built with OpenMP against the libgomp torch has
already loaded, so its threads are torch's own team. The operator registration (torch.library)
makes it visible to torch.profiler and opaque to torch.compile. Without a compiler, or when the build
fails, one warning is logged and `available()` answers False; the `cpu` attention backend then cannot
be chosen, and `auto` falls back to `torch`.

Environment (build time only, never read on the hot path):
  CC              the C compiler command (default `cc`)
  XDG_CACHE_HOME  cache root (default ~/.cache); builds go to pagedserve/kernels/ in it
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
# No -ffast-math: it would let the compiler reorder float sums and break the float32 accuracy bound.
CFLAGS = ["-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fopenmp"]
LIBS: list[str] = []
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # the C side's *_bf16 flags


class _OneThread:
    """When the kernel must run on one thread: in a forked child (libgomp's thread team does not survive
    fork(): a child entering a parallel region after its parent did waits forever for threads that do not
    exist), or when the kernel did not get torch's own OpenMP runtime (two runtimes fight over the cores)."""
    forced = False


os.register_at_fork(after_in_child=lambda: setattr(_OneThread, "forced", True))


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return set()


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


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


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


def build(cc: list[str], out_dir: Path) -> Path:
    """Compile SOURCE into out_dir unless already there; returns the .so path. Raises on failure.

    The file name hashes the source, the command and the machine, so each is built once; the
    compiler writes a temporary name that is renamed into place, so a concurrent process never
    loads a half-written file.
    """
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc + CFLAGS + LIBS).encode(),
                                     _machine_key().encode()]))
    so = out_dir / f"paged_decode-{key.hexdigest()[:16]}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=so.stem + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([*cc, *CFLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True,
                             timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cc)}` exited with {res.returncode}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None, after one warning, when it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build(compiler(), cache_dir())))
    except Exception as e:  # noqa: BLE001  no compiler, build error, unwritable cache, bad .so: torch still works
        log.warning("fused CPU decode attention unavailable, decode attention uses the torch path: %s", e)
        return None
    lib.paged_decode.argtypes = [ctypes.POINTER(DecodeArgs), ctypes.c_int]
    lib.paged_decode.restype = ctypes.c_int
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:  # this torch build's libgomp has another name: ours loaded a second runtime
        log.warning("the decode kernel loaded a second OpenMP runtime beside torch's (%s); it runs on one "
                    "thread", ", ".join(sorted(runtimes)))
        _OneThread.forced = True
    return lib


def available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    return load_library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these inputs: CPU tensors of float32/bfloat16, and the kernel built."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in _DTYPE_CODES
            and k_cache.dtype in _DTYPE_CODES and available())


def _paged_decode(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_threads: int) -> None:
    """The kernel behind torch.ops.pagedserve.paged_decode; see decode_attention for the arguments."""
    args = DecodeArgs(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1), q.shape[0], q.shape[1], k_cache.shape[2], q.shape[2],
        k_cache.shape[1], scale, _DTYPE_CODES[q.dtype], _DTYPE_CODES[k_cache.dtype])
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
    threads = 1 if _OneThread.forced else (num_threads or torch.get_num_threads())
    torch.ops.pagedserve.paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale, threads)
