"""The `torch` attention backend: paged attention in plain torch, on any device; the reference for the others.

One call per layer writes the step's new K/V into the paged cache, then attends every sequence
through its block table. Device-agnostic: the same code runs on CPU and CUDA.

Decodes (one query token each, the first `num_decodes` sequences) never loop per sequence: they
are sorted by context length and cut into a few
tiles of about `DECODE_TILE_BYTES` of gathered K; each tile is one gather through the block tables
plus one masked `scaled_dot_product_attention`. Tiling keeps the gathered K/V cache-resident and
trims padding (a tile is only as wide as its own longest context); on 2 CPU cores it measured
1.5-5x faster than one gather over the whole batch. GQA is handled by viewing the query as
[S, Hkv, G, D], so K/V are never repeated per query head.

Prefill chunks (few and long) are attended one by one: a chunk starting at position 0 uses the
step's own K/V with a causal flag; a chunk with cached context gathers its context and uses an
offset causal mask.

Slots past a sequence's length are read and masked out, so the caches must hold finite values
(allocate them with torch.zeros, not torch.empty): a NaN there would leak through the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.attention.backend import AttentionBackend
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.device import to_device

# Gathered K bytes per decode tile on CPU (about 5.5k tokens for SmolLM2 in bfloat16). On other
# devices one tile holds the whole batch: big batched kernels beat cache locality there.
DECODE_TILE_BYTES = 2 << 20


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] -> the cache slots named by slot_mapping [T]. Caches: [N, B, Hkv, D]."""
    n, b, h, d = k_cache.shape
    k_cache.view(n * b, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(n * b, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class TorchBackend(AttentionBackend):
    name = "torch"

    @classmethod
    def unsupported(cls, device, dtype, head_size, block_size):
        return None

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self.decode(out[:nd], q[:nd], k_cache, v_cache, meta, scale)
        prefill_attention(out, q, k, v, k_cache, v_cache, meta, scale)
        return out

    def decode(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> None:
        """The first meta.num_decodes sequences, one query token each, into out."""
        nd = meta.num_decodes
        out.copy_(_decode_attention(q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                                    meta.seq_lens_list[:nd], scale))


def prefill_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> None:
    """The chunks after the decodes, one by one (they are few and long), into out."""
    start = meta.num_decodes  # decodes own the first num_decodes tokens
    for s in range(meta.num_decodes, meta.num_seqs):
        ql, seq_len = meta.query_lens_list[s], meta.seq_lens_list[s]
        end = start + ql
        if ql == seq_len:  # nothing cached before this chunk: its own K/V are the whole context
            ks = k[start:end].to(k_cache.dtype).to(q.dtype)
            vs = v[start:end].to(v_cache.dtype).to(q.dtype)
        else:
            ks = _gather(k_cache, meta.block_tables[s:s + 1], seq_len)[0, :seq_len].to(q.dtype)
            vs = _gather(v_cache, meta.block_tables[s:s + 1], seq_len)[0, :seq_len].to(q.dtype)
        out[start:end] = _prefill_attention(q[start:end], ks, vs, scale)
        start = end


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The layer op the model calls: meta's backend writes this step's K/V into the cache, then attends.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; caches: [N, block_size, Hkv, D]; returns [T, Hq, D].
    """
    return meta.backend.forward(q, k, v, k_cache, v_cache, meta, scale)


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], pairs: list[tuple[int, int]]) -> None:
    """Copy-on-write: copy whole blocks src -> dst in every layer's K and V cache."""
    if not pairs:
        return
    device = kv_caches[0][0].device
    src = to_device([p[0] for p in pairs], device)
    dst = to_device([p[1] for p in pairs], device)
    for k_cache, v_cache in kv_caches:
        k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
        v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


def decode_tiles(seq_lens: list[int], tile_tokens: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Split decode sequences into tiles of about tile_tokens padded K/V tokens each.

    Returns (order, tiles): order sorts the sequences by context length; each tile is
    (begin, end, width), the range [begin, end) of that order and its longest context.
    """
    order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
    tiles = []
    i = 0
    while i < len(order):
        j = i + 1  # ascending order: adding sequence j widens the tile to seq_lens[order[j]]
        while j < len(order) and (j + 1 - i) * seq_lens[order[j]] <= tile_tokens:
            j += 1
        tiles.append((i, j, seq_lens[order[j - 1]]))
        i = j
    return order, tiles


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, width: int) -> torch.Tensor:
    """cache [N, B, Hkv, D], block_tables [S, >= ceil(width / B)] -> [S, ceil(width / B) * B, Hkv, D]."""
    _, bs, h, d = cache.shape
    nb = (width + bs - 1) // bs
    ids = block_tables[:, :nb].reshape(-1)
    return cache.index_select(0, ids).view(block_tables.shape[0], nb * bs, h, d)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, seq_lens_list: list[int],
                      scale: float) -> torch.Tensor:
    """One query token per sequence. q: [S, Hq, D]; block_tables: [S, W]; seq_lens: [S]."""
    _, _, hkv, d = k_cache.shape
    if q.device.type == "cpu":
        tile_tokens = max(1, DECODE_TILE_BYTES // (hkv * d * k_cache.element_size()))
    else:
        tile_tokens = 1 << 62
    if len(seq_lens_list) * max(seq_lens_list) <= tile_tokens:
        return _decode_tile(q, k_cache, v_cache, block_tables, seq_lens, max(seq_lens_list), scale)
    order, tiles = decode_tiles(seq_lens_list, tile_tokens)
    perm = torch.tensor(order, dtype=torch.int64, device=q.device)
    q, block_tables, seq_lens = q.index_select(0, perm), block_tables.index_select(0, perm), seq_lens.index_select(0, perm)
    out = torch.empty_like(q)  # in sorted order
    for i, j, width in tiles:
        out[i:j] = _decode_tile(q[i:j], k_cache, v_cache, block_tables[i:j], seq_lens[i:j], width, scale)
    return torch.empty_like(out).index_copy_(0, perm, out)


def _decode_tile(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, width: int, scale: float) -> torch.Tensor:
    """Gather, mask and attend one tile of decodes. q: [S, Hq, D] -> [S, Hq, D]."""
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    ks = _gather(k_cache, block_tables, width).to(q.dtype).transpose(1, 2)  # [S, Hkv, L, D]
    vs = _gather(v_cache, block_tables, width).to(q.dtype).transpose(1, 2)
    mask = torch.arange(ks.shape[2], device=q.device) < seq_lens[:, None]  # [S, L]
    # The G query heads sharing a KV head play the role of query rows: no K/V repeat for GQA.
    o = F.scaled_dot_product_attention(q.reshape(s, hkv, hq // hkv, d), ks, vs,
                                       attn_mask=mask[:, None, None, :], scale=scale)  # [S, Hkv, G, D]
    return o.reshape(s, hq, d)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One chunk whose new tokens are the last ql of the context. q: [ql, Hq, D]; k, v: [L, Hkv, D]."""
    ql, hq, d = q.shape
    L, hkv, _ = k.shape
    g = hq // hkv
    # 4-D inputs reach the fused CPU kernel; the KV head is the batch dim, its G query heads the head dim,
    # and K/V are broadcast over G as stride-0 views instead of copies.
    qs = q.reshape(ql, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, ql, D]
    ks = k.transpose(0, 1)[:, None].expand(hkv, g, L, d)  # [Hkv, G, L, D]
    vs = v.transpose(0, 1)[:, None].expand(hkv, g, L, d)
    if ql == L:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
    else:  # query i sits at position L - ql + i and sees keys 0 ..= that position
        pos = torch.arange(L, device=q.device)
        mask = pos[None, :] <= pos[L - ql:, None]  # [ql, L]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
    return o.permute(2, 0, 1, 3).reshape(ql, hq, d)
