"""The LLaMA family (LLaMA, Mistral, Qwen2, SmolLM) over a flat, unpadded token batch.

The forward sees tokens, positions, the paged KV caches and AttentionMetadata, never a
request. Checkpoint tensors arrive under Hugging Face names; `load_weights` fuses q/k/v
and gate/up into single matmuls (one GEMM instead of three, and of two) at load time.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention import AttentionMetadata, paged_attention
from pagedserve.distributed.parallel import TPGroup
from pagedserve.model import cpu_ops
from pagedserve.model.config import ModelConfig
from pagedserve.model.ggml_linear import GGMLEmbedding, GGMLLinear, GGMLWeight, cat_rows, quantized_module

KVCache = tuple[torch.Tensor, torch.Tensor]  # k_cache, v_cache: [num_blocks, block_size, Hkv, D]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies [D/2] in float32, with the config's scaling applied
    (computed as transformers does, so float32 results match bit for bit)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
        inv = torch.where(medium, smoothed, scaled)
    if cfg.rope_freq_factors is not None:
        inv = inv / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32, device="cpu")
    return inv


def rope_table(cfg: ModelConfig) -> torch.Tensor:
    """[max_position_embeddings, D]: cos of every position's angles in the first half, sin in the second."""
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device="cpu")
    freqs = pos[:, None] * rope_inv_freq(cfg)[None, :]  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, H] -> normed [T, H]; with residual, residual += x (in place) and the sum is normed."""
        return cpu_ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp  # tensor parallel: this rank's heads; o_proj's partial products summed over the ranks
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        if tp is not None:
            self.num_heads, self.num_kv_heads = tp.plan.num_q_heads, tp.plan.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_cos_sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        # Rotate q and k together, in place in the fresh qkv buffer: no copies.
        qk = qkv[:, :self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        cpu_ops.apply_rotary_(qk, positions, rope_cos_sin)
        q = qk[:, :self.num_heads]                                              # [T, Hq, D]
        k = qk[:, self.num_heads:]                                              # [T, Hkv, D]
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, Hq, D]
        out = self.o_proj(o.reshape(t, self.q_size))  # [T, H]
        return out if self.tp is None else self.tp.all_reduce_(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp
        self.intermediate_size = cfg.intermediate_size
        if tp is not None:
            self.intermediate_size = tp.plan.intermediate[1] - tp.plan.intermediate[0]
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(cpu_ops.silu_and_mul(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, H]
        return out if self.tp is None else self.tp.all_reduce_(out)


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding: ids outside its share give zeros, and the sum over the ranks
    is every id's row."""

    def __init__(self, num_embeddings: int, dim: int, tp: TPGroup) -> None:
        super().__init__(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))
        self.tp, self.first = tp, tp.plan.vocab[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce_(x.masked_fill_(outside[:, None], 0.0))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rope_cos_sin: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H], the previous layer's output (the embeddings at layer 0, residual None); residual:
        the stream before it, owned by the model's forward, so the adds happen in place in the norms.
        Returns this layer's output and the stream it is to be added to."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope_cos_sin, kv_cache, meta)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Build it on the meta device and fill it with `load_weights` (the loader does both)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp  # tensor parallel (distributed/parallel.py): this rank's slices; None: the whole model
        vocab = cfg.vocab_size if tp is None else tp.plan.vocab[1] - tp.plan.vocab[0]
        # Given its weight, Embedding skips random init (whose meta-device kernel imports torch._dynamo: ~3 s).
        self.embed_tokens = (nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
                             if tp is None else VocabParallelEmbedding(vocab, cfg.hidden_size, tp))
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab, bias=False)
        # Computed once in float32, then cast with the model (`.to(dtype)`), as the reference casts cos/sin.
        self.register_buffer("rope_cos_sin", rope_table(cfg), persistent=False)  # [P, D]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final-normed hidden states [T, H]."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} (k_cache, v_cache) pairs, got {len(kv_caches)}")
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.rope_cos_sin, kv_cache, meta)
        return self.norm(x, residual)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [n, H] -> logits [n, V] in float32. Tensor parallel: on rank 0, gathered from every rank's
        share of the vocabulary; None on the others."""
        if self.lm_head is not None:  # untied, or the tied embedding packed (packed_linear.py) or quantized
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.embed_tokens.weight)
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits)
        return None if logits is None else logits.float()

    def load_weights(self, weights: Iterable[tuple[str, "torch.Tensor | GGMLWeight"]]) -> None:
        """Take tensors under Hugging Face names (already in the run dtype and device), fuse
        q/k/v and gate/up, and install them. Raises on unknown, missing or misshapen tensors.
        A GGMLWeight (a GGUF weight kept quantized) replaces its linear or embedding with the
        quantized module; a tied LM head then reads the quantized embedding too."""
        state = fuse_hf_weights(self.config, weights)
        for name in [n for n, t in state.items() if isinstance(t, GGMLWeight)]:
            module_name = name.removesuffix(".weight")
            if module_name not in dict(self.named_modules()):
                raise ValueError(f"checkpoint does not fit {self.config.architecture}: unexpected {name}")
            self.set_submodule(module_name, quantized_module(self.get_submodule(module_name), state.pop(name)))
        if self.lm_head is None and isinstance(self.embed_tokens, GGMLEmbedding):
            self.lm_head = GGMLLinear(self.embed_tokens.weight)
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            raise ValueError(f"checkpoint does not fit {self.config.architecture}: "
                             f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected {unknown[:8]}{'...' if len(unknown) > 8 else ''}")
        if self.tp is not None and self.tp.rank != 0:  # a row-parallel bias is added once, by rank 0's share
            for name in state:
                if name.endswith(("o_proj.bias", "down_proj.bias")):
                    state[name] = torch.zeros_like(state[name])
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[name].shape)}")
        self.load_state_dict(state, strict=True, assign=True)


# HF name inside a layer -> (our fused parameter, its slot in the fusion order)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_FUSED_PARTS = {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}


def fuse_hf_weights(cfg: ModelConfig, weights: Iterable[tuple[str, "torch.Tensor | GGMLWeight"]]
                    ) -> dict[str, "torch.Tensor | GGMLWeight"]:
    """HF checkpoint names -> our parameter names, concatenating the fused projections."""
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older checkpoints saved; we compute it
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the copy anyway
        name = name.removeprefix("model.")
        fields = name.split(".")
        if fields[0] == "layers" and len(fields) == 5 and ".".join(fields[2:4]) in _FUSED:
            target, slot = _FUSED[".".join(fields[2:4])]
            key = f"layers.{fields[1]}.{target}.{fields[4]}"
            parts.setdefault(key, [None] * _FUSED_PARTS[target])[slot] = tensor
            if all(p is not None for p in parts[key]):
                state[key] = cat_rows(parts.pop(key))
        else:
            state[name] = tensor
    if parts:
        raise ValueError(f"checkpoint lacks parts of the fused projections {sorted(parts)[:8]}")
    return state
