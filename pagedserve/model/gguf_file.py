"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors -> HF-named float tensors.

Parsing and dequantizing are libraries' work: transformers' GGUF reader where this transformers
has it (reads only what it needs, dequantizes with torch: well under a second for the default
model), else the `gguf` package (parses every vocabulary string up front: a few seconds). What is
ours is mapping llama.cpp's names and q/k layout back onto the Hugging Face checkpoint that the
model's `load_weights` takes.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch

from pagedserve.model.config import ModelConfig
from pagedserve.model.ggml_linear import GGML_BLOCK_TYPES, GGMLWeight
from pagedserve.optional import require

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


class GGUFFile:
    """A GGUF file read through transformers' reader: `metadata` (string arrays such as the
    vocabulary appear as their length), `tensor_names`, and `tensor(name)` in float32."""

    def __init__(self, path: str):
        from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict, read_gguf_metadata
        self.path = path
        self.metadata, names = read_gguf_metadata(path)
        self.tensor_names = list(names)
        self._header = GgufHeader.from_file(path)
        self._infos = {t.name: t for t in self._header.tensors}
        self._lazy = load_gguf_state_dict(self._header)

    def tensor(self, name: str) -> torch.Tensor:
        from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
        info, raw = self._infos[name], self._lazy[name][None]
        if info.ggml_type in GGML_BLOCK:
            raw = dequantize(raw.reshape(-1), info.ggml_type, torch.float32)
        return raw.float().reshape(info.shape)

    def quantized(self, name: str) -> GGMLWeight | None:
        """A 2-D tensor of a type our kernel runs, as the file's bytes; None for any other tensor."""
        info = self._infos[name]
        if info.ggml_type not in GGML_BLOCK_TYPES or len(info.shape) != 2:
            return None
        return GGMLWeight.from_file(self._lazy[name][None].reshape(info.shape[0], -1), info.ggml_type, info.shape[1])


class GGUFPackageFile(GGUFFile):
    """The same, read through the `gguf` package (for transformers without its own reader)."""

    def __init__(self, path: str):
        gguf = require("gguf", "reading a .gguf file with a transformers that has no GGUF reader of its own")
        self.path = path
        self._reader = gguf.GGUFReader(path)
        self.metadata = {k: (len(f.data) if f.types[0].name == "ARRAY" and f.types[-1].name == "STRING"
                             else f.contents())
                         for k, f in self._reader.fields.items() if not k.startswith("GGUF.")}  # header, not metadata
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.tensor_names = list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        from gguf import dequantize
        t = self._tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy off the map

    def quantized(self, name: str) -> GGMLWeight | None:
        t = self._tensors[name]
        if int(t.tensor_type) not in GGML_BLOCK_TYPES or t.data.ndim != 2:
            return None
        return GGMLWeight.from_file(torch.from_numpy(np.array(t.data, dtype=np.uint8)), int(t.tensor_type),
                                    int(t.shape[0]))  # gguf's shape is innermost first


def open_gguf(path: str) -> GGUFFile:
    try:
        return GGUFFile(path)
    except ImportError:
        return GGUFPackageFile(path)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}; expected token_embd, output_norm, output, "
                         f"rope_freqs or blk.N.{{{', '.join(_LAYER_NAMES)}}}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {f.path}; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    names = set(f.tensor_names)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens")  # the latter: the vocabulary's length
    scaling_type = get("rope.scaling.type", "none")
    scaling = None
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported: linear")
    factors = tuple(f.tensor(ROPE_FREQS).reshape(-1).tolist()) if ROPE_FREQS in names else None
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
        rope_freq_factors=factors,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        o_proj_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. Its converter interleaves each head's two rotary halves
    (row h*D/2 + j -> 2j + h) for its pairwise rope; we rotate halves, as HF does.
    w: [n_heads * D, ...] -> same shape."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu",
                      keep_quantized: bool = False, select=None) -> Iterator[tuple[str, "torch.Tensor | GGMLWeight"]]:
    """Dequantize every tensor to float32, restore HF layout, cast to `dtype` (one rounding);
    yields (HF name, tensor). keep_quantized: weights of the types ggml_linear runs stay as the
    file's bytes (GGMLWeight, rows in HF order). select(HF name) -> (dim, start, end): keep only that
    slice of the dequantized tensor (a tensor-parallel rank's)."""
    for gguf_name in f.tensor_names:
        if gguf_name == ROPE_FREQS:
            continue  # folded into the config's rope_freq_factors
        name = hf_name(gguf_name)
        q = f.quantized(gguf_name) if keep_quantized and name.endswith(".weight") else None
        w = f.tensor(gguf_name) if q is None else q.data
        if cfg.model_type == "llama":  # llama.cpp permutes q/k of LLaMA-architecture files only
            if ".q_proj." in name:
                w = unpermute_rope_rows(w, cfg.num_attention_heads)  # whole rows: quantized ones too
            elif ".k_proj." in name:
                w = unpermute_rope_rows(w, cfg.num_key_value_heads)
        part = None if select is None or q is not None else select(name)
        if part is not None:
            dim, start, end = part
            w = w.narrow(dim, start, end - start).clone()  # not a view: the whole tensor is freed
        if q is None:
            yield name, w.to(device=device, dtype=dtype)
        else:
            yield name, GGMLWeight(w.contiguous(), q.ggml_type, q.in_features)
