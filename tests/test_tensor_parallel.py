"""Tensor parallelism over torch.distributed (gloo on this CPU): the shard plan, the block-table deltas, and
engines of 2 ranks (this process and a spawned worker) against one rank: the same greedy tokens, each rank
holding its heads' share of the KV cache, a killed worker ending the engine with an error, the server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.distributed.parallel import shard_plan, weight_slice
from pagedserve.distributed import workers
from pagedserve.distributed.workers import StepDecoder, StepEncoder, TensorParallelError
from pagedserve.engine import StepError
from pagedserve.outputs import BlockTransfers, ScheduledSequence, SchedulerOutput
from conftest import build_tiny_hf_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 9, 12, 40, 7] * 3}, {"prompt_token_ids": list(range(30, 70))},
           {"prompt_token_ids": [3, 8, 11]}]


def test_heads_go_to_ranks_whole_grouped_by_kv_head():
    # SmolLM2-135M: 9 query heads over 3 KV heads, intermediate 1536, vocabulary 49152, over 2 ranks
    plans = [shard_plan(9, 3, 1536, 49152, r, 2) for r in range(2)]
    assert [(p.q_heads, p.kv_heads) for p in plans] == [((0, 3), (0, 1)), ((3, 9), (1, 3))]  # uneven, nothing twice
    assert [p.intermediate for p in plans] == [(0, 768), (768, 1536)]
    assert [p.vocab for p in plans] == [(0, 24576), (24576, 49152)]
    # fewer KV heads than ranks: each KV head replicated on the ranks sharing its query heads
    plans = [shard_plan(8, 2, 64, 10, r, 4) for r in range(4)]
    assert [(p.q_heads, p.kv_heads) for p in plans] == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)),
                                                        ((6, 8), (1, 2))]
    assert [p.vocab for p in plans] == [(0, 3), (3, 6), (6, 9), (9, 10)] and plans[0].vocab_per_rank == 3
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        shard_plan(9, 3, 64, 10, 0, 4)
    with pytest.raises(ValueError, match="vocabulary of 5 cannot be split over 4 ranks"):  # the last share empty
        shard_plan(8, 2, 64, 5, 0, 4)


def test_each_tensor_is_sliced_by_what_it_is_split_by():
    plan = shard_plan(9, 3, 1536, 49152, 1, 2)
    d = 64
    assert weight_slice(plan, "model.layers.0.self_attn.q_proj.weight", d) == (0, 3 * d, 9 * d)
    assert weight_slice(plan, "model.layers.0.self_attn.k_proj.bias", d) == (0, 1 * d, 3 * d)
    assert weight_slice(plan, "model.layers.0.self_attn.o_proj.weight", d) == (1, 3 * d, 9 * d)
    assert weight_slice(plan, "model.layers.0.self_attn.o_proj.bias", d) is None  # added once, after the sum
    assert weight_slice(plan, "model.layers.3.mlp.down_proj.weight", d) == (1, 768, 1536)
    assert weight_slice(plan, "model.layers.3.mlp.gate_proj.weight", d) == (0, 768, 1536)
    assert weight_slice(plan, "model.embed_tokens.weight", d) == (0, 24576, 49152)
    assert weight_slice(plan, "lm_head.weight", d) == (0, 24576, 49152)
    assert weight_slice(plan, "model.layers.3.input_layernorm.weight", d) is None


def _sched(*seqs: tuple[str, list[int]]) -> SchedulerOutput:
    return SchedulerOutput([ScheduledSequence(rid, [1], 0, blocks, True) for rid, blocks in seqs],
                           BlockTransfers(copy=[(1, 2)]))


def test_block_tables_travel_as_what_changed():
    enc, dec = StepEncoder(), StepDecoder()
    steps = [_sched(("a", [4, 5]), ("b", [7])),
             _sched(("a", [4, 5]), ("b", [7, 9, 2])),   # a unchanged, b appended two
             _sched(("a", [8]), ("c", [1])),            # a replaced (preempted and back), c new, b gone
             _sched(("b", [7, 9, 2, 3]))]               # b back after a step away: sent whole
    sent = []
    for sched in steps:
        message = enc.encode(sched)
        sent.append([blocks for _, _, _, blocks, *_ in message[0]])
        decoded = dec.decode(message)
        assert [s.block_ids for s in decoded.sequences] == [s.block_ids for s in sched.sequences]
        assert decoded.transfers.copy == [(1, 2)]
    assert sent == [[("=", [4, 5]), ("=", [7])], [("+", []), ("+", [9, 2])], [("=", [8]), ("=", [1])],
                    [("=", [7, 9, 2, 3])]]


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow
def test_two_ranks_give_one_ranks_greedy_tokens_on_the_default_model():
    prompts = ["The capital of France is", "def fibonacci(n):", "Paged attention stores keys and values in"]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    one = LLM(dtype="float32", num_kv_blocks=128)
    want, (whole,) = _tokens(one.generate(prompts, params, use_tqdm=False)), one.llm_engine.kv_cache_bytes_per_rank()
    two = LLM(dtype="float32", num_kv_blocks=128, tensor_parallel_size=2)
    try:
        assert _tokens(two.generate(prompts, params, use_tqdm=False)) == want
        # 3 KV heads over 2 ranks: 1 and 2 of them, nothing held twice
        assert two.llm_engine.kv_cache_bytes_per_rank() == [whole // 3, 2 * whole // 3]
    finally:
        two.shutdown()


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_4kv"))
    build_tiny_hf_model(folder, "llama", num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    return folder


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_two_ranks_with_caching_preemption_and_parallel_samples(four_kv_heads, backend):
    options = dict(dtype="float32", block_size=8, num_kv_blocks=14, max_num_batched_tokens=32,
                   attention_backend=backend)  # a small pool: requests preempt each other
    sampled = SamplingParams(n=2, max_tokens=10, temperature=0.8, seed=3)
    prompts = PROMPTS + PROMPTS[:1]  # the repeat hits the prefix cache
    one = LLM(four_kv_heads, **options)
    want = (_tokens(one.generate(prompts, GREEDY, use_tqdm=False)),
            [[list(c.token_ids) for c in o.outputs] for o in one.generate(prompts[:2], sampled, use_tqdm=False)])
    two = LLM(four_kv_heads, tensor_parallel_size=2, **options)
    try:
        got = (_tokens(two.generate(prompts, GREEDY, use_tqdm=False)),
               [[list(c.token_ids) for c in o.outputs] for o in two.generate(prompts[:2], sampled, use_tqdm=False)])
        assert got == want
        stats = two.stats()
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
        whole = one.llm_engine.kv_cache_bytes_per_rank()[0]
        assert two.llm_engine.kv_cache_bytes_per_rank() == [whole // 2, whole // 2]  # 2 of 4 KV heads each
    finally:
        two.shutdown()


def test_two_ranks_swap_to_the_tier_and_search_beams(four_kv_heads):
    from pagedserve import BeamSearchParams
    options = dict(dtype="float32", block_size=8, num_kv_blocks=12, max_num_batched_tokens=32,
                   kv_offload_memory="8MiB", preemption_mode="swap")  # each rank keeps its heads' tier slots
    prompts = PROMPTS + [{"prompt_token_ids": list(range(100, 130))}]
    beams = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        llm = LLM(four_kv_heads, tensor_parallel_size=tp, **options)
        runs.append((_tokens(llm.generate(prompts, GREEDY, use_tqdm=False)),
                     [[s.tokens for s in r.sequences] for r in llm.beam_search(prompts[:2], beams)],
                     llm.stats()["num_swapped_out"]))
        llm.shutdown()
    assert runs[1] == runs[0] and runs[0][2] > 0


def test_a_killed_worker_ends_the_engine_with_an_error(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
    worker = llm.llm_engine.runner.workers.processes[0]
    assert _tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False))
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    errors: list[BaseException] = []

    def generate():
        try:
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)
    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    thread.join(150)  # the collectives' timeout is 120 s; a dead peer is seen at once
    assert not thread.is_alive(), "generate hung after its worker was killed"
    assert isinstance(errors[0], StepError) and isinstance(errors[0].__cause__, TensorParallelError)
    assert "rank 1 exited with code -9" in str(errors[0].__cause__)
    with pytest.raises(StepError, match="tensor-parallel group is broken"):  # and every step after it
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm.shutdown()
    assert not worker.is_alive()


def test_prompt_logprobs_an_idle_gap_and_an_interrupt(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(workers, "COLLECTIVE_TIMEOUT_S", 3.0)  # a step's collectives; the workers get it too
    options = dict(dtype="float32", num_kv_blocks=64)
    with_logprobs = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=2, logprobs=1)
    want = LLM(tiny_model_dir, **options).generate(PROMPTS, with_logprobs, use_tqdm=False)
    llm = LLM(tiny_model_dir, tensor_parallel_size=2, **options)
    got = llm.generate(PROMPTS, with_logprobs, use_tqdm=False)  # rank 1 lends its logits' share, computes none
    for a, b in zip(got, want):  # the same tokens listed; values to float32 summation order (the all-reduces)
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        for p, q in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert p.keys() == q.keys() and all(abs(p[t].logprob - q[t].logprob) < 1e-4 for t in p)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    time.sleep(5)  # idle longer than a step's timeout: the workers wait for commands without one
    assert _tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)) == _tokens(
        LLM(tiny_model_dir, **options).generate(PROMPTS[:1], GREEDY, use_tqdm=False))
    local = llm.llm_engine.runner.runner

    def interrupted(sched):
        raise KeyboardInterrupt  # rank 0 stops after the step went out: rank 1 waits in its first all-reduce
    monkeypatch.setattr(local, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    with pytest.raises(StepError, match="tensor-parallel group is broken .KeyboardInterrupt"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)  # at once, not after a collective's timeout
    assert llm.llm_engine.runner.broken == "KeyboardInterrupt: "
    llm.shutdown()


def test_a_failure_after_the_workers_started_stops_them_at_once(tiny_model_dir):
    with pytest.raises(ValueError, match="holds no block"):  # the KV budget, after the shards loaded
        LLM(tiny_model_dir, dtype="float32", kv_cache_memory=1, tensor_parallel_size=2)
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)  # the group was left
    with pytest.raises(ValueError, match="already runs a tensor-parallel engine"):
        LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
    assert _tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False))  # the first is unharmed
    llm.shutdown()


def test_shutdown_reaps_the_workers(tiny_model_dir):
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2)
    procs = llm.llm_engine.runner.workers.processes
    llm.shutdown()
    assert all(not p.is_alive() and p.exitcode == 0 for p in procs)  # told to stop, not killed


def test_a_rank_started_on_its_own_with_pagedserve_worker(tiny_model_dir):
    # What a second host runs: `pagedserve worker` meets the engine at the init method they both name.
    init = f"tcp://127.0.0.1:{workers.free_port()}"
    options = ["--model", tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64",
               "--tensor-parallel-size", "2", "--distributed-init-method", init]
    worker = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "worker", "--rank", "1", *options])
    try:
        llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, tensor_parallel_size=2,
                  distributed_init_method=init)
        assert llm.llm_engine.runner.workers.processes == []  # none spawned here
        got = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
        llm.shutdown()
        assert worker.wait(timeout=60) == 0  # told to stop
    finally:
        worker.kill()
    assert got == _tokens(LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64).generate(PROMPTS, GREEDY,
                                                                                        use_tqdm=False))


def test_the_server_on_two_ranks(tiny_model_dir):
    from test_server import running_server
    want = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64).generate(["Hello world"], GREEDY, use_tqdm=False)
    with running_server(tiny_model_dir, tensor_parallel_size=2) as (base, engine):
        r = httpx.post(f"{base}/v1/completions", json={"model": engine.engine.model_name, "prompt": "Hello world", "max_tokens": 12,
                                                        "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want[0].outputs[0].text
        procs = engine.engine.runner.workers.processes
    engine.shutdown()
    assert all(not p.is_alive() for p in procs)
