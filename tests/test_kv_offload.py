"""The offload tier behind the block pool and swap preemption: the tier's index, the manager's use of it, and
random sequences of operations against a fake runner that moves token ids where K/V would go."""
import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import invariant, precondition, rule

from pagedserve.kv_cache import InvariantError, KVCacheManager
from pagedserve.kv_cache.offload import OffloadTier
from test_kv_cache_stateful import RequestMachine, new_request

B = 4


# ---- the tier's index ----------------------------------------------------------------------------
def test_tier_lru_eviction_skips_pinned_entries():
    t = OffloadTier(2)
    a, write = t.store(b"a", (1,))
    assert write and a.slot == 0
    assert t.store(b"a", (1,)) == (a, False)  # already there: nothing to copy
    b, _ = t.store(b"b", (2,))
    t.end_step(ok=True)
    t.pin(a)
    c, write = t.store(b"c", (3,))  # a is pinned: b, the only unpinned entry, goes
    assert write and c.slot == b.slot and t.lookup(b"b", (2,)) is None and t.num_evictions == 1
    assert t.store(b"d", (4,)) == (None, False)  # c was stored by this step: evicting it would waste its copy
    t.end_step(ok=True)
    d, write = t.store(b"d", (4,))  # a step later c, unpinned, goes before pinned a
    assert write and d.slot == c.slot and t.lookup(b"c", (3,)) is None
    t.unpin(a)
    assert t.lookup(b"a", (1,)) is a
    t.check_invariants()


def test_tier_every_slot_pinned_refuses_a_store():
    t = OffloadTier(1)
    e, _ = t.store(b"a", (1,))
    t.pin(e)
    assert t.num_available == 0 and t.store(b"b", (2,)) == (None, False)
    t.unpin(e)
    with pytest.raises(InvariantError):
        t.unpin(e)


def test_tier_lookup_double_checks_tokens():
    t = OffloadTier(2)
    t.store(b"k", (1, 2))
    assert t.lookup(b"k", (1, 2)) is not None
    assert t.lookup(b"k", (1, 3)) is None  # same key, other tokens: no hit, and no overwrite
    assert t.store(b"k", (1, 3)) == (None, False)


def test_tier_failed_step_forgets_its_stores_and_releases_step_pins():
    t = OffloadTier(3)
    old, _ = t.store(b"old", (0,))
    t.end_step(ok=True)
    t.pin_for_step(old)
    t.store(b"new", (1,))
    swap, _ = t.store(b"swap", (2,), transient=True)
    t.end_step(ok=False)
    assert t.lookup(b"new", (1,)) is None and t.lookup(b"swap", (2,)) is None
    assert t.lookup(b"old", (0,)) is old and old.pins == 0 and t.num_available == 3
    t.check_invariants()


def test_tier_transient_entry_is_dropped_when_unpinned():
    t = OffloadTier(2)
    e, _ = t.store(b"swap:r#0", (5,), transient=True)
    t.end_step(ok=True)
    t.pin(e)
    t.unpin(e)
    assert len(t) == 0 and t.num_available == 2


# ---- the manager over a tier ---------------------------------------------------------------------------
def run(m, r, n=None):
    """The step ran: tokens computed, full blocks findable, the tier's stores committed."""
    r.num_computed_tokens += r.num_tokens - r.num_computed_tokens if n is None else n
    m.cache_blocks(r)
    m.end_step(ok=True)


def admit(m, r):
    prefix = m.get_computed_blocks(r)
    assert m.allocate_slots(r, r.num_tokens - prefix.num_tokens, prefix) is not None
    r.num_computed_tokens = prefix.num_tokens
    transfers = m.take_transfers()
    run(m, r)
    return prefix, transfers


def test_evicted_blocks_go_to_the_tier_and_come_back_as_loads():
    m = KVCacheManager(num_blocks=3, block_size=B, num_offload_blocks=4)
    a = new_request("a", range(9))  # blocks 0, 1 full (cached), block 2 partial
    admit(m, a)
    m.free(a)
    b = new_request("b", range(100, 112))  # takes every block: a's cached 0 and 1 are evicted into the tier
    _, t = admit(m, b)
    assert t.offload == [(1, 0), (0, 1)] and t.load == []  # freed tail first: block 1 is reused before block 0
    m.free(b)
    c = new_request("c", list(range(8)) + [42, 43])
    prefix, t = admit(m, c)
    assert prefix.num_tokens == 8 and t.load and len(t.load) == 2
    assert m.offload_hits == 8 and m.prefix_cache_hits == 8
    assert [slot for slot, _ in t.load] == [1, 0]
    # b's three cached blocks were evicted to make room: two fit the tier's free slots; the third would only
    # evict one stored by this same step, so it is not kept
    assert sorted(slot for _, slot in t.offload) == [2, 3] and len(m.tier) == 4
    m.check_invariants([c])


def test_tier_keeps_tenants_apart():
    m = KVCacheManager(num_blocks=3, block_size=B, num_offload_blocks=4)
    a = new_request("a", range(9), salt="tenant-1")
    admit(m, a)
    m.free(a)
    admit(m, new_request("b", range(100, 112)))  # a's blocks now live only in the tier
    m.free("b")
    assert m.get_computed_blocks(new_request("c", range(9), salt="tenant-2")).num_tokens == 0
    assert m.get_computed_blocks(new_request("d", range(9))).num_tokens == 0
    assert m.get_computed_blocks(new_request("e", range(9), salt="tenant-1")).num_tokens == 8


def test_swap_out_parks_every_computed_block_and_restores_them():
    m = KVCacheManager(num_blocks=6, block_size=B, num_offload_blocks=8)
    a = new_request("a", range(10))
    admit(m, a)  # 10 tokens computed: blocks of 4, 4 and 2
    a.append_output_token(77)
    assert m.swap_out(a)
    t = m.take_transfers()
    assert len(t.offload) == 3 and m.num_swapped_out == 1 and "a" not in m.req_to_blocks
    m.end_step(ok=True)
    m.check_invariants()
    a.num_computed_tokens = 0
    prefix = m.get_computed_blocks(a)
    # Blocks 0 and 1 are still cached in the pool; the partial block comes back from the tier.
    assert prefix.swapped_in and prefix.num_tokens == 10
    assert m.allocate_slots(a, 1, prefix) is not None
    t = m.take_transfers()
    assert len(t.load) == 1 and t.load[0][0] == t_partial_slot(prefix)
    a.num_computed_tokens = 10
    run(m, a, 1)
    m.check_invariants([a])
    assert len(m.tier) == 2  # the partial block's entry is dropped once loaded; the full ones stay cached


def t_partial_slot(prefix):
    return prefix.blocks[-1].slot


def test_swap_out_without_room_changes_nothing():
    m = KVCacheManager(num_blocks=6, block_size=B, num_offload_blocks=2)
    a = new_request("a", range(10))
    admit(m, a)
    a.append_output_token(1)
    table = m.get_block_ids("a")
    assert not m.swap_out(a)  # 3 blocks, 2 slots
    assert m.get_block_ids("a") == table and m.take_transfers().offload == [] and len(m.tier) == 0
    m.check_invariants([a])


def test_swap_out_in_a_failed_step_falls_back_to_recompute():
    m = KVCacheManager(num_blocks=6, block_size=B, num_offload_blocks=8)
    a = new_request("a", range(6))
    admit(m, a)
    a.append_output_token(1)
    assert m.swap_out(a)
    m.take_transfers()
    m.end_step(ok=False)  # the copies may never have run
    a.num_computed_tokens = 0
    prefix = m.get_computed_blocks(a)
    assert not prefix.swapped_in and prefix.num_tokens == 4  # its full block, still cached in the pool
    assert len(m.tier) == 0
    m.check_invariants()


def test_a_failed_step_leaves_no_tier_entry():
    m = KVCacheManager(num_blocks=3, block_size=B, num_offload_blocks=4)
    a = new_request("a", range(9))
    admit(m, a)
    m.free(a)
    b = new_request("b", range(100, 112))
    prefix = m.get_computed_blocks(b)
    m.allocate_slots(b, 12, prefix)
    assert m.take_transfers().offload  # a's blocks were to be written to the tier by this step...
    m.end_step(ok=False)  # ... which failed
    m.free(b)
    assert len(m.tier) == 0 and m.get_computed_blocks(new_request("c", range(9))).num_tokens == 0
    m.check_invariants()


def test_reset_prefix_cache_clears_the_tier_too():
    m = KVCacheManager(num_blocks=3, block_size=B, num_offload_blocks=4)
    admit(m, new_request("a", range(9)))
    m.free("a")
    admit(m, new_request("b", range(100, 112)))
    m.free("b")
    assert len(m.tier) == 2
    assert m.reset_prefix_cache() == 3 + 2 and len(m.tier) == 0  # b's three blocks in the pool, a's two in the tier


# ---- random operations against a fake runner ----------------------------------------------------------


class OffloadMachine(RequestMachine):
    """Each rule is one step. The fake runner keeps a token id per pool slot and per tier slot and runs a
    step's transfers in the runner's order (offload, load, copy) before writing the step's tokens. After
    every step each running request must read back exactly its tokens: tier hits, swaps, evictions into the
    tier and failed steps can only be right if that holds."""

    def __init__(self):
        super().__init__()
        self.num_blocks, self.num_slots = 9, 6
        self.m = KVCacheManager(self.num_blocks, B, num_offload_blocks=self.num_slots)
        self.pool = [None] * (self.num_blocks * B)
        self.tier = [[None] * B for _ in range(self.num_slots)]

    def _transfers(self, garbage=False):
        t = self.m.take_transfers()
        for block, slot in t.offload:
            self.tier[slot] = ["garbage"] * B if garbage else self.pool[block * B:(block + 1) * B]
        for slot, block in t.load:
            self.pool[block * B:(block + 1) * B] = ["garbage"] * B if garbage else self.tier[slot]
        for src, dst in t.copy:
            self.pool[dst * B:(dst + 1) * B] = ["garbage"] * B if garbage else self.pool[src * B:(src + 1) * B]

    def _write(self, r, n, value=None):
        table = self.m.get_block_ids(r.request_id)
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            self.pool[table[pos // B] * B + pos % B] = r.all_token_ids[pos] if value is None else value

    def _step(self, r, n):
        self._transfers()
        self._write(r, n)
        r.num_computed_tokens += n
        self.m.cache_blocks(r)
        self.m.end_step(ok=True)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data):
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        r = self.waiting[rid]
        prefix = self.m.get_computed_blocks(r)
        assert prefix.num_tokens < r.num_tokens
        if self.m.allocate_slots(r, r.num_tokens - prefix.num_tokens, prefix) is None:
            self.m.end_step(ok=True)
            return
        r.num_computed_tokens = prefix.num_tokens
        self._step(r, r.num_tokens - prefix.num_tokens)
        self.running[rid] = self.waiting.pop(rid)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 5), swap=st.booleans(), fail=st.booleans())
    def append(self, data, token, swap, fail):
        """A decode step that may preempt others (by swap or recompute) and may fail after its copies began."""
        rid = data.draw(st.sampled_from(sorted(self.running)))
        r = self.running[rid]
        r.append_output_token(token)
        while self.m.allocate_slots(r, 1) is None:
            self._preempt_newest(swap)
            if rid not in self.running:
                self._transfers()
                self.m.end_step(ok=True)
                return
        if not fail:
            self._step(r, 1)
            return
        self._transfers(garbage=True)
        self._write(r, 1, "garbage")
        self.m.end_step(ok=False)
        self.m.free(self.running.pop(rid))  # the engine aborts the failed step's requests
        r.num_computed_tokens = 0

    @precondition(lambda self: self.running and self.waiting)
    @rule(data=st.data(), swap=st.booleans(), fail=st.booleans())
    def busy_step(self, data, swap, fail):
        """One step that preempts a request and then admits up to two (as a schedule() that preempted a held
        beam does): the copies of all of them run together, in the runner's order, and the step may fail."""
        self._preempt_newest(swap)
        admitted = []
        for rid in data.draw(st.lists(st.sampled_from(sorted(self.waiting)), max_size=2, unique=True)):
            r = self.waiting[rid]
            prefix = self.m.get_computed_blocks(r)
            if self.m.allocate_slots(r, r.num_tokens - prefix.num_tokens, prefix) is None:
                continue
            r.num_computed_tokens = prefix.num_tokens
            admitted.append((r, r.num_tokens - prefix.num_tokens))
            self.running[rid] = self.waiting.pop(rid)
        self._transfers(garbage=fail)
        for r, n in admitted:
            self._write(r, n, "garbage" if fail else None)
            if not fail:
                r.num_computed_tokens += n
                self.m.cache_blocks(r)
        self.m.end_step(ok=not fail)
        if fail:  # the engine aborts the failed step's requests
            for r, _ in admitted:
                self.m.free(self.running.pop(r.request_id))
                r.num_computed_tokens = 0

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        self.m.free(self.running.pop(data.draw(st.sampled_from(sorted(self.running)))))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def abort_waiting(self, data):
        self.m.free(self.waiting.pop(data.draw(st.sampled_from(sorted(self.waiting)))))

    @precondition(lambda self: self.running)
    @rule(swap=st.booleans(), fail=st.booleans())
    def preempt(self, swap, fail):
        """A step that preempts (its copies run before its forward) and may fail after they began."""
        self._preempt_newest(swap)
        self._transfers(garbage=fail)
        self.m.end_step(ok=not fail)

    @rule()
    def reset(self):
        self.m.reset_prefix_cache()

    @invariant()
    def every_running_request_reads_back_its_tokens(self):
        for r in self.running.values():
            table = self.m.get_block_ids(r.request_id)
            read = [self.pool[table[p // B] * B + p % B] for p in range(r.num_computed_tokens)]
            assert read == r.all_token_ids[:r.num_computed_tokens], f"{r.request_id} reads back wrong tokens"

    @invariant()
    def every_tier_entry_holds_its_tokens(self):
        for entry in self.m.tier._entries.values():
            assert tuple(self.tier[entry.slot][:len(entry.token_ids)]) == entry.token_ids

    @invariant()
    def invariants_hold(self):
        self.m.check_invariants(self.running.values())

    def teardown(self):
        for r in [*self.running.values(), *self.waiting.values()]:
            self.m.free(r)
        self.m.check_invariants()
        assert self.m.pool.num_used_blocks == 0
        assert all(e.pins == 0 for e in self.m.tier._entries.values())


OffloadMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestOffload = OffloadMachine.TestCase


def test_disk_tier_reserves_its_file_and_leaves_none_behind(tmp_path):
    import torch

    from pagedserve.kv_cache.offload import load_blocks, offload_blocks, tier_storage
    tier = tier_storage(3, 2, (4, 1, 2), torch.float32, str(tmp_path))
    assert tier.shape == (3, 2, 2, 4, 1, 2) and list(tmp_path.iterdir()) == []  # unlinked at once
    caches = [(torch.randn(5, 4, 1, 2), torch.randn(5, 4, 1, 2)) for _ in range(2)]
    offload_blocks(caches, tier, [(4, 0), (1, 2)])
    fresh = [(torch.zeros(5, 4, 1, 2), torch.zeros(5, 4, 1, 2)) for _ in range(2)]
    load_blocks(fresh, tier, [(2, 3), (0, 0)])
    for (k, v), (k2, v2) in zip(caches, fresh):
        assert torch.equal(k2[3], k[1]) and torch.equal(v2[0], v[4]) and not k2[1].any()
    with pytest.raises(ValueError, match="cannot reserve"):
        tier_storage(1 << 20, 64, (16, 8, 128), torch.float32, str(tmp_path))  # 8 TiB: more than the disk


def test_a_swap_finds_the_room_it_counted_after_evictions_in_the_same_step():
    """One step: an allocation evicts two cached blocks into a full tier, the first stored anew, the second
    already there (a lookup moves it to the recent end); then a swap counts its room and must find it. (This
    once raised: the tier counted as evictable an entry sitting behind one stored by the same step.)"""
    m = KVCacheManager(num_blocks=8, block_size=B, num_offload_blocks=3)
    for rid, base in (("x", 0), ("e1", 100), ("e2", 200)):
        admit(m, new_request(rid, range(base, base + 5)))
        m.free(rid)
    big = new_request("big", range(1000, 1032))
    m.allocate_slots(big, 32, m.get_computed_blocks(big))  # x, e1, e2 go to the tier
    m.take_transfers()
    m.end_step(ok=True)
    m.free("big")
    admit(m, new_request("x2", range(0, 5)))     # x comes back from the tier and is cached in the pool again
    admit(m, new_request("f", range(300, 305)))  # a cached block the tier does not have
    v = new_request("v", range(500, 506))
    admit(m, v)
    v.append_output_token(7)
    m.free("f")
    m.free("x2")
    g = new_request("g", range(700, 724))
    assert m.allocate_slots(g, g.num_tokens, m.get_computed_blocks(g)) is not None  # evicts f, then x
    assert m.tier.num_available == 2
    assert m.swap_out(v)  # one full block and one partial: two new entries
    t = m.take_transfers()
    assert len({slot for _, slot in t.offload}) == len(t.offload)  # no slot written twice in the step
    m.end_step(ok=True)
    m.check_invariants([g])
    v.num_computed_tokens = 0
    assert m.get_computed_blocks(v).num_tokens == 6
