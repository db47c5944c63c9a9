"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors -> HF-named float tensors.

The `gguf` package parses the file and dequantizes; what is ours is the mapping of llama.cpp's
names and layouts back onto the Hugging Face checkpoint that the model's `load_weights` takes.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch

from pagedserve.model.config import ModelConfig

# GGUF general.architecture -> HF architecture. Mistral GGUFs say "llama".
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: str):
    from gguf import GGUFReader
    return GGUFReader(path)


def read_metadata(reader) -> dict[str, Any]:
    """Scalar and short-list fields; the tokenizer's long lists are left to transformers."""
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(f.data) > 1:
            continue
        out[key] = f.contents()
    return out


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}; expected token_embd, output_norm, output, "
                         f"rope_freqs or blk.N.{{{', '.join(_LAYER_NAMES)}}}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def config_from_gguf(reader) -> ModelConfig:
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = get("rope.scaling.type", "none")
    scaling = None
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported: linear")
    freq_factors = None
    if ROPE_FREQS in tensor_names:
        t = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        freq_factors = tuple(float(x) for x in np.asarray(t.data, dtype=np.float32).reshape(-1))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(get("attention.head_count_kv") or heads),
        head_dim=int(get("attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        rope_scaling=scaling,
        rope_freq_factors=freq_factors,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        o_proj_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. Its converter interleaves each head's two rotary halves
    (row h*D/2 + j -> 2j + h) for its pairwise rope; we rotate halves, as HF does.
    w: [n_heads * D, ...] -> same shape."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(reader, cfg: ModelConfig, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize every tensor to float32, restore HF layout, cast to `dtype`; yields (HF name, tensor)."""
    from gguf import dequantize
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # folded into the config's rope_freq_factors
        name = hf_name(t.name)
        arr = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not arr.flags.writeable:
            arr = arr.copy()  # unquantized tensors come back as read-only views of the file map
        w = torch.from_numpy(arr)
        if cfg.model_type == "llama":
            if ".q_proj." in name:
                w = unpermute_rope_rows(w, cfg.num_attention_heads)
            elif ".k_proj." in name:
                w = unpermute_rope_rows(w, cfg.num_key_value_heads)
        yield name, w.to(device=device, dtype=dtype)
