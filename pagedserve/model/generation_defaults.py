"""The sampling settings a model ships with: what its authors tuned it to be sampled at.

A Hugging Face folder carries them in generation_config.json (`temperature`, `top_p`, `top_k`);
a GGUF file in its `general.sampling.*` metadata (llama.cpp's keys). Only the keys present are
returned, under SamplingParams' names, so a caller can tell "the model says" from "nobody said".
Interactive front ends use them as defaults (vLLM's generation_config="auto" does the same);
the library's SamplingParams defaults do not change with the model.
"""
from __future__ import annotations

import json
import os

_HF_KEYS = {"temperature": float, "top_p": float, "top_k": int}
_GGUF_KEYS = {"general.sampling.temp": ("temperature", float), "general.sampling.top_p": ("top_p", float),
              "general.sampling.top_k": ("top_k", int)}


def from_hf_folder(folder: str) -> dict:
    """temperature / top_p / top_k of folder/generation_config.json ({} when the file or keys are absent)."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        raw = json.load(f)
    return _typed({k: (k, typ) for k, typ in _HF_KEYS.items()}, raw, path)


def from_gguf_metadata(metadata: dict) -> dict:
    """temperature / top_p / top_k of a GGUF file's general.sampling.* keys ({} when absent)."""
    return _typed(_GGUF_KEYS, metadata, "GGUF metadata")


def _typed(keys: dict, raw: dict, where: str) -> dict:
    out = {}
    for src, (name, typ) in keys.items():
        value = raw.get(src)
        if value is None:  # HF writes null for an unset field
            continue
        try:
            out[name] = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {src} must be a number, got {value!r}") from None
    return out
