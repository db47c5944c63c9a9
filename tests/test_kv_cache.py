"""The block pool and KV cache manager: exact block ids, ref counts and free-queue order."""
import pytest

from pagedserve.kv_cache import BlockPool, CachedPrefix, FreeBlockQueue, InvariantError, KVCacheBlock, KVCacheManager, hash_block
from pagedserve.request import Request
from pagedserve.sampling_params import SamplingParams

B = 4


def req(rid, tokens, max_tokens=8, salt=None):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), cache_salt=salt)


def admit(m, r):
    """What the scheduler does for a waiting request: prefix lookup, then allocate the rest."""
    prefix = m.get_computed_blocks(r)
    n = prefix.num_tokens
    ids = m.allocate_slots(r, r.num_tokens - n, prefix)
    if ids is not None:  # the step ran: its K/V are written, its full blocks become findable
        r.num_computed_tokens = r.num_tokens
        m.cache_blocks(r)
    return ids, n


def decode(m, r, token):
    r.append_output_token(token)
    ids = m.allocate_slots(r, 1)
    if ids is not None:
        r.num_computed_tokens += 1
        m.cache_blocks(r)
    return ids


def refs(m):
    return [b.ref_cnt for b in m.pool.blocks]


def test_free_queue_pop_append_remove_middle():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.ids() == [0, 1, 2, 3, 4]
    assert q.popleft() is blocks[0]
    q.remove(blocks[2])
    assert q.ids() == [1, 3, 4] and len(q) == 3
    q.append(blocks[0])
    q.append(blocks[2])
    assert q.ids() == [1, 3, 4, 0, 2]
    with pytest.raises(ValueError):
        q.remove(KVCacheBlock(9))
    for _ in range(5):
        q.popleft()
    with pytest.raises(IndexError):
        q.popleft()


def test_allocate_and_free_tail_first():
    m = KVCacheManager(num_blocks=8, block_size=B)
    r = req("a", range(10))  # 10 tokens: 3 blocks, the last one half full
    ids, hit = admit(m, r)
    assert (ids, hit) == ([0, 1, 2], 0)
    assert refs(m) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert m.pool.free_queue.ids() == [3, 4, 5, 6, 7]
    # the two full blocks are cached, the partial one is not
    assert [b.block_hash is not None for b in m.pool.blocks[:3]] == [True, True, False]
    assert decode(m, r, 100) == [] and decode(m, r, 101) == []  # fills block 2 (12 tokens)
    assert m.pool.blocks[2].block_hash is not None
    assert decode(m, r, 102) == [3]
    m.check_invariants([r])
    m.free(r)
    # tail first: block 3 (newest) is appended first, so it is evicted first
    assert m.pool.free_queue.ids() == [4, 5, 6, 7, 3, 2, 1, 0]
    assert refs(m) == [0] * 8
    m.check_invariants()


def test_prefix_hit_shares_blocks_and_counts_tokens():
    m = KVCacheManager(num_blocks=10, block_size=B)
    a = req("a", range(12))
    admit(m, a)
    b = req("b", list(range(8)) + [50, 51, 52])
    ids, hit = admit(m, b)
    assert hit == 8 and ids == [3]  # blocks 0 and 1 shared, one new block for 3 tokens
    assert m.get_block_ids("b") == [0, 1, 3]
    assert refs(m)[:4] == [2, 2, 1, 1]
    assert m.prefix_cache_queries == 12 + 11 and m.prefix_cache_hits == 8
    m.check_invariants([a, b])
    # a full-prompt hit still leaves the last token to compute
    c = req("c", range(12))
    prefix = m.get_computed_blocks(c)
    assert prefix.num_tokens == 8 and [h.block_id for h in prefix.blocks] == [0, 1]


def test_cache_salt_isolates():
    m = KVCacheManager(num_blocks=10, block_size=B)
    admit(m, req("a", range(12), salt="tenant-1"))
    assert m.get_computed_blocks(req("b", range(12), salt="tenant-2")).num_tokens == 0
    assert m.get_computed_blocks(req("c", range(12))).num_tokens == 0
    assert m.get_computed_blocks(req("d", range(12), salt="tenant-1")).num_tokens == 8


def test_lazy_eviction_lru_order():
    m = KVCacheManager(num_blocks=6, block_size=B)
    a = req("a", range(9))  # blocks 0,1 full and cached, block 2 partial
    admit(m, a)
    m.free(a)
    assert m.pool.free_queue.ids() == [3, 4, 5, 2, 1, 0]
    assert len(m.pool.cached_blocks) == 2  # still findable after free
    # a hit takes the cached blocks back out of the middle of the free queue
    b = req("b", list(range(8)) + [7, 7])
    ids, hit = admit(m, b)
    assert hit == 8 and ids == [3]
    assert m.pool.free_queue.ids() == [4, 5, 2]
    m.free(b)
    # a new request evicts from the head: blocks 4, 5 (never cached), then 2
    c = req("c", range(100, 112))
    ids, _ = admit(m, c)
    assert ids == [4, 5, 2] and m.pool.num_evictions == 0
    d = req("d", range(200, 205))
    ids, _ = admit(m, d)
    # free queue was [3, 1, 0] (b's tail 3 then its shared prefix 1, 0): 3 goes, then 1 (cached: evicted)
    assert ids == [3, 1] and m.pool.num_evictions == 1
    assert m.get_computed_blocks(req("e", range(9))).num_tokens == 4  # block 0 survived, block 1 was evicted
    m.check_invariants([c, d])


def test_full_pool_returns_none_and_changes_nothing():
    m = KVCacheManager(num_blocks=3, block_size=B)
    a = req("a", range(8))
    admit(m, a)
    before = (refs(m), m.pool.free_queue.ids())
    b = req("b", range(50, 59))  # needs 3 blocks, 1 free
    assert m.allocate_slots(b, 9) is None
    assert (refs(m), m.pool.free_queue.ids()) == before
    assert "b" not in m.req_to_blocks
    m.check_invariants([a])


def test_blocks_are_findable_only_after_their_step_completed():
    m = KVCacheManager(num_blocks=8, block_size=B)
    a = req("a", range(10))
    prefix = m.get_computed_blocks(a)
    assert m.allocate_slots(a, a.num_tokens - prefix.num_tokens, prefix) == [0, 1, 2]
    # Allocated, K/V not written yet: a request with the same prefix must not find them.
    b = req("b", range(10))
    assert m.get_computed_blocks(b) == CachedPrefix()
    assert all(blk.block_hash is None for blk in m.pool.blocks)
    # The step failed: the request is aborted; nothing of it stays findable.
    m.free(a)
    assert m.get_computed_blocks(b) == CachedPrefix() and not m.pool.cached_blocks
    m.check_invariants()
    # The same step completing instead makes the two full blocks findable.
    ids, hit = admit(m, b)
    assert (ids, hit) == ([3, 4, 5], 0)
    assert [m.pool.blocks[i].block_hash is not None for i in ids] == [True, True, False]
    c = req("c", range(10))
    assert m.get_computed_blocks(c).num_tokens == 8
    m.check_invariants([b])


def test_check_invariants_raises_a_real_exception():
    """Not `assert`, which python -O removes: the server relies on it to decide whether to go on."""
    import subprocess
    import sys
    code = ("from pagedserve.kv_cache import KVCacheManager, InvariantError\n"
            "m = KVCacheManager(num_blocks=4, block_size=4)\n"
            "m.pool.blocks[0].ref_cnt = 1\n"
            "try:\n    m.check_invariants()\nexcept InvariantError as e:\n    print('raised', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("raised block 0")


def test_fork_shares_and_copies_on_write():
    m = KVCacheManager(num_blocks=8, block_size=B)
    p = req("p", range(6))  # block 0 full, block 1 holds 2 tokens
    admit(m, p)
    c = req("c", range(6))
    c.num_computed_tokens = p.num_computed_tokens
    m.fork(p, c)
    assert refs(m)[:2] == [2, 2]
    m.check_invariants([p, c])
    # the parent writes into the shared partial block: it gets a private copy first
    assert decode(m, p, 70) == [2]
    assert m.take_transfers().copy == [(1, 2)]
    assert m.get_block_ids("p") == [0, 2] and m.get_block_ids("c") == [0, 1]
    assert refs(m)[:3] == [2, 1, 1]
    # the child now owns block 1 alone: no copy
    assert decode(m, c, 80) == []
    assert m.take_transfers().copy == []
    m.check_invariants([p, c])
    m.free(p)
    m.free(c)
    assert m.pool.num_used_blocks == 0
    m.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    m = KVCacheManager(num_blocks=8, block_size=B)
    p = req("p", range(8))
    admit(m, p)
    c = req("c", range(8))
    c.num_computed_tokens = 8
    m.fork(p, c)
    assert decode(m, p, 1) == [2] and decode(m, c, 2) == [3]
    assert m.take_transfers().copy == []
    assert refs(m)[:4] == [2, 2, 1, 1]
    m.check_invariants([p, c])


@pytest.mark.parametrize("policy,blocks", [("none", 3), ("request", 5), ("max_model_len", 8)])
def test_reservation_policies(policy, blocks):
    m = KVCacheManager(num_blocks=10, block_size=B, kv_reservation=policy, max_model_len=32)
    r = req("a", range(10), max_tokens=8)  # 18 tokens at most: 5 blocks; window 32: 8 blocks
    ids, _ = admit(m, r)
    assert len(ids) == blocks
    for t in range(8):
        decode(m, r, t)
    assert len(m.get_block_ids("a")) == 5 if policy == "none" else blocks
    usage = m.slot_usage()
    assert usage.token_states == 18 and usage.allocated == len(m.get_block_ids("a")) * B
    m.check_invariants([r])


def test_slot_usage_split():
    m = KVCacheManager(num_blocks=20, block_size=B, kv_reservation="max_model_len", max_model_len=32)
    r = req("a", range(5), max_tokens=6)  # now 5 tokens, final 11, window 32 reserved
    admit(m, r)
    u = m.slot_usage()
    assert (u.token_states, u.reserved, u.fragmentation) == (5, 6, 21)


def test_hash_is_chained_and_canonical():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == h1
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], "s") != h1
    assert hash_block(None, [12, 3]) != hash_block(None, [1, 23])


def test_invariant_checker_catches_corruption():
    m = KVCacheManager(num_blocks=4, block_size=B)
    r = req("a", range(6))
    admit(m, r)
    m.pool.blocks[0].ref_cnt += 1
    with pytest.raises(InvariantError):
        m.check_invariants([r])


def test_pool_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockPool(0, 16)
    with pytest.raises(ValueError):
        KVCacheManager(4, 4, kv_reservation="window")


def test_forged_hash_collision_is_not_a_hit():
    m = KVCacheManager(num_blocks=6, block_size=B)
    admit(m, req("a", range(9)))
    victim = req("b", [9, 9, 9, 9, 1])
    m._update_block_hashes(victim)
    # Pretend an attacker's block landed under the victim's first-block hash.
    m.pool.cached_blocks[victim.block_hashes[0]] = m.pool.blocks[0]
    assert m.get_computed_blocks(victim).num_tokens == 0
