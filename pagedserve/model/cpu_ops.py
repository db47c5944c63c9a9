"""The decoder layer's small ops: residual add + RMSNorm, SiLU-and-mul, rotary embedding.

On the CPU in float32 each runs as one fused C operator (csrc/cpu_ops.c: `torch.ops.pagedserve.rms_norm`,
`silu_and_mul`, `rotary`); anywhere else (bf16, CUDA) or when the kernel cannot be built, as the
torch ops they replace. Both give the reference's results to float32 rounding. In a one-stream decode
step, eager RMSNorm alone is six dispatched ops a call, 60 calls a step (see docs/PERFORMANCE.md).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pagedserve import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_ops.c"
# Each product and sum rounded on its own, as the torch reference does (GCC would otherwise fuse them
# into FMAs in GNU C mode).
EXTRA_FLAGS = ("-ffp-contract=off",)
_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled ops, built on the first call; None, after one warning, when they cannot be built."""
    lib = native.try_load(SOURCE, log, "fused CPU layer ops unavailable, the torch ops run instead", EXTRA_FLAGS)
    if lib is None:
        return None
    lib.rms_norm.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _F, _INT]
    lib.silu_and_mul.argtypes = [_P, _P, _I64, _I64, _I64, _I64, _INT]
    lib.rotary.argtypes = [_P, _P, _P, _I64, _I64, _I64, _I64, _INT]
    lib.kv_cache_write.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64]
    for fn in (lib.rms_norm, lib.silu_and_mul, lib.rotary, lib.kv_cache_write):
        fn.restype = None
    return lib


def _fused(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and load_library() is not None


def _rms_norm_impl(out, x, residual, weight, eps, num_threads) -> None:
    load_library().rms_norm(out.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(),
                            weight.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.stride(0),
                            0 if residual is None else residual.stride(0), eps, num_threads)


def _silu_and_mul_impl(out, gate_up, num_threads) -> None:
    load_library().silu_and_mul(out.data_ptr(), gate_up.data_ptr(), out.shape[0], out.shape[1], gate_up.stride(0),
                                out.stride(0), num_threads)


def _rotary_impl(x, positions, cos_sin, num_threads) -> None:
    load_library().rotary(x.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(), x.shape[0], x.shape[1],
                          x.shape[2], x.stride(0), num_threads)


# A fragment: cpu_kernel.py defines the pagedserve namespace; low-level registration as there (~10 us less
# a call than the custom_op decorator).
_LIBRARY = torch.library.Library("pagedserve", "FRAGMENT")
_LIBRARY.define("rms_norm(Tensor(a!) out, Tensor x, Tensor(b!)? residual, Tensor weight, float eps, "
                "int num_threads) -> ()")
_LIBRARY.impl("rms_norm", _rms_norm_impl, "CPU")
_LIBRARY.define("silu_and_mul(Tensor(a!) out, Tensor gate_up, int num_threads) -> ()")
_LIBRARY.impl("silu_and_mul", _silu_and_mul_impl, "CPU")
_LIBRARY.define("rotary(Tensor(a!) x, Tensor positions, Tensor cos_sin, int num_threads) -> ()")
_LIBRARY.impl("rotary", _rotary_impl, "CPU")
for _name in ("rms_norm", "silu_and_mul", "rotary"):
    torch.library.register_fake(f"pagedserve::{_name}")(lambda *args: None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H] -> RMSNorm(x) * weight, a new tensor. With residual: residual += x in place first, and
    the sum is normalised (the pre-norm residual stream of a decoder layer)."""
    if (_fused(x) and x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == torch.float32 and weight.is_contiguous()
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                      and residual.stride(-1) == 1))):
        out = torch.empty(x.shape, dtype=x.dtype)
        torch.ops.pagedserve.rms_norm(out, x, residual, weight, eps, native.thread_count())
        return out
    if residual is not None:
        x = residual.add_(x)
    # Normalised in float32 whatever the run dtype, rounded, then scaled: as the reference does.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] -> silu(gate) * up, [T, I] (SwiGLU)."""
    half = gate_up.shape[-1] // 2
    if _fused(gate_up) and gate_up.dim() == 2 and gate_up.stride(-1) == 1:
        out = torch.empty(gate_up.shape[0], half, dtype=gate_up.dtype)
        torch.ops.pagedserve.silu_and_mul(out, gate_up, native.thread_count())
        return out
    return F.silu(gate_up[:, :half]).mul_(gate_up[:, half:])


def apply_rotary_(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate x in place, halves layout (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).

    x: [T, heads, D] (heads contiguous; tokens may be any stride apart, e.g. a view into a fused qkv
    buffer); positions: [T] int64; cos_sin: [P, D], cos of each position's D/2 angles then their sin.
    """
    if (_fused(x) and x.dim() == 3 and cos_sin.dtype == torch.float32 and cos_sin.is_contiguous()
            and x.stride(2) == 1 and x.stride(1) == x.shape[2]):
        # The C op reads its table unchecked (torch's indexing below checks for itself).
        if positions.numel() and int(positions.max()) >= cos_sin.shape[0]:
            raise IndexError(f"position {int(positions.max())} is beyond the model's {cos_sin.shape[0]} positions")
        torch.ops.pagedserve.rotary(x, positions.to(torch.int64).contiguous(), cos_sin, native.thread_count())
        return
    cs = cos_sin[positions].unsqueeze(1)  # [T, 1, D]
    half = x.shape[-1] // 2
    cos, sin = cs[..., :half], cs[..., half:]
    x1, x2 = x[..., :half], x[..., half:]
    x2_sin = x2 * sin
    x2.mul_(cos).addcmul_(x1, sin)
    x1.mul_(cos).sub_(x2_sin)
