"""CUDA graphs and GPU memory sizing, through the seams that run them on the CPU.

CUDA graphs: the runner captures its decode graphs through a `Capture` (cuda_graph.py). Here the capture is
one that replays by running the captured function again, so the graph logic (the ladder of sizes, the
persistent buffers, padded rows, which steps replay) runs on the CPU with the triton backend under Triton's
interpreter, and one that fails on any read of a tensor's value on the host, which a real capture forbids.

Memory sizing: the engine reads the device through a MemoryProbe (kv_cache/sizing.py); here a probe of
given numbers stands in for a GPU's.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagedserve import SamplingParams
from pagedserve.attention.triton_backend import interpreted
from pagedserve.engine import LLMEngine
from pagedserve.kv_cache import sizing
from pagedserve.model.cuda_graph import batch_sizes
from pagedserve.runner import ModelRunner, kv_bytes_per_block
from test_execution import _run

needs_interpreter = pytest.mark.skipif(not interpreted(), reason="runs Triton's kernels on the CPU, interpreted")
OPTIONS = dict(block_size=8, num_kv_blocks=96, attention_backend="triton", max_num_seqs=4)


class NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's value into Python (.item(), int(t), bool(t)): inside a CUDA graph
    capture that is an error, and on replay the value would be the capture's, not the step's."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor's value was read on the host inside the captured step")
        return func(*args, **(kwargs or {}))


def rerunning_capture(captured: list[int], guard: bool):
    """A Capture for the CPU: 'records' fn by running it once, and replays it by running it again."""
    def capture(fn):
        def replay():
            if not guard:
                return fn()
            with NoHostReads():
                return fn()
        replay()
        captured.append(1)
        return replay
    return capture


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    return _run(engine, prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens])


PROMPTS = [[5, 9, 12, 40, 7], [3] * 19 + [8, 11], list(range(30, 63))]
LENGTHS = [12, 7, 3]  # the batch shrinks 3 -> 2 -> 1: padded to 4, then 2, then 1


def test_the_ladder_of_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and batch_sizes(256)[-1] == 256 and len(batch_sizes(256)) == 35


@needs_interpreter
def test_replayed_decode_steps_give_the_eager_tokens(tiny_model_dir):
    want = _generate(LLMEngine(model=tiny_model_dir, dtype="float32", enforce_eager=True, **OPTIONS), PROMPTS, LENGTHS)
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", **OPTIONS)
    assert engine.runner.cuda_graphs is None  # captured only on CUDA by itself
    captured: list[int] = []
    engine.runner.capture_cuda_graphs(rerunning_capture(captured, guard=False))
    assert len(captured) == 3  # sizes 4, 2, 1
    assert _generate(engine, PROMPTS, LENGTHS) == want
    graphs = engine.runner.cuda_graphs
    assert graphs.num_replays == max(LENGTHS) - 1  # every step after the one prefill step
    null = graphs.null_block
    for k_cache, v_cache in engine.runner.kv_caches:  # padded rows wrote nothing, not even to the null block
        assert not k_cache[null].any() and not v_cache[null].any()


@needs_interpreter
def test_the_captured_step_reads_no_value_on_the_host(tiny_model_dir):
    # bfloat16 on the CPU runs the model's torch ops (the float32 C rotary op checks positions on the host).
    engine = LLMEngine(model=tiny_model_dir, dtype="bfloat16", **OPTIONS)
    engine.runner.capture_cuda_graphs(rerunning_capture([], guard=True))
    _generate(engine, PROMPTS[:2], [4, 3])
    assert engine.runner.cuda_graphs.num_replays == 3


@needs_interpreter
def test_steps_the_graphs_do_not_serve_run_eagerly(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", **{**OPTIONS, "max_num_seqs": 2})
    engine.runner.capture_cuda_graphs(rerunning_capture([], guard=False))
    graphs = engine.runner.cuda_graphs
    assert graphs.sizes == [1, 2]
    _generate(engine, PROMPTS[:1], [1])  # a prefill step that samples its only token: nothing to replay
    assert graphs.num_replays == 0


class FakeProbe:
    """A device of `total` bytes of which `used` are held outside this process's tensors; profile_run's peak
    is `peak` bytes over the tensors it holds afterwards."""

    def __init__(self, total: int, used: int, peak: int) -> None:
        self.total, self.used, self.peak = total, used, peak
        self.calls: list[str] = []

    def mem_get_info(self):
        self.calls.append("mem_get_info")
        return self.total - self.used, self.total

    def reset_peak(self):
        self.calls.append("reset_peak")

    def peak_allocated(self):
        self.calls.append("peak_allocated")
        return 1000 + self.peak

    def allocated(self):
        return 1000

    def release_cached(self):
        self.calls.append("release_cached")


def test_the_kv_budget_is_the_share_left_after_weights_and_activations():
    gib = 1 << 30
    # 80 GiB device, 0.9 of it allowed; 20 GiB in use (weights, context), a step peaks 5 GiB above that
    assert sizing.kv_cache_bytes(free=60 * gib, total=80 * gib, peak_allocated=25 * gib, allocated=20 * gib,
                                 utilization=0.9) == int(0.9 * 80 * gib) - 25 * gib
    probe = FakeProbe(total=100, used=60, peak=20)
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.5 leaves no room for the KV cache"):
        sizing.profile_kv_cache_bytes(probe, lambda: None, 0.5)  # 50 allowed - 60 used - 20
    order: list[str] = []
    probe = FakeProbe(total=1000, used=100, peak=50)
    budget = sizing.profile_kv_cache_bytes(probe, lambda: order.append("run"), 0.9)
    assert budget == 900 - 100 - 50
    assert probe.calls == ["reset_peak", "peak_allocated", "release_cached", "mem_get_info"]


def test_the_engine_sizes_the_pool_from_the_probe(tiny_model_dir, monkeypatch):
    runs: list[tuple[int, int]] = []
    original = ModelRunner.profile_run

    def recorded(self, num_tokens, num_seqs):
        runs.append((num_tokens, num_seqs))
        original(self, num_tokens, num_seqs)
    monkeypatch.setattr(ModelRunner, "profile_run", recorded)
    per_block = kv_bytes_per_block(2, 2, 16, 16, torch.float32)  # the tiny model's layers, KV heads, head dim
    probe = FakeProbe(total=1000 * per_block, used=300 * per_block, peak=100 * per_block + 5)
    monkeypatch.setattr(sizing, "memory_probe", lambda device: probe)
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", max_num_batched_tokens=512, max_num_seqs=8,
                       gpu_memory_utilization=0.5)
    assert runs == [(512, 8)]
    assert engine.kv_cache.num_blocks == (500 - 300 - 100) * per_block // per_block - 1  # the 5 bytes cost one
    assert engine.stats()["num_kv_blocks"] == engine.kv_cache.num_blocks
    # a budget or a block count given outright is taken as it is: nothing is profiled
    runs.clear()
    probe.calls.clear()
    assert LLMEngine(model=tiny_model_dir, dtype="float32", kv_cache_memory=40 * per_block).kv_cache.num_blocks == 40
    assert LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=7).kv_cache.num_blocks == 7
    assert runs == [] and probe.calls == []


def test_without_a_probe_the_pool_takes_the_default_budget(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32")
    per_block = kv_bytes_per_block(2, 2, 16, 16, torch.float32)
    assert engine.kv_cache.num_blocks == (1 << 30) // per_block


def test_the_profiling_step_leaves_the_kv_cache_alone(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=16, max_model_len=64)
    engine.runner.profile_run(300, 2)  # 300 tokens over 2 rows: 5 sequences, none past the 64-token window
    assert all(not k.any() and not v.any() for k, v in engine.runner.kv_caches)


def test_gpu_memory_utilization_is_validated():
    from pagedserve.config import EngineConfig
    for bad in (0, 1.5, -0.1, "0.9"):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            EngineConfig(gpu_memory_utilization=bad)
