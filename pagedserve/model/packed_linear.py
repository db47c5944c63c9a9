"""Linear layers whose weights oneDNN packs once, at load, into its blocked layout (CPU only).

torch's CPU linear hands each call a row-major weight that the GEMM repacks into cache-sized panels every
time; for the decode-shaped products of a serving step (tens of rows against weights of hundreds of
thousands of elements) that repacking is a large share of the work. oneDNN's prepacked path does it once.
Measured on this project's 2-core machines (fp32, SmolLM2-135M shapes, docs/PERFORMANCE.md): 15-50%
faster at 16-64 rows, 1.5-2x for the LM head at up to 64 rows, the same from a few hundred rows on.

These are torch's own (underscored) mkldnn operators, the ones Inductor uses for frozen CPU linears; a
torch build or CPU without them (bf16 needs AVX512-BF16/AMX-class support) keeps nn.Linear: `pack_linears`
packs only what packing_supported() says works, with the same results up to float summation order.
"""
from __future__ import annotations

import torch
from torch import nn

# The oneDNN reorder picks its blocking for this many rows; every row count still works.
BATCH_HINT = 64


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch build and CPU can pack and run a linear of this dtype."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.zeros(16, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 16, dtype=dtype), packed, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W packed by oneDNN. x: [T, in_features] -> [T, out_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Replace every nn.Linear of the model with a PackedLinear, where packing is supported; a model whose
    LM head is tied to the embedding (lm_head None) gets a packed copy of it as its lm_head. Returns how
    many linears were packed."""
    if not packing_supported(dtype, device):
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear.weight, linear.bias))
    if getattr(model, "lm_head", False) is None:  # tied: the logits use a packed copy of the embedding
        model.lm_head = PackedLinear(model.embed_tokens.weight, None)
        return len(targets) + 1
    return len(targets)
