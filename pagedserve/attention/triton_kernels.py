"""The Triton kernels of the `triton` attention backend (triton_backend.py launches them).

- `write_kv`: a step's new K/V into the paged cache at the slot mapping; a negative slot (a padded row
  of a CUDA-graph batch) writes nothing.
- `varlen_attention`: one kernel for every sequence of a step, decode rows and prefill chunks with or
  without cached context alike. A program takes one tile of BLOCK_Q query tokens of one sequence and
  one KV head, whose G query heads it stacks as BLOCK_Q * G rows (GQA without repeating K/V); it walks
  the context TILE_N key positions at a time, reading each position's page through the block table,
  with an online softmax, causal within the chunk.
- `decode_split` + `merge_splits`: flash-decoding for few sequences with long contexts: each decode row's
  context is cut into NUM_SPLITS ranges attended by separate programs, whose partial results (the
  unnormalised output, the running max and sum) are merged by a second kernel.

Every shape a program needs from the batch (which sequence, its lengths, how many tiles) is read from
device tensors, never passed as a Python number, so a CUDA graph captured once replays any batch of the
same size. Scores run in float32 in base 2 (exp2 with the scale folded in).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Starting running max: finite, so a row that sees no key (a padded row, an empty split) gets
# exp2(-inf - NEG_BIG) = 0 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)  # compiled kernels read only constexpr globals (the interpreter lets any through)


@triton.jit
def write_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
             stride_kt, stride_kh, stride_vt, stride_vh,
             HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr):
    """One program per token: k[t], v[t] ([Hkv, D], any strides) -> the contiguous caches' slot row."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, ROW_P)
        mask = offs < ROW
        head, d = offs // HEAD_DIM, offs % HEAD_DIM
        k = tl.load(k_ptr + t * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + d, mask=mask)
        dst = slot.to(tl.int64) * ROW + offs
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, seq_len,
            first_tile, end_tile, scale_log2, stride_cb, stride_co, stride_ch,
            BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
            DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """Online softmax of rows q [M, D] (row r sits at position q_pos[r]; -1: a row that sees nothing) over
    the key tiles [first_tile, end_tile) of one sequence. Returns the updated (acc, m_i, l_i).
    DOT_F32: multiply in float32 (Triton's interpreter reads bfloat16 operands of tl.dot as integers)."""
    if DOT_F32:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM
    for tile in range(first_tile, end_tile):
        pos = tile * TILE_N + offs_n  # key positions [TILE_N]
        in_seq = pos < seq_len
        page = tl.load(table_ptr + pos // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
        row = page * stride_cb + (pos % BLOCK_SIZE) * stride_co + kv_head * stride_ch
        kv_mask = in_seq[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [TILE_N, D]
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, TILE_N]
        s = tl.where((pos[None, :] <= q_pos[:, None]) & in_seq[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["first_seq", "end_seq"])
def varlen_attention(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr,
                     first_seq, end_seq, scale_log2,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_tab, stride_cb, stride_co, stride_ch,
                     G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """Grid (query tiles, Hkv) over sequences [first_seq, end_seq). Sequence s owns the program slots
    [start(s), start(s + 1)) with start(s) = (qsl[s] - qsl[first_seq]) // BLOCK_Q + s - first_seq: at least
    the cdiv(query_len, BLOCK_Q) it needs, so a grid of T // BLOCK_Q + S slots covers every sequence
    without the host knowing the query lengths; a slot past its sequence's last tile exits at once."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    base = tl.load(qsl_ptr + first_seq)
    lo = first_seq  # binary search: the last sequence with start(s) <= pid
    hi = end_seq
    while lo < hi - 1:
        mid = (lo + hi) // 2
        start_mid = (tl.load(qsl_ptr + mid) - base) // BLOCK_Q + mid - first_seq
        lo = tl.where(start_mid <= pid, mid, lo)
        hi = tl.where(start_mid <= pid, hi, mid)
    seq = lo
    q_begin = tl.load(qsl_ptr + seq)
    query_len = tl.load(qsl_ptr + seq + 1) - q_begin
    q0 = (pid - ((q_begin - base) // BLOCK_Q + seq - first_seq)) * BLOCK_Q
    if q0 >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - query_len  # tokens cached before this chunk

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    tok = q0 + offs_m // G  # the row's token within the chunk
    head = kv_head * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (tok < query_len)
    q_pos = tl.where(row_ok, context + tok, -1)
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + (q_begin + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=io_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    last = tl.minimum(context + q0 + BLOCK_Q, seq_len)  # the tile's last row sees keys < last
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr,
                            tables_ptr + seq.to(tl.int64) * stride_tab, kv_head, seq_len,
                            0, tl.cdiv(last, TILE_N), scale_log2, stride_cb, stride_co, stride_ch,
                            BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_DIM_P, DOT_PRECISION, DOT_F32)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_begin + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def decode_split(part_acc_ptr, part_ml_ptr, q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr,
                 scale_log2, stride_qt, stride_qh, stride_tab, stride_cb, stride_co, stride_ch,
                 NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_P: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """Grid (decode rows, Hkv, NUM_SPLITS): split `split` of row `seq`'s key tiles for the G query heads of
    one KV head. Writes part_acc [S, Hq, NUM_SPLITS, HEAD_DIM_P] (unnormalised) and part_ml
    [S, Hq, NUM_SPLITS, 2] (running max, sum); an empty split leaves (NEG_BIG, 0)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    first = split * per_split
    end = tl.minimum(first + per_split, num_tiles)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    row_ok = offs_m < G
    head = kv_head * G + offs_m
    q_pos = tl.where(row_ok, seq_len - 1, -1)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr,
                            tables_ptr + seq.to(tl.int64) * stride_tab, kv_head, seq_len,
                            first, end, scale_log2, stride_cb, stride_co, stride_ch,
                            BLOCK_SIZE, TILE_N, HEAD_DIM, HEAD_DIM_P, DOT_PRECISION, DOT_F32)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def merge_splits(out_ptr, part_acc_ptr, part_ml_ptr, stride_ot, stride_oh,
                 NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """Grid (decode rows, Hq): the softmax-weighted sum of a row's splits -> out[seq, head]."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    s_mask = offs_s < NUM_SPLITS
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=NEG_BIG)
    l_ = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(l_ * w, 0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
