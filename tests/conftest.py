"""Shared fixtures: tiny random-weight Hugging Face models (with a real tokenizer and chat
template), built offline into temporary folders, so tests never download anything."""
from __future__ import annotations

import os

import pytest
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "A scheduler fills one token budget every step: decodes first, then prefills.",
    "What is the capital of France? The capital of France is Paris.",
]
TINY_VOCAB = 320  # byte-level BPE: 256 bytes + 3 specials + merges


def build_tiny_tokenizer(folder: str):
    """A byte-level BPE tokenizer (any text encodes), ChatML specials and chat template, saved in folder.
    bos <|im_start|> = 1, eos <|im_end|> = 2, pad <|endoftext|> = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def build_tiny_hf_model(folder: str, arch: str = "llama", seed: int = 0, with_tokenizer: bool = True, **overrides):
    """Save a random-weight transformers model (arch: llama | mistral | qwen2) into folder; returns it (eval, fp32).

    Defaults: hidden 64, 2 layers, 4 query heads over 2 KV heads (GQA), vocab 320, context 256.
    Weights are drawn wider than the usual init (std 0.1) so logits and attention are far from uniform.
    """
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    kwargs = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # random norm weights too, so a skipped or misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if with_tokenizer:
        build_tiny_tokenizer(folder)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny LLaMA folder (config.json, model.safetensors, tokenizer with chat template), for engine tests."""
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    build_tiny_hf_model(folder, "llama")
    return folder
