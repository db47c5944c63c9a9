"""A GGUF's weights kept quantized (quantization="gguf"): the C kernel's math, the modules, the loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny_hf_model, write_tiny_gguf
from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.model import load_model
from pagedserve.model import ggml_linear as gl
from pagedserve.model.gguf_file import GGUFFile, GGUFPackageFile
from test_model import PagedHarness

gguf = pytest.importorskip("gguf")
TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def quantize(w: torch.Tensor, qtype: str) -> tuple[gl.GGMLWeight, torch.Tensor]:
    """w [N, K] quantized by the gguf package (llama.cpp's reference code), and its dequantized values."""
    kind = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quantize(w.numpy(), kind)
    deq = torch.from_numpy(np.asarray(gguf.dequantize(raw, kind), dtype=np.float32)).reshape(w.shape)
    return gl.GGMLWeight.from_file(torch.from_numpy(raw), int(kind), w.shape[1]), deq


def block_offsets(weight: gl.GGMLWeight) -> torch.Tensor:
    """Each block's offset m in w = d q + m: [N, K/32] float64 (from the row's d's and m's after its quants)."""
    nb = weight.in_features // 32
    quants = nb * gl.GGML_BLOCK_TYPES[weight.ggml_type][2]
    halves = weight.data[:, quants:].contiguous().view(torch.float16).double()  # [N, nb d's (+ nb m's)]
    d = halves[:, :nb]
    if weight.ggml_type == 3:  # Q4_1 stores m
        return halves[:, nb:]
    return -8 * d if weight.ggml_type == 2 else 0 * d


def kernel_reference(x: torch.Tensor, weight: gl.GGMLWeight, deq: torch.Tensor, bias: torch.Tensor | None):
    """What the kernel computes, in float64: each 32-value block of x rounded to int8 in float32 (scale
    max|x| / 127, ties to even), the weight's offsets applied to x's exact block sums."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv)
    offsets = block_offsets(weight)  # [N, K/32]
    # W x_hat + sum_b m_b (xs_b - xd_b sum(xq_b)): the offset term uses x's exact block sums.
    x_hat = (xq.double() * d.double()).reshape(m, k)
    correction = (xb.double().sum(-1) - d.double()[..., 0] * xq.double().sum(-1)) @ offsets.T
    y = x_hat @ deq.double().T + correction
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9])
def test_kernel_computes_the_int8_block_product(qtype, m):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(37, 96, generator=g)  # odd row count; 3 blocks a row (the two-chain loop's tail)
    weight, deq = quantize(w, qtype)
    wide = torch.randn(m, 128, generator=g) * 3
    x = wide[:, 16:112]  # rows 128 apart: a strided view
    bias = torch.randn(37, generator=g)
    x[0, :32] = 0  # an all-zero block
    y = gl.ggml_linear(x, weight, bias)
    ref = kernel_reference(x, weight, deq, bias)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    # and the int8 rounding keeps it near the float product of the dequantized weight
    exact = x.double() @ deq.double().T + bias.double()
    assert float((y.double() - exact).norm() / exact.norm()) < 0.03


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("blocks", [8, 9, 65, 131])  # the 8-wide scale loop, its tail, and chunks of 64 blocks
def test_kernel_at_real_row_lengths(qtype, blocks):
    g = torch.Generator().manual_seed(blocks)
    weight, deq = quantize(torch.randn(13, 32 * blocks, generator=g), qtype)
    for m in (1, 5):
        x = torch.randn(m, 32 * blocks, generator=g)
        ref = kernel_reference(x, weight, deq, None)
        torch.testing.assert_close(gl.ggml_linear(x, weight).double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_without_avx2_computes_the_same(qtype, tmp_path, monkeypatch):
    import ctypes
    from pagedserve import native
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native.load(gl.SOURCE, ("-mno-avx2", "-mno-fma", "-mno-f16c"))  # the scalar loops
    lib.ggml_linear.argtypes = [ctypes.POINTER(gl.LinearArgs), ctypes.c_int]
    g = torch.Generator().manual_seed(3)
    weight, deq = quantize(torch.randn(11, 32 * 67, generator=g), qtype)
    x = torch.randn(6, 32 * 67, generator=g)
    out = torch.empty(6, 11)
    assert lib.ggml_linear(ctypes.byref(gl.linear_args(out, x, weight.data, weight.ggml_type, None)), 2) == 0
    ref = kernel_reference(x, weight, deq, None)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("qtype", TYPES)
def test_a_nan_input_gives_nan_outputs(qtype):
    weight, _ = quantize(torch.randn(7, 64, generator=torch.Generator().manual_seed(4)), qtype)
    x = torch.randn(2, 64)
    x[1, 40] = float("nan")
    y = gl.ggml_linear(x, weight)
    assert y[0].isfinite().all() and y[1].isnan().all()


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_rows_matches_llama_cpps_reference(qtype):
    weight, deq = quantize(torch.randn(50, 64, generator=torch.Generator().manual_seed(1)), qtype)
    assert torch.equal(weight.dequantize(), deq)
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(gl.dequantize_rows(weight, ids), deq[ids])
    emb = gl.GGMLEmbedding(weight)
    assert torch.equal(emb(ids), deq[ids])
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))
    with pytest.raises(IndexError):
        emb(torch.tensor([-1]))


def test_cat_rows_keeps_one_type_and_dequantizes_a_mix():
    g = torch.Generator().manual_seed(2)
    a, da = quantize(torch.randn(8, 64, generator=g), "Q4_1")
    b, db = quantize(torch.randn(4, 64, generator=g), "Q4_1")
    c, dc = quantize(torch.randn(4, 64, generator=g), "Q8_0")
    fused = gl.cat_rows([a, b])
    assert isinstance(fused, gl.GGMLWeight) and torch.equal(fused.dequantize(), torch.cat([da, db]))
    mixed = gl.cat_rows([a, c])
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed, torch.cat([da, dc]))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """{(arch, qtype): path} of tiny GGUFs, each next to the model it was written from."""
    out = {}
    for arch, overrides in (("llama", {}), ("qwen2", dict(tie_word_embeddings=True))):
        folder = tmp_path_factory.mktemp(arch)
        ref = build_tiny_hf_model(str(folder), arch, **overrides)
        for qtype in TYPES:
            gdir = folder / qtype
            gdir.mkdir()
            write_tiny_gguf(str(gdir / "tiny.gguf"), ref, str(folder), qtype)
            out[arch, qtype] = str(gdir / "tiny.gguf")
    return out


class ReferenceLinear(torch.nn.Module):
    """A GGMLLinear computed by kernel_reference in float64 instead of the C kernel."""

    def __init__(self, linear: gl.GGMLLinear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.deq = linear.weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_reference(x, self.weight, self.deq, self.bias).float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", TYPES)
def test_quantized_model_holds_the_files_weights_and_runs_the_kernel_math(tiny_ggufs, arch, qtype):
    path = tiny_ggufs[arch, qtype]
    dense = load_model(path, dtype="float32")
    quant = load_model(path, dtype="float32", quantization="gguf")
    linears = {n: m for n, m in quant.model.named_modules() if isinstance(m, gl.GGMLLinear)}
    assert len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; the LM head
    assert not any(isinstance(m, torch.nn.Linear) for m in quant.model.modules())
    # Loading (names, q/k row order, fusion, tied head) keeps exactly the weights the dense load dequantizes.
    assert torch.equal(quant.model.embed_tokens.weight.dequantize(), dense.model.embed_tokens.weight)
    for name, m in linears.items():
        want = dense.model.embed_tokens.weight if name == "lm_head" and dense.model.lm_head is None \
            else dense.model.get_submodule(name).weight
        assert torch.equal(m.weight.dequantize(), want), name
    if arch == "qwen2":  # tied: the LM head reads the embedding's bytes, no copy
        assert quant.model.lm_head.qweight.data_ptr() == quant.model.embed_tokens.qweight.data_ptr()
        assert torch.equal(quant.model.layers[0].self_attn.qkv_proj.bias,
                           dense.model.layers[0].self_attn.qkv_proj.bias)
    # In a prefill and a decode step, every linear gives the reference's result on the input it gets there.
    # (Not compared end to end: a 1e-7 difference can move a value across an int8 rounding boundary and
    # change it by a whole step, which the next layers carry on.)
    checked = []

    def check(module, inputs, output, name):
        want = ReferenceLinear(module)(inputs[0])
        torch.testing.assert_close(output, want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=name)
        checked.append(name)

    for name, m in linears.items():
        m.register_forward_hook(lambda mod, i, o, name=name: check(mod, i, o, name))
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    h = PagedHarness(quant.model, 1, 41)
    logits = h.step([(0, ids)])[0]
    h.step([(0, [int(logits[-1].argmax())])])
    assert len(checked) == 2 * len(linears)


def test_both_readers_give_the_same_quantized_bytes(tiny_ggufs):
    path = tiny_ggufs["llama", "Q4_1"]
    a, b = GGUFFile(path), GGUFPackageFile(path)
    for name in a.tensor_names:
        qa, qb = a.quantized(name), b.quantized(name)
        assert (qa is None) == (qb is None), name
        if qa is not None:
            assert (qa.ggml_type, qa.in_features) == (qb.ggml_type, qb.in_features)
            assert torch.equal(qa.data, qb.data), name


def test_engine_serves_a_quantized_model(tiny_ggufs):
    llm = LLM(model=tiny_ggufs["llama", "Q4_1"], quantization="gguf", num_kv_blocks=64)
    out = llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [12, 12]
    llm.llm_engine.scheduler.kv_cache.check_invariants()
    assert llm.llm_engine.scheduler.kv_cache.num_free_blocks() == 64


def test_quantization_option_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="not one"):
        load_model(tiny_model_dir, quantization="gguf")
    with pytest.raises(ValueError, match="computes in float32"):
        load_model(tiny_model_dir, quantization="gguf", dtype="bfloat16")


def test_without_a_compiler_the_option_is_refused(tiny_ggufs, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    gl.load_library.cache_clear()
    try:
        with pytest.raises(ValueError, match="did not build"):
            load_model(tiny_ggufs["llama", "Q4_1"], quantization="gguf")
        assert load_model(tiny_ggufs["llama", "Q4_1"]).model is not None  # the default still loads
    finally:
        gl.load_library.cache_clear()


def generate_both_ways(path: str, prompts: list[list[int]], **options) -> tuple[list, list, object]:
    """Greedy tokens and their top logprobs, eager and through the decode graph; and the graph."""
    results = []
    for eager in (True, False):
        llm = LLM(model=path, enforce_eager=eager, num_kv_blocks=128, **options)
        out = llm.generate([{"prompt_token_ids": p} for p in prompts],  # lengths 30, 35, ... : some decode alone
                           [SamplingParams(temperature=0, max_tokens=30 + 5 * i, ignore_eos=True, logprobs=3)
                            for i in range(len(prompts))])
        results.append([(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in d.items())
                                                   for d in o.outputs[0].logprobs]) for o in out])
        llm.llm_engine.scheduler.kv_cache.check_invariants()
    return results[0], results[1], llm.llm_engine.runner.decode_graph


@pytest.mark.parametrize("arch,quantization", [("llama", "gguf"), ("qwen2", "gguf"), ("llama", "none"),
                                               ("qwen2", "none")])
def test_decode_graph_gives_the_eager_results_bitwise(tiny_ggufs, arch, quantization, monkeypatch):
    from pagedserve.model.decode_graph import DecodeGraph
    rows, run = [], DecodeGraph.run
    monkeypatch.setattr(DecodeGraph, "run", lambda self, ids, *a: rows.append(len(ids)) or run(self, ids, *a))
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 17, 33, 2, 60)]
    # max_num_seqs 3: steps of 1, 2 and 3 decodes, mixed steps (eager) between; 30-50 tokens cross the
    # graph's first block-table width, so it rebuilds on the way.
    eager, graphed, graph = generate_both_ways(tiny_ggufs[arch, "Q4_1"], prompts, max_num_seqs=3,
                                               quantization=quantization)
    assert graph is not None and graph.num_runs == len(rows) and set(rows) == {1, 2, 3}
    assert graph.tables.shape[1] > 1  # the block tables outgrew the first buffer: the graphs were rebuilt
    assert graphed == eager


def test_decode_graph_only_where_it_runs_the_eager_kernels(tiny_ggufs):
    path = tiny_ggufs["llama", "Q4_1"]
    assert LLM(model=path, quantization="gguf").llm_engine.runner.decode_graph is not None
    assert LLM(model=path).llm_engine.runner.decode_graph is not None  # float32, packed linears
    assert LLM(model=path, quantization="gguf", enforce_eager=True).llm_engine.runner.decode_graph is None
    assert LLM(model=path, attention_backend="torch").llm_engine.runner.decode_graph is None
    assert LLM(model=path, dtype="bfloat16").llm_engine.runner.decode_graph is None


def test_decode_graph_refuses_token_ids_outside_the_vocabulary(tiny_ggufs):
    from pagedserve.attention import AttentionMetadata
    runner = LLM(model=tiny_ggufs["llama", "Q4_1"], quantization="gguf", num_kv_blocks=8).llm_engine.runner
    meta = AttentionMetadata.build([[0]], [1], [1], 16, null_block=8)
    with pytest.raises(IndexError, match="out of range"):
        runner.decode_graph.run(torch.tensor([320]), torch.tensor([0]), meta)
