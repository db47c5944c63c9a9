"""ModelConfig: the shape of a LLaMA-family model, read from a Hugging Face config.

One plain dataclass that both loaders (HF folder, GGUF file) fill in, so the model
never depends on transformers' config classes or their version-specific fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HF architecture name -> model_type. SmolLM checkpoints are LlamaForCausalLM.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# Rope types whose frequencies do not depend on the sequence length (so cached keys stay valid).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str              # e.g. "LlamaForCausalLM"
    model_type: str                # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None   # None: plain rope; else {"rope_type": "linear"|"llama3", ...}
    # Per-frequency divisors llama.cpp stores as `rope_freqs.weight` in place of rope_scaling (Llama 3.1 GGUFs).
    rope_freq_factors: tuple[float, ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # q/k/v projections carry a bias (Qwen2: always)
    o_proj_bias: bool = False      # output projection carries a bias (LLaMA with attention_bias=True)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral's window; our attention is full, see context_len
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # every id that ends generation

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        missing = [k for k in _ROPE_KEYS.get(rope_type, ()) if k not in self.rope_scaling]
        if missing:
            raise ValueError(f"rope scaling {rope_type!r} needs {', '.join(missing)} in the config")

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def context_len(self) -> int:
        """Longest context we compute exactly: attention here has no sliding window, and full
        attention equals windowed attention only while the context fits in the window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: Any, generation_eos: list[int] | int | None = None) -> "ModelConfig":
        """From a transformers PretrainedConfig (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        archs = list(getattr(hf, "architectures", None) or [])
        model_type = getattr(hf, "model_type", None)
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs:
            arch = next((a for a, t in SUPPORTED_ARCHITECTURES.items() if t == model_type), None)
        if arch is None or SUPPORTED_ARCHITECTURES[arch] != model_type:
            raise ValueError(f"unsupported model architecture {archs or model_type!r} (model_type {model_type!r}); "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        theta, scaling = _rope_from_hf(hf)
        sliding = getattr(hf, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
            sliding = None  # Qwen2 configs name a window they do not use
        attention_bias = bool(getattr(hf, "attention_bias", False) or False)
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(theta),
            max_position_embeddings=hf.max_position_embeddings,
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=attention_bias or model_type == "qwen2",
            o_proj_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(hf, "mlp_bias", False) or False),
            sliding_window=sliding,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=_merge_ids(getattr(hf, "eos_token_id", None), generation_eos),
        )


def _rope_from_hf(hf: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either transformers config layout."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None)
    if legacy:
        params = {**dict(legacy), **params}
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")  # the v4 key
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or getattr(hf, "partial_rotary_factor", None) or 1.0
    if partial != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    if params.get("rope_type", "default") == "default":
        return theta, None
    return theta, params


def _merge_ids(*values: list[int] | int | None) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        for i in ([] if v is None else [v] if isinstance(v, int) else v):
            if i not in out:
                out.append(int(i))
    return tuple(out)
