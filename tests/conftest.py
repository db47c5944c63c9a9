"""Shared fixtures: tiny random-weight Hugging Face models (with a real tokenizer and chat
template), built offline into temporary folders, so tests never download anything."""
from __future__ import annotations

import os

# Triton's kernels run on CPU tensors under its interpreter; the flag is read when a kernel is defined, so
# it is set before anything imports pagedserve.attention.triton_kernels. No test here compiles for a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

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


def write_tiny_gguf(path: str, ref, tok_folder: str, qtype: str = "Q8_0") -> None:
    """Write a transformers model as llama.cpp would: its tensor names (from the gguf package's own
    map), LLaMA q/k rows permuted, 2-D weights quantized to `qtype`, the tokenizer as GGUF fields."""
    import json
    import gguf
    cfg = ref.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(path, arch)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    with open(os.path.join(tok_folder, "tokenizer.json")) as f:
        model = json.load(f)["model"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])])
    w.add_token_types([3 if i < 3 else 1 for i in range(len(model["vocab"]))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     cfg.num_hidden_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        data = t.float().numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(base.split(".")[-1])
        if arch == "llama" and heads:  # llama.cpp's convert_hf_to_gguf permute
            data = data.reshape(heads, 2, -1, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        kind = gguf.GGMLQuantizationType[qtype] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        w.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
