"""DecodeGraph: a small decode step of a LLaMA-family model replayed as a fixed list of kernel calls.

In a one-stream decode step of the default model kept quantized, the kernels work ~6 ms and the Python
around ~300 op calls (module calls, torch.ops dispatch into Python kernels, argument structs, OpenMP
workers that fall asleep between calls) costs ~10 ms more (docs/PERFORMANCE.md). The graph binds every
kernel call's arguments once per row count, over buffers it owns, so a step is a few copies of its
inputs and about ten bound calls a layer: ctypes calls of our C kernels, and for float32 weights
oneDNN's packed linear (its result copied into the graph's buffer). It runs the same kernels as the
eager forward on the same inputs, so its results are bitwise the eager ones (tested). Like vLLM's CUDA
graphs it serves pure-decode steps of up to `max_rows` sequences, and the engine option
`enforce_eager` turns it off.

It applies to float32 on the CPU with the `cpu` attention backend and our C libraries built, the
linears packed (packed_linear.py) or kept quantized (quantization="gguf").
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch

from pagedserve import native
from pagedserve.attention import AttentionMetadata, cpu_kernel
from pagedserve.model import cpu_ops, ggml_linear
from pagedserve.model.ggml_linear import GGMLEmbedding, GGMLLinear
from pagedserve.model.packed_linear import PackedLinear

KVCache = tuple[torch.Tensor, torch.Tensor]


def unsupported(model: torch.nn.Module, kv_caches: list[KVCache], backend_name: str) -> str | None:
    """Why the graph cannot run this model here, or None."""
    if getattr(model, "tp", None) is not None:
        return "a tensor-parallel step all-reduces between its kernels"
    if backend_name != "cpu":
        return f"it calls the cpu attention backend's kernel, not {backend_name}'s"
    if not all(k.dtype == torch.float32 and k.device.type == "cpu" for k, _ in kv_caches):
        return "it runs float32 KV caches on the CPU"
    if model.norm.weight.dtype != torch.float32:
        return "it runs float32 models"
    linears = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                     layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if not all(isinstance(m, (GGMLLinear, PackedLinear)) for m in linears):
        return "its linears must be packed by oneDNN or kept quantized"
    if not isinstance(model.embed_tokens, (GGMLEmbedding, torch.nn.Embedding)):
        return "its embedding must be an nn.Embedding or kept quantized"
    if cpu_kernel.load_library() is None or cpu_ops.load_library() is None:
        return "a C library did not build"
    return None


class DecodeGraph:
    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], max_rows: int = 8) -> None:
        cfg = model.config
        self.model, self.kv_caches, self.max_rows = model, kv_caches, max_rows
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        r, f32, i64 = max_rows, torch.float32, torch.int64
        self.ids, self.positions, self.slots, self.seq_lens = (torch.zeros(r, dtype=i64) for _ in range(4))
        self.tables = torch.zeros(r, 1, dtype=i64)
        # The residual stream lives in `stream` (the embeddings, then every layer's sums, in place).
        self.stream, self.h, self.o, self.mlp_out, self.out = (torch.zeros(r, self.hidden, dtype=f32) for _ in range(5))
        self.qkv = torch.zeros(r, self.q_size + 2 * self.kv_size, dtype=f32)
        self.attn = torch.zeros(r, self.q_size, dtype=f32)
        self.gate_up = torch.zeros(r, 2 * self.inter, dtype=f32)
        self.act = torch.zeros(r, self.inter, dtype=f32)
        # rows -> (the step's kernel calls, the argument structs they point at: ctypes.byref keeps none alive)
        self._graphs: dict[int, tuple[list[tuple[Callable, tuple]], list]] = {}
        self._threads = -1
        self.num_runs = 0  # steps replayed (observability and tests)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A pure-decode step (one token per sequence, at most max_rows): the final-normed hidden states
        [M, H] the model's forward would return. The tensor is the graph's own buffer, valid until the
        next run."""
        m = input_ids.shape[0]
        if meta.num_decodes != m or m > self.max_rows:
            raise ValueError(f"the graph runs pure-decode steps of at most {self.max_rows} sequences")
        ggml_linear.check_row_ids(input_ids, self.model.embed_tokens.num_embeddings)
        if max(meta.seq_lens_list) > self.model.rope_cos_sin.shape[0]:  # so are the positions
            raise IndexError(f"position beyond the model's {self.model.rope_cos_sin.shape[0]} positions")
        threads = native.thread_count()
        width = meta.block_tables.shape[1]
        if width > self.tables.shape[1] or threads != self._threads:  # pointers or threads change: rebuild
            self.tables = torch.zeros(self.max_rows, max(width, 2 * self.tables.shape[1]), dtype=torch.int64)
            self._graphs.clear()
            self._threads = threads
        self.ids[:m].copy_(input_ids)
        self.positions[:m].copy_(positions)
        self.slots[:m].copy_(meta.slot_mapping)
        self.seq_lens[:m].copy_(meta.seq_lens)
        self.tables[:m, :width].copy_(meta.block_tables)
        if m not in self._graphs:
            self._graphs[m] = self._build(m)
        for fn, args in self._graphs[m][0]:
            if rc := fn(*args):  # 0 or None: done; the kernels' other codes are scratch allocation failures
                raise MemoryError(f"{fn.__name__} failed with code {rc} (scratch memory)")
        self.num_runs += 1
        return self.out[:m]

    def _build(self, m: int) -> tuple[list[tuple[Callable, tuple]], list]:
        """The step's kernel calls for m rows, each with its arguments bound, and the structs they use."""
        gl, ops, attn = ggml_linear.load_library(), cpu_ops.load_library(), cpu_kernel.load_library()
        t, model, hd = self._threads, self.model, self.hidden
        qkv_w = self.qkv.shape[1]
        keep: list = []

        def linear(out: torch.Tensor, x: torch.Tensor, mod: torch.nn.Module) -> tuple[Callable, tuple]:
            if isinstance(mod, PackedLinear):
                return _linear_into, (out[:m], x[:m], mod.forward)
            args = ggml_linear.linear_args(out[:m], x[:m], mod.qweight, mod.ggml_type, mod.bias)
            keep.append(args)
            return gl.ggml_linear, (ctypes.byref(args), t)

        def norm(out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, mod) -> tuple[Callable, tuple]:
            return ops.rms_norm, (out.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(),
                                  mod.weight.data_ptr(), m, hd, hd, hd, hd, mod.eps, t)

        emb = model.embed_tokens
        if isinstance(emb, GGMLEmbedding):
            calls = [(gl.ggml_dequant_rows, (emb.qweight.data_ptr(), emb.qweight.stride(0), emb.ggml_type, hd,
                                             self.ids.data_ptr(), m, self.stream.data_ptr(), t))]
        else:
            calls = [(_embed_into, (self.stream[:m], emb.weight, self.ids[:m]))]
        q_view = self.qkv[:m, :self.q_size].view(m, model.config.num_attention_heads, model.config.head_dim)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(model.layers, self.kv_caches)):
            sa = layer.self_attn
            if i == 0:  # the embeddings are the stream itself; later layers add into it
                calls.append(norm(self.h, self.stream, None, layer.input_layernorm))
            else:
                calls.append(norm(self.h, self.mlp_out, self.stream, layer.input_layernorm))
            calls.append(linear(self.qkv, self.h, sa.qkv_proj))
            calls.append((ops.rotary, (self.qkv.data_ptr(), self.positions.data_ptr(), model.rope_cos_sin.data_ptr(),
                                       m, sa.num_heads + sa.num_kv_heads, sa.head_dim, qkv_w, t)))
            calls.append((ops.kv_cache_write, (k_cache.data_ptr(), v_cache.data_ptr(), self.qkv.data_ptr(),
                                               self.slots.data_ptr(), m, self.kv_size, qkv_w, self.q_size,
                                               self.q_size + self.kv_size)))
            args = cpu_kernel.decode_args(self.attn[:m].view(q_view.shape), q_view, k_cache, v_cache,
                                          self.tables[:m], self.seq_lens[:m], sa.scale)
            keep.append(args)
            calls.append((attn.paged_decode, (ctypes.byref(args), t)))
            calls.append(linear(self.o, self.attn, sa.o_proj))
            calls.append(norm(self.h, self.o, self.stream, layer.post_attention_layernorm))
            calls.append(linear(self.gate_up, self.h, layer.mlp.gate_up_proj))
            calls.append((ops.silu_and_mul, (self.act.data_ptr(), self.gate_up.data_ptr(), m, self.inter,
                                             2 * self.inter, self.inter, t)))
            calls.append(linear(self.mlp_out, self.act, layer.mlp.down_proj))
        calls.append(norm(self.out, self.mlp_out, self.stream, model.norm))
        return calls, keep


def _linear_into(out: torch.Tensor, x: torch.Tensor, forward: Callable) -> None:
    """A torch linear's forward (oneDNN's packed op has no out= form), its result copied into the graph's buffer."""
    out.copy_(forward(x))


def _embed_into(out: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> None:
    torch.index_select(weight, 0, ids, out=out)
