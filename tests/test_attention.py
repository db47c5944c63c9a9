"""Paged attention against a dense float64 reference over the un-paged K/V."""
from __future__ import annotations

import math

import pytest
import torch

from pagedserve.attention import AttentionMetadata, copy_blocks, paged_attention, select_backend, write_kv_cache
from pagedserve.attention import torch_backend
from pagedserve.attention.torch_backend import decode_tiles

HEAD_DIM = 16
NUM_KV_HEADS = 2


def make_batch(specs: list[tuple[int, int]], block_size: int, gqa: int, dtype: torch.dtype, seed: int,
               backend=None):
    """Sequences given as (cached_len, query_len), decodes first, on shuffled non-contiguous blocks.

    The cached part of each sequence is written straight into its blocks (not through the op under
    test); the caches start as random garbage so unmasked padding would show.
    Returns (q, k, v, k_cache, v_cache, meta, full_k, full_v).
    """
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = NUM_KV_HEADS * gqa, NUM_KV_HEADS, HEAD_DIM
    need = [math.ceil((c + n) / block_size) for c, n in specs]
    num_blocks = 2 * sum(need) + 3  # spare blocks, so tables are scattered over the pool
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in need:
        tables.append(pool[start:start + n])
        start += n
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    full_k = [torch.randn(c + n, hkv, d, generator=g).to(dtype) for c, n in specs]
    full_v = [torch.randn(c + n, hkv, d, generator=g).to(dtype) for c, n in specs]
    for (cached, _), table, fk, fv in zip(specs, tables, full_k, full_v):
        for pos in range(cached):
            k_cache[table[pos // block_size], pos % block_size] = fk[pos]
            v_cache[table[pos // block_size], pos % block_size] = fv[pos]
    k = torch.cat([fk[c:] for (c, _), fk in zip(specs, full_k)])
    v = torch.cat([fv[c:] for (c, _), fv in zip(specs, full_v)])
    q = torch.randn(k.shape[0], hq, d, generator=g).to(dtype)
    meta = AttentionMetadata.build(tables, [n for _, n in specs], [c + n for c, n in specs], block_size,
                                   backend=backend)
    return q, k, v, k_cache, v_cache, meta, full_k, full_v


def dense_reference(q, full_k, full_v, query_lens, scale):
    """Plain causal softmax attention in float64, sequence by sequence. Returns [T, Hq, D]."""
    outs, start = [], 0
    for fk, fv, ql in zip(full_k, full_v, query_lens):
        qs = q[start:start + ql].double()
        start += ql
        g = qs.shape[1] // fk.shape[1]
        ks, vs = fk.double().repeat_interleave(g, dim=1), fv.double().repeat_interleave(g, dim=1)
        L = ks.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        visible = torch.arange(L)[None, :] <= torch.arange(L - ql, L)[:, None]  # [ql, L]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs))
    return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(params=["cpu", "torch", "triton"])
def backend(request):
    """Run a test through each attention backend that runs here: the fused C decode kernel, plain torch,
    and the Triton kernels under Triton's interpreter (conftest.py)."""
    return select_backend(request.param, "cpu", torch.float32, HEAD_DIM, 16)


# (cached_len, query_len): decodes at lengths off block boundaries, prefills from position 0,
# and prefills on top of cached context (prefix hit or an earlier chunk).
MIXED = [(0, 1), (16, 1), (36, 1), (5, 1), (70, 1), (0, 23), (0, 1), (17, 9), (32, 40), (3, 1), (64, 16)]


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
@pytest.mark.parametrize("gqa", [1, 3])
def test_mixed_batch_matches_dense_reference(block_size, gqa, backend):
    q, k, v, kc, vc, meta, fk, fv = make_batch(MIXED, block_size, gqa, torch.float32, seed=block_size * 10 + gqa, backend=backend)
    assert meta.num_decodes == 5
    scale = HEAD_DIM ** -0.5
    out = paged_attention(q, k, v, kc, vc, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, scale)) < 1e-5


@pytest.mark.parametrize("specs", [
    [(c, 1) for c in (0, 3, 15, 16, 17, 40, 99, 7)],  # decode only
    [(0, 33)],  # one prefill from position 0
    [(45, 19), (0, 8)],  # prefill only, the first on cached context
])
def test_decode_only_and_prefill_only_batches(specs, backend):
    q, k, v, kc, vc, meta, fk, fv = make_batch(specs, 8, 3, torch.float32, seed=len(specs), backend=backend)
    out = paged_attention(q, k, v, kc, vc, meta, 0.3)
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.3)) < 1e-5


def test_tiled_decode_matches_reference(monkeypatch):
    # A tiny tile budget forces the torch path's sorted multi-tile decode, including tiles of one sequence.
    monkeypatch.setattr(torch_backend, "DECODE_TILE_BYTES", 40 * NUM_KV_HEADS * HEAD_DIM * 4)
    lens = [37, 3, 90, 12, 12, 55, 1, 64, 20, 41]
    specs = [(n - 1, 1) for n in lens] + [(10, 6)]
    q, k, v, kc, vc, meta, fk, fv = make_batch(specs, 16, 3, torch.float32, seed=7)
    out = paged_attention(q, k, v, kc, vc, meta, 0.25)
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.25)) < 1e-5


def test_decode_tiles_cover_sorted_within_budget():
    lens = [37, 3, 90, 12, 12, 55, 1, 64, 20, 41]
    order, tiles = decode_tiles(lens, 100)
    assert sorted(order) == list(range(len(lens)))
    assert [lens[i] for i in order] == sorted(lens)
    assert tiles[0][0] == 0 and tiles[-1][1] == len(lens)
    for (b, e, width), nxt in zip(tiles, tiles[1:] + [(len(lens),)]):
        assert e == nxt[0] and e > b
        assert width == max(lens[i] for i in order[b:e])
        assert (e - b) * width <= 100 or e - b == 1
    assert decode_tiles(lens, 10**6)[1] == [(0, len(lens), 90)]


def test_bfloat16_close_to_reference(backend):
    q, k, v, kc, vc, meta, fk, fv = make_batch(MIXED, 16, 3, torch.bfloat16, seed=3, backend=backend)
    out = paged_attention(q, k, v, kc, vc, meta, HEAD_DIM ** -0.5)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, HEAD_DIM ** -0.5)) < 2e-2


def test_strided_query_from_fused_projection(backend):
    # The model may hand q/k/v as views into one fused QKV output.
    q, k, v, kc, vc, meta, fk, fv = make_batch(MIXED, 8, 3, torch.float32, seed=11, backend=backend)
    fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)  # [T, (Hq + 2 Hkv) D]
    hq_d, hkv_d = q[0].numel(), k[0].numel()
    qv = fused[:, :hq_d].view(q.shape)
    kv_ = fused[:, hq_d:hq_d + hkv_d].view(k.shape)
    vv = fused[:, hq_d + hkv_d:].view(v.shape)
    out = paged_attention(qv, kv_, vv, kc, vc, meta, 0.2)
    assert rel_err(out, dense_reference(q, fk, fv, meta.query_lens_list, 0.2)) < 1e-5


def test_write_kv_cache_lands_at_slots():
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.zeros(6, 4, 2, 3), torch.zeros(6, 4, 2, 3)
    slots = torch.tensor([13, 0, 22, 7, 5])  # block * 4 + offset, any order
    k, v = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    write_kv_cache(k, v, kc, vc, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(kc[s // 4, s % 4], k[i]) and torch.equal(vc[s // 4, s % 4], v[i])
    written = torch.zeros(24, dtype=torch.bool)
    written[slots] = True
    assert not kc.view(24, -1)[~written].any() and not vc.view(24, -1)[~written].any()


def test_write_kv_cache_casts_to_cache_dtype():
    kc, vc = torch.zeros(2, 2, 1, 4, dtype=torch.bfloat16), torch.zeros(2, 2, 1, 4, dtype=torch.bfloat16)
    k = torch.full((1, 1, 4), 1.5)
    write_kv_cache(k, -k, kc, vc, torch.tensor([3]))
    assert kc.dtype == torch.bfloat16 and kc[1, 1].tolist() == [[1.5] * 4] and vc[1, 1].tolist() == [[-1.5] * 4]


def test_copy_blocks_copies_every_layer():
    g = torch.Generator().manual_seed(1)
    layers = [(torch.randn(5, 4, 2, 3, generator=g), torch.randn(5, 4, 2, 3, generator=g)) for _ in range(3)]
    before = [(kc.clone(), vc.clone()) for kc, vc in layers]
    copy_blocks(layers, [(1, 3), (4, 0)])
    for (kc, vc), (k0, v0) in zip(layers, before):
        for cache, old in ((kc, k0), (vc, v0)):
            assert torch.equal(cache[3], old[1]) and torch.equal(cache[0], old[4])
            assert torch.equal(cache[[1, 2, 4]], old[[1, 2, 4]])
    copy_blocks(layers, [])  # no pairs: a no-op
    assert torch.equal(layers[0][0][3], before[0][0][1])
