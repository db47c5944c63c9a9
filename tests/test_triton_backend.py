"""The `triton` attention backend under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1): its kernels
against the dense reference and the `torch` backend, on the shapes the CUDA path meets at small sizes.

test_attention.py runs the shared cases (mixed batches, block sizes 1-32, GQA and MHA, bfloat16, strided q)
through it as well; here are the cases only this backend has: the flash-decoding split, query chunks longer
than one program's tile, padded rows of a CUDA-graph batch, and the engine end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve.attention import AttentionMetadata, TorchBackend, paged_attention, select_backend
from pagedserve.attention.triton_backend import TritonBackend, interpreted
from pagedserve.engine import LLMEngine
from test_attention import HEAD_DIM, MIXED, dense_reference, make_batch, rel_err
from test_execution import OPTIONS, _prompts, _run

pytestmark = pytest.mark.skipif(not interpreted(), reason="these run Triton's kernels on the CPU, interpreted")

# Always split: a target of many programs, and any context over 32 tokens is worth a split.
SPLITTING = dict(target_programs=1024, split_tokens=32)


def test_the_interpreter_runs_the_backend_on_cpu():
    assert select_backend("triton", "cpu", torch.float32, HEAD_DIM, 16).name == "triton"
    assert select_backend("auto", "cpu", torch.float32, HEAD_DIM, 16).name != "triton"  # CPU's own stay first


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_flash_decoding_split_matches_the_reference(block_size, gqa):
    # Long contexts over many blocks, ragged, one of them a single token; a prefill chunk after them.
    lens = [300, 17, 1, 129, 64, 250, 33]
    specs = [(n - 1, 1) for n in lens] + [(40, 30)]
    backend = TritonBackend(**SPLITTING)
    q, k, v, kc, vc, meta, fk, fv = make_batch(specs, block_size, gqa, torch.float32, seed=gqa, backend=backend)
    splits = backend.num_splits(meta.num_decodes, kc.shape[2], max(lens), q.device)
    assert splits == 16  # ceil(300 / 32) = 10, rounded up to a power of two: some rows have empty splits
    out = paged_attention(q, k, v, kc, vc, meta, 0.2)
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.2)) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("split", [False, True])
def test_half_precision_close_to_the_torch_backend(dtype, tol, split):
    specs = [(n - 1, 1) for n in (200, 5, 90)] + MIXED[5:]
    backend = TritonBackend(**SPLITTING) if split else TritonBackend()
    q, k, v, kc, vc, meta, fk, fv = make_batch(specs, 16, 3, dtype, seed=5, backend=backend)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = paged_attention(q, k, v, kc, vc, meta, HEAD_DIM ** -0.5)
    meta.backend = TorchBackend()
    ref = paged_attention(q, k, v, kc_ref, vc_ref, meta, HEAD_DIM ** -0.5)
    assert out.dtype == dtype
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # the same K/V written, bit for bit
    assert rel_err(out, ref.double()) < tol


@pytest.mark.parametrize("gqa", [1, 3])
def test_chunks_longer_than_one_program(gqa):
    # 64 // gqa query rows per program: these chunks span several programs, with and without cached context.
    specs = [(0, 1), (0, 150), (70, 90), (3, 2)]
    q, k, v, kc, vc, meta, fk, fv = make_batch(specs, 16, gqa, torch.float32, seed=9, backend=TritonBackend())
    out = paged_attention(q, k, v, kc, vc, meta, 0.3)
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.3)) < 1e-5


@pytest.mark.parametrize("split", [False, True])
def test_padded_graph_rows_write_nothing_and_leave_real_rows_alone(split):
    # A CUDA-graph batch padded from 3 rows to 4: the pad row has slot -1, length 0, the null block's table.
    backend = TritonBackend(**SPLITTING) if split else TritonBackend()
    specs = [(100, 1), (7, 1), (60, 1)]
    q, k, v, kc, vc, meta, fk, fv = make_batch(specs, 16, 3, torch.float32, seed=4, backend=backend)
    want = paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.2)
    null = kc.shape[0] - 1
    tables = torch.full((4, meta.block_tables.shape[1]), null, dtype=torch.int64)
    tables[:3] = meta.block_tables
    padded = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.tensor([-1])]), block_tables=tables,
        query_start_loc=torch.arange(5), seq_lens=torch.cat([meta.seq_lens, torch.tensor([0])]),
        query_lens_list=[1] * 4, seq_lens_list=meta.seq_lens_list + [0], num_decodes=4, block_size=16,
        backend=backend)
    pad = lambda t: torch.cat([t, torch.full_like(t[:1], 7.0)])  # noqa: E731
    kc_before, vc_before = kc.clone(), vc.clone()
    out = paged_attention(pad(q), pad(k), pad(v), kc, vc, padded, 0.2)
    assert torch.equal(out[:3], want)
    assert torch.isfinite(out[3]).all()
    changed = (kc != kc_before).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(changed) <= {s // 16 for s in meta.slot_mapping.tolist()}  # only the real rows' new K landed
    assert torch.equal(kc[null], kc_before[null]) and torch.equal(vc[null], vc_before[null])


def test_the_engine_gives_the_torch_backends_greedy_tokens(tiny_model_dir):
    prompts = _prompts(5, seed=2)
    # a small step budget mixes decodes and prefill chunks in one step; prefix caching shares blocks
    runs = {name: _run(LLMEngine(model=tiny_model_dir, attention_backend=name, max_num_batched_tokens=40, **OPTIONS),
                       prompts + prompts[:1]) for name in ("torch", "triton")}
    assert runs["triton"] == runs["torch"]


def test_every_kernel_compiles_for_a_gpu(tmp_path):
    # The interpreter runs code the compiler rejects; Triton's compiler and ptxas run here without a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")  # a fresh cache: nothing reused
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile_check.py"))], env=env,
                            capture_output=True, text=True, timeout=600)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(lines) == 17 and all(line.endswith(" OK") for line in lines), lines
