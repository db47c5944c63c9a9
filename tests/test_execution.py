"""The execution layer: attention backends behind one interface, the runner's layout and metadata, packed
linears, and nothing but the model on the hot path."""
from __future__ import annotations

import random

import pytest
import torch

from pagedserve import SamplingParams
from pagedserve.attention import MetadataBuilder, TorchBackend, select_backend
from pagedserve.attention import cpu_kernel
from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.model.packed_linear import PackedLinear, pack_linears, packing_supported

OPTIONS = dict(dtype="float32", block_size=8, num_kv_blocks=128)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams] | None = None
         ) -> list[list[int]]:
    """Each prompt's output tokens (greedy, or params[i]), checking the invariants after every step."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY if params is None else params[i])
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for d in engine.step():
            out[d.request_id] += d.outputs[0].token_ids
        engine.check_invariants()
    return [out[str(i)] for i in range(len(prompts))]


def test_each_backend_gives_the_same_greedy_tokens(tiny_model_dir):
    if not cpu_kernel.available():
        pytest.skip("the kernel did not build")
    prompts = _prompts(6)
    # a small step budget mixes decodes and prefill chunks in one step
    runs = {name: _run(LLMEngine(model=tiny_model_dir, attention_backend=name, max_num_batched_tokens=48, **OPTIONS),
                       prompts) for name in ("torch", "cpu")}
    assert runs["torch"] == runs["cpu"]
    assert LLMEngine(model=tiny_model_dir, **OPTIONS).runner.backend.name == "cpu"


def test_the_backend_is_validated_at_start_up(tiny_model_dir):
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="cannot run here: it runs on the CPU"):
        select_backend("cpu", "meta", torch.float32, 64, 16)
    with pytest.raises(ValueError, match="cannot run here: it supports float32 and bfloat16"):
        LLMEngine(model=tiny_model_dir, attention_backend="cpu", **{**OPTIONS, "dtype": "float16"})


class _ReversedTorch(TorchBackend):
    """A backend that wants its rows in reverse order (decodes not first: it attends one sequence at a time)."""
    name = "reversed"

    def order(self, query_lens):
        return list(reversed(range(len(query_lens))))

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        meta.num_decodes = 0  # every sequence goes through the per-chunk path
        return super().forward(q, k, v, k_cache, v_cache, meta, scale)


def test_the_runner_lays_rows_out_as_the_backend_asks(tiny_model_dir):
    prompts = _prompts(5, seed=3)
    want = _run(LLMEngine(model=tiny_model_dir, attention_backend="torch", max_num_batched_tokens=40, **OPTIONS),
                prompts)
    engine = LLMEngine(model=tiny_model_dir, attention_backend="torch", max_num_batched_tokens=40, **OPTIONS)
    engine.runner.backend = _ReversedTorch()
    assert _run(engine, prompts) == want


def test_metadata_pads_block_tables_with_the_null_block():
    builder = MetadataBuilder(block_size=4, null_block=99)
    positions, meta = builder.build([[7], [3, 5, 8]], [1, 6], [2, 4], TorchBackend())
    assert meta.block_tables.tolist() == [[7, 99, 99], [3, 5, 8]]
    assert positions.tolist() == [2, 4, 5, 6, 7, 8, 9]
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 5 * 4, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 8 * 4, 8 * 4 + 1]
    assert meta.query_start_loc.tolist() == [0, 1, 7] and meta.seq_lens_list == [3, 10]
    assert meta.num_decodes == 1
    _, again = builder.build([[1, 2]], [1], [5], TorchBackend())  # the kept buffer is reset, not stale
    assert again.block_tables.tolist() == [[1, 2]]


def test_the_engine_reserves_a_null_block_no_request_gets(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS)
    assert engine.runner.kv_caches[0][0].shape[0] == OPTIONS["num_kv_blocks"] + 1
    assert engine.runner.metadata_builder.null_block == OPTIONS["num_kv_blocks"] == engine.kv_cache.num_blocks


def test_slot_accounting_runs_only_under_an_observer(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS)
    _run(engine, _prompts(3))
    assert engine.kv_cache.num_steps_recorded == 0 and engine.stats()["kv_utilization_mean"] is None
    observed = LLMEngine(model=tiny_model_dir, **OPTIONS)
    seen = []
    observed.add_step_observer(lambda sched: (seen.append(len(sched.sequences)), observed.kv_cache.record_step()))
    _run(observed, _prompts(3))
    assert observed.kv_cache.num_steps_recorded == len(seen) > 0
    assert 0 < observed.stats()["kv_utilization_mean"] <= 1
    assert "kv_tokens_stored" not in observed.stats(detailed=False)


@pytest.mark.skipif(not packing_supported(torch.float32, torch.device("cpu")), reason="no oneDNN packing here")
def test_packed_linears_match_torch_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.Linear(80, 16, bias=False))
    x = torch.randn(37, 48)
    want = model(x)
    assert pack_linears(model, torch.float32, torch.device("cpu")) == 2
    assert all(isinstance(m, PackedLinear) for m in model)
    with torch.inference_mode():
        assert torch.allclose(model(x), want, atol=1e-5, rtol=1e-5)
        assert model(torch.randn(1, 48)).shape == (1, 16)


def test_the_kernel_operator_traces_under_torch_compile():
    if not cpu_kernel.available():
        pytest.skip("the kernel did not build")
    q = torch.randn(3, 4, 16)
    kc, vc = torch.randn(6, 8, 2, 16), torch.randn(6, 8, 2, 16)
    tables = torch.tensor([[0, 1], [2, 5], [4, 3]])
    lens = torch.tensor([5, 16, 9])

    def attend(q):
        out = torch.empty_like(q)
        torch.ops.pagedserve.paged_decode(out, q, kc, vc, tables, lens, 0.25, 1)
        return out * 2

    compiled = torch.compile(attend, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q), attend(q))
