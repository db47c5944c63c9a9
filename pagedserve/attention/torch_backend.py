"""Paged attention in plain torch: the CPU backend and the reference for faster ones.

FIRST DRAFT (correct, slow): loops over sequences. To be replaced by a batched version.
"""
from __future__ import annotations

import torch

from pagedserve.attention.metadata import AttentionMetadata


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> the cache slots named by slot_mapping. Caches: [N, B, Hkv, D]."""
    n, b, h, d = k_cache.shape
    k_cache.view(n * b, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(n * b, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend through the block tables.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; returns [T, Hq, D].
    """
    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    n, bs, hkv, d = k_cache.shape
    hq = q.shape[1]
    for s in range(meta.num_seqs):
        q0, q1 = int(meta.query_start_loc[s]), int(meta.query_start_loc[s + 1])
        L = meta.seq_lens_list[s]
        nb = (L + bs - 1) // bs
        blocks = meta.block_tables[s, :nb]
        ks = k_cache[blocks].reshape(nb * bs, hkv, d)[:L]
        vs = v_cache[blocks].reshape(nb * bs, hkv, d)[:L]
        ks = ks.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, L, D]
        vs = vs.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        qs = q[q0:q1].transpose(0, 1)  # [Hq, ql, D]
        ql = q1 - q0
        qpos = torch.arange(L - ql, L).unsqueeze(1)
        mask = torch.arange(L).unsqueeze(0) <= qpos  # [ql, L]
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks.to(q.dtype), vs.to(q.dtype), attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1)
    return out


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], pairs: list[tuple[int, int]]) -> None:
    """Copy-on-write: copy whole blocks src -> dst in every layer's K and V cache."""
    if not pairs:
        return
    src = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    for k_cache, v_cache in kv_caches:
        k_cache.index_copy_(0, dst.to(k_cache.device), k_cache.index_select(0, src.to(k_cache.device)))
        v_cache.index_copy_(0, dst.to(v_cache.device), v_cache.index_select(0, src.to(v_cache.device)))
