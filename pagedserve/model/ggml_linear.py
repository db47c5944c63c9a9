"""A GGUF file's block-quantized weights kept quantized in memory (engine option quantization="gguf").

By default a GGUF model is dequantized at load into the run dtype: exact, but decode then reads 32 bits
a weight. With quantization="gguf", the linear layers and the token embedding of the types below keep
the file's bytes (Q4_1: 5 bits a weight) and run through our C kernel (csrc/ggml_linear.c), which
dequantizes inside the matrix product as llama.cpp does, inputs rounded to int8 per 32-value block.
Other types (the K-quants, say) are dequantized at load as before. The kernel runs as the torch
operators `torch.ops.pagedserve.ggml_linear` and `ggml_dequant_rows`, on torch's OpenMP team.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pagedserve import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "ggml_linear.c"
# ggml type id -> (name, bytes of a 32-weight block's header: fp16 d (and m), bytes of its quants)
GGML_BLOCK_TYPES = {2: ("Q4_0", 2, 16), 3: ("Q4_1", 4, 16), 8: ("Q8_0", 2, 32)}
QK = 32


@dataclass
class GGMLWeight:
    """A [out_features, in_features] weight in the kernel's layout (`from_file`): each row holds its
    in_features / 32 blocks' quants, then their fp16 d's, then (Q4_1) their fp16 m's."""
    data: torch.Tensor  # uint8 [out_features, row bytes]
    ggml_type: int
    in_features: int

    @classmethod
    def from_file(cls, raw: torch.Tensor, ggml_type: int, in_features: int) -> "GGMLWeight":
        """From the file's bytes, uint8 [out_features, row bytes] of blocks (header, quants): the same
        bytes regrouped within each row."""
        _, header, quants = GGML_BLOCK_TYPES[ggml_type]
        blocks = raw.reshape(raw.shape[0], in_features // QK, header + quants)
        parts = [blocks[..., header:], blocks[..., 0:2]] + ([blocks[..., 2:4]] if header == 4 else [])
        return cls(torch.cat([p.reshape(raw.shape[0], -1) for p in parts], dim=1), ggml_type, in_features)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    def dequantize(self) -> torch.Tensor:
        """float32 [out_features, in_features]."""
        return dequantize_rows(self, None)


def cat_rows(parts: list) -> "GGMLWeight | torch.Tensor":
    """Stack weights along their rows (fusing q/k/v or gate/up): quantized when all parts are quantized
    the same way, else in the float parts' dtype."""
    if all(isinstance(p, GGMLWeight) for p in parts) and len({(p.ggml_type, p.in_features) for p in parts}) == 1:
        return GGMLWeight(torch.cat([p.data for p in parts]), parts[0].ggml_type, parts[0].in_features)
    if not any(isinstance(p, GGMLWeight) for p in parts):
        return torch.cat(parts)
    dtype = next((p.dtype for p in parts if isinstance(p, torch.Tensor)), torch.float32)
    return torch.cat([p.dequantize().to(dtype) if isinstance(p, GGMLWeight) else p for p in parts])


class LinearArgs(ctypes.Structure):
    """Mirror of LinearArgs in ggml_linear.c (same field order and types)."""
    _fields_ = [
        ("w", ctypes.c_void_p), ("row_bytes", ctypes.c_int64), ("type", ctypes.c_int32),
        ("n", ctypes.c_int64), ("k", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("x_stride", ctypes.c_int64), ("m", ctypes.c_int64),
        ("y", ctypes.c_void_p), ("y_stride", ctypes.c_int64), ("bias", ctypes.c_void_p),
    ]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on the first call; None, after one warning, when it cannot be built."""
    lib = native.try_load(SOURCE, log, "the GGUF quantized-weight kernel cannot be built")
    if lib is None:
        return None
    lib.ggml_linear.argtypes = [ctypes.POINTER(LinearArgs), ctypes.c_int]
    lib.ggml_linear.restype = ctypes.c_int
    lib.ggml_dequant_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.ggml_dequant_rows.restype = ctypes.c_int
    return lib


def available() -> bool:
    return load_library() is not None


def linear_args(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ggml_type: int,
                bias: torch.Tensor | None) -> LinearArgs:
    """The kernel's argument struct (pointers into these tensors, which must outlive it)."""
    return LinearArgs(weight.data_ptr(), weight.stride(0), ggml_type, out.shape[1], x.shape[1],
                      x.data_ptr(), x.stride(0), x.shape[0], out.data_ptr(), out.stride(0),
                      None if bias is None else bias.data_ptr())


def _ggml_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ggml_type: int, bias: torch.Tensor | None,
                 num_threads: int) -> None:
    rc = load_library().ggml_linear(ctypes.byref(linear_args(out, x, weight, ggml_type, bias)), num_threads)
    if rc == 2:
        raise MemoryError("ggml_linear: scratch allocation failed")
    if rc != 0:
        raise ValueError(f"ggml_linear: unsupported ggml type {ggml_type} or in_features {x.shape[1]}")


def _ggml_dequant_rows(out: torch.Tensor, weight: torch.Tensor, ggml_type: int, rows: torch.Tensor | None,
                       num_threads: int) -> None:
    rc = load_library().ggml_dequant_rows(weight.data_ptr(), weight.stride(0), ggml_type, out.shape[1],
                                          None if rows is None else rows.data_ptr(), out.shape[0], out.data_ptr(),
                                          num_threads)
    if rc != 0:
        raise ValueError(f"ggml_dequant_rows: unsupported ggml type {ggml_type} or row length {out.shape[1]}")


# A fragment: cpu_kernel.py defines the pagedserve namespace. Low-level registration for the same reason
# as there (the custom_op wrapper costs ~50 us a call).
_LIBRARY = torch.library.Library("pagedserve", "FRAGMENT")
_LIBRARY.define("ggml_linear(Tensor(a!) out, Tensor x, Tensor weight, int ggml_type, Tensor? bias, "
                "int num_threads) -> ()")
_LIBRARY.impl("ggml_linear", _ggml_linear, "CPU")
_LIBRARY.define("ggml_dequant_rows(Tensor(a!) out, Tensor weight, int ggml_type, Tensor? rows, "
                "int num_threads) -> ()")
_LIBRARY.impl("ggml_dequant_rows", _ggml_dequant_rows, "CPU")


@torch.library.register_fake("pagedserve::ggml_linear")
def _(out, x, weight, ggml_type, bias, num_threads) -> None:
    return None


@torch.library.register_fake("pagedserve::ggml_dequant_rows")
def _(out, weight, ggml_type, rows, num_threads) -> None:
    return None


def ggml_linear(x: torch.Tensor, weight: GGMLWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in_features] (float32, any dtype is computed in float32) -> [T, out_features] in x's dtype."""
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"expected x of shape [T, {weight.in_features}], got {tuple(x.shape)}")
    return _linear(x, weight.data, weight.ggml_type, weight.out_features,
                   None if bias is None else bias.float().contiguous())


def _linear(x: torch.Tensor, data: torch.Tensor, ggml_type: int, out_features: int,
            bias: torch.Tensor | None) -> torch.Tensor:
    """The hot path of GGMLLinear: a few microseconds a call matter in a decode step of ~120 calls."""
    xf = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    torch.ops.pagedserve.ggml_linear(out, xf, data, ggml_type, bias, native.thread_count())
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def check_row_ids(ids: torch.Tensor, num_rows: int) -> None:
    """Raise IndexError unless every id lies in [0, num_rows): the kernels index with them unchecked."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= num_rows:
            raise IndexError(f"token id out of range [0, {num_rows})")


def dequantize_rows(weight: GGMLWeight, rows: torch.Tensor | None) -> torch.Tensor:
    """float32 rows of the weight: rows [n] int64 ids, or None for all of them."""
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    out = torch.empty(weight.out_features if rows is None else rows.numel(), weight.in_features)
    torch.ops.pagedserve.ggml_dequant_rows(out, weight.data, weight.ggml_type, rows, native.thread_count())
    return out


class GGMLLinear(nn.Module):
    """nn.Linear over a quantized weight: [T, in_features] -> [T, out_features]."""

    def __init__(self, weight: GGMLWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ggml_type, self.in_features, self.out_features = weight.ggml_type, weight.in_features, weight.out_features
        # Not in the state dict: the checkpoint's name for it is the float `weight` it replaces.
        self.register_buffer("qweight", weight.data, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def weight(self) -> GGMLWeight:
        return GGMLWeight(self.qweight, self.ggml_type, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:  # the kernel reads in_features a row, unchecked
            raise ValueError(f"expected x of shape [T, {self.in_features}], got {tuple(x.shape)}")
        return _linear(x, self.qweight, self.ggml_type, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={GGML_BLOCK_TYPES[self.ggml_type][0]}, bias={self.bias is not None}")


class GGMLEmbedding(nn.Module):
    """nn.Embedding over a quantized table: token ids [T] -> float32 rows [T, dim]."""

    def __init__(self, weight: GGMLWeight) -> None:
        super().__init__()
        self.ggml_type, self.num_embeddings, self.embedding_dim = weight.ggml_type, weight.out_features, weight.in_features
        self.register_buffer("qweight", weight.data, persistent=False)

    @property
    def weight(self) -> GGMLWeight:
        return GGMLWeight(self.qweight, self.ggml_type, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_row_ids(ids, self.num_embeddings)
        return dequantize_rows(self.weight, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={GGML_BLOCK_TYPES[self.ggml_type][0]}"


def quantized_module(module: nn.Module, weight: GGMLWeight) -> nn.Module:
    """The quantized stand-in for an nn.Linear or nn.Embedding whose weight is `weight`."""
    if isinstance(module, nn.Linear):
        if (module.out_features, module.in_features) != (weight.out_features, weight.in_features):
            raise ValueError(f"quantized weight [{weight.out_features}, {weight.in_features}] does not fit "
                             f"{module}")
        return GGMLLinear(weight, None if module.bias is None else torch.empty(module.out_features))
    if isinstance(module, nn.Embedding):
        if (module.num_embeddings, module.embedding_dim) != (weight.out_features, weight.in_features):
            raise ValueError(f"quantized table [{weight.out_features}, {weight.in_features}] does not fit {module}")
        return GGMLEmbedding(weight)
    raise ValueError(f"cannot keep a quantized weight for {type(module).__name__}")
