"""The fused CPU decode-attention kernel against a float64 dense reference, its routing and its fallbacks."""
from __future__ import annotations

import logging
import math
import os
import signal
import time

import pytest
import torch
from test_attention import MIXED, dense_reference, make_batch, rel_err

from pagedserve import native
from pagedserve.attention import cpu_kernel, paged_attention, select_backend, torch_backend


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    # The C compiler is part of the supported setup (CI included): a kernel that does not build is a failure here.
    assert cpu_kernel.load_library() is not None


def decode_batch(lens: list[int], block_size: int, hkv: int, gqa: int, d: int, dtype: torch.dtype, seed: int,
                 cache_dtype: torch.dtype | None = None):
    """Decodes with context lengths `lens` on shuffled, non-contiguous blocks of random-garbage caches.

    Returns (q [S, Hq, D], k_cache, v_cache, block_tables, seq_lens, full_k, full_v), full_k/v[s]: [L, Hkv, D].
    """
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    need = [math.ceil(n / block_size) for n in lens]
    num_blocks = 2 * sum(need) + 3
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(cache_dtype)
    full_k, full_v, start = [], [], 0
    for i, n in enumerate(lens):
        ids = pool[start:start + need[i]]
        start += need[i]
        tables[i, :len(ids)] = torch.tensor(ids)
        fk = torch.randn(n, hkv, d, generator=g).to(cache_dtype)
        fv = torch.randn(n, hkv, d, generator=g).to(cache_dtype)
        for t in range(n):
            k_cache[ids[t // block_size], t % block_size] = fk[t]
            v_cache[ids[t // block_size], t % block_size] = fv[t]
        full_k.append(fk)
        full_v.append(fv)
    q = torch.randn(len(lens), hkv * gqa, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens), full_k, full_v


def run_kernel(q, kc, vc, tables, seq_lens, scale, num_threads=None):
    out = torch.empty_like(q)
    cpu_kernel.decode_attention(out, q, kc, vc, tables, seq_lens, scale, num_threads)
    return out


LENS = [1, 3, 15, 16, 17, 40, 99, 7, 33, 260]  # off and on block boundaries


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_dense_reference(block_size, gqa, dtype, tol):
    q, kc, vc, tables, seq_lens, fk, fv = decode_batch(LENS, block_size, 2, gqa, 64, dtype, seed=block_size + gqa)
    out = run_kernel(q, kc, vc, tables, seq_lens, 0.125)
    assert out.dtype == dtype
    assert rel_err(out, dense_reference(q, fk, fv, [1] * len(LENS), 0.125)) < tol


@pytest.mark.parametrize("d", [3, 16, 20, 80, 128])  # partial vector chunks and several of them
@pytest.mark.parametrize("gqa", [2, 5, 8])  # query heads per KV head: 1..4 per inner pass, and more
def test_head_dims_and_group_sizes(d, gqa):
    q, kc, vc, tables, seq_lens, fk, fv = decode_batch([5, 50, 21], 16, 2, gqa, d, torch.float32, seed=d * gqa)
    out = run_kernel(q, kc, vc, tables, seq_lens, d ** -0.5)
    assert rel_err(out, dense_reference(q, fk, fv, [1, 1, 1], d ** -0.5)) < 1e-5


def test_float32_query_on_bfloat16_cache():
    q, kc, vc, tables, seq_lens, fk, fv = decode_batch(LENS, 16, 3, 3, 64, torch.float32, seed=5,
                                                       cache_dtype=torch.bfloat16)
    out = run_kernel(q, kc, vc, tables, seq_lens, 0.125)
    assert out.dtype == torch.float32
    assert rel_err(out, dense_reference(q, fk, fv, [1] * len(LENS), 0.125)) < 1e-5  # the cache values are exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_of_one_returns_its_value_row(dtype):
    q, kc, vc, tables, seq_lens, _, fv = decode_batch([1, 1], 4, 2, 3, 64, dtype, seed=2)
    out = run_kernel(q, kc, vc, tables, seq_lens, 0.125)
    for s in range(2):  # softmax over one key is 1: the output is V[0], exactly
        assert torch.equal(out[s], fv[s][0].repeat_interleave(3, dim=0))


def test_strided_query_and_output():
    q, kc, vc, tables, seq_lens, fk, fv = decode_batch(LENS, 16, 3, 3, 64, torch.float32, seed=9)
    s, hq, d = q.shape
    fused = torch.randn(s, (hq + 2 * 3) * d)  # q as the model hands it: a view into the fused QKV output
    fused[:, :hq * d] = q.flatten(1)
    qv = fused[:, :hq * d].view(s, hq, d)
    assert not qv.is_contiguous()
    wide = torch.zeros(s, hq, 2 * d)
    out = wide[:, :, :d]  # a strided output
    cpu_kernel.decode_attention(out, qv, kc, vc, tables, seq_lens, 0.125)
    assert torch.equal(out, run_kernel(q, kc, vc, tables, seq_lens, 0.125))
    assert not wide[:, :, d:].any()
    assert rel_err(out, dense_reference(q, fk, fv, [1] * s, 0.125)) < 1e-5


def test_thread_split_does_not_change_results():
    # Enough work for several threads; ranges then split sequences between their KV heads.
    lens = [700, 3, 1200, 450, 90, 1000, 17, 640]
    q, kc, vc, tables, seq_lens, fk, fv = decode_batch(lens, 16, 3, 3, 64, torch.bfloat16, seed=4)
    one = run_kernel(q, kc, vc, tables, seq_lens, 0.125, num_threads=1)
    for n in (2, 3, 5):
        assert torch.equal(run_kernel(q, kc, vc, tables, seq_lens, 0.125, num_threads=n), one)
    assert rel_err(one, dense_reference(q, fk, fv, [1] * len(lens), 0.125)) < 2e-2


def test_the_cpu_backend_routes_decodes_to_the_kernel(monkeypatch):
    calls = []
    real = cpu_kernel.decode_attention
    monkeypatch.setattr(cpu_kernel, "decode_attention", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    monkeypatch.setattr(torch_backend, "_decode_attention", None)  # the torch decode path must not run
    cpu = select_backend("cpu", "cpu", torch.float32, 16, 16)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v, kc, vc, meta, fk, fv = make_batch(MIXED, 16, 3, dtype, seed=21, backend=cpu)
        out = paged_attention(q, k, v, kc, vc, meta, 0.25)
        assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.25)) < tol
    assert calls == [(meta.num_decodes, *q.shape[1:])] * 2


def test_the_torch_backend_never_calls_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "decode_attention", None)  # would raise if called
    q, k, v, kc, vc, meta, fk, fv = make_batch(MIXED, 8, 3, torch.float32, seed=22,
                                               backend=select_backend("torch", "cpu", torch.float32, 16, 8))
    out = paged_attention(q, k, v, kc, vc, meta, 0.25)
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.25)) < 1e-5


def test_the_kernel_is_a_torch_operator_the_profiler_sees():
    lens = [40, 90, 300]
    q, kc, vc, tables, seq_lens, fk, fv = decode_batch(lens, 16, 3, 3, 64, torch.float32, seed=9)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run_kernel(q, kc, vc, tables, seq_lens, 0.125)
    assert "pagedserve::paged_decode" in {e.key for e in prof.key_averages()}
    assert rel_err(out, dense_reference(q, fk, fv, [1] * len(lens), 0.125)) < 1e-5


def test_only_cpu_float_tensors_are_supported():
    cpu = torch.zeros(2, 3, 4)
    assert cpu_kernel.supports(cpu, cpu)
    assert not cpu_kernel.supports(torch.zeros(2, 3, 4, device="meta"), cpu)
    assert not cpu_kernel.supports(cpu, torch.zeros(2, 3, 4, device="meta"))
    assert not cpu_kernel.supports(cpu.half(), cpu)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no loaded library; the real one is reloaded (from its cache) afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernel.load_library.cache_clear()
    yield tmp_path
    cpu_kernel.load_library.cache_clear()


def test_build_is_cached_per_machine(fresh_build, monkeypatch):
    so = native.build(cpu_kernel.SOURCE, native.compiler(), native.cache_dir())
    assert so.parent == fresh_build / "pagedserve" / "kernels" and so.suffix == ".so"
    assert [p.name for p in so.parent.iterdir()] == [so.name]  # no temporary left behind
    monkeypatch.setattr(native.subprocess, "run", None)  # a second build must not compile again
    assert native.build(cpu_kernel.SOURCE, native.compiler(), native.cache_dir()) == so
    assert cpu_kernel.load_library() is not None


def test_compile_failure_falls_back_with_one_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    caplog.set_level(logging.WARNING, logger=cpu_kernel.__name__)
    q, k, v, kc, vc, meta, fk, fv = make_batch(MIXED, 16, 3, torch.float32, seed=23)
    for _ in range(2):
        out = paged_attention(q, k, v, kc, vc, meta, 0.25)  # meta's default backend: torch
        assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.25)) < 1e-5
    assert not cpu_kernel.supports(q, kc)
    assert select_backend("auto", "cpu", torch.float32, 16, 16).name == "torch"
    with pytest.raises(ValueError, match="did not build"):
        select_backend("cpu", "cpu", torch.float32, 16, 16)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "torch path" in caplog.records[0].getMessage()
    assert not any((fresh_build / "pagedserve" / "kernels").iterdir())  # the failed build's temporary is gone


def test_missing_compiler_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cpu_kernel.load_library() is None
    cpu = torch.zeros(2, 3, 4)
    assert not cpu_kernel.supports(cpu, cpu)


def test_threaded_calls_survive_fork():
    # The kernel's threads are torch's OpenMP team; a forked child (a server worker, a DataLoader) has
    # none of the parent's threads and must still finish a threaded call instead of waiting forever.
    lens = [400, 900, 650, 300]
    q, kc, vc, tables, seq_lens, *_ = decode_batch(lens, 16, 3, 3, 64, torch.float32, seed=6)
    expected = run_kernel(q, kc, vc, tables, seq_lens, 0.125, num_threads=3)  # starts the pool here
    out = torch.zeros_like(q)
    pid = os.fork()
    if pid == 0:  # child: only the kernel runs here (no torch ops, whose OpenMP pool does not survive fork)
        cpu_kernel.decode_attention(out, q, kc, vc, tables, seq_lens, 0.125, num_threads=3)
        os._exit(0 if torch.equal(out, expected) else 1)
    deadline = time.monotonic() + 30
    while (res := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if res == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert res[0] == pid and os.waitstatus_to_exitcode(res[1]) == 0


def test_the_kernel_shares_torchs_openmp_runtime():
    """Built with -fopenmp, the kernel must bind to the libgomp torch loaded (same soname), not a second one."""
    assert cpu_kernel.available()
    assert len(native.openmp_runtimes()) == 1
