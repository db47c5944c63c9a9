"""KVCacheManager: per-request block tables over the block pool.

It finds a request's longest cached prefix, allocates blocks as the request grows
(None when the pool is full: the scheduler then preempts), shares blocks between
parallel samples (fork) with copy-on-write, caches full blocks under chained hashes,
frees tail first, and keeps the accounting the benchmarks report.

A request's block table holds block i for token positions [i*B, (i+1)*B). After
allocate_slots(request, n), the table covers the request's first
num_computed_tokens + n tokens (more under a reservation policy), and every block
those n tokens will be written into is owned by this request alone.

A full block becomes findable by other requests (cache_blocks) only once the step that
wrote its K/V has completed: if that step fails, nothing points at K/V that were never written.

With an offload tier (offload.py), a cached block the pool reuses is first written to the tier, a
prefix lookup goes on into the tier where the pool misses, and swap_out parks a preempted request's
blocks there. The copies each step needs are listed for the model runner (take_transfers), and
end_step tells the tier whether that step ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from pagedserve.kv_cache.block_pool import BlockPool, InvariantError, KVCacheBlock, hash_block
from pagedserve.kv_cache.offload import OffloadTier, TierEntry
from pagedserve.outputs import BlockTransfers
from pagedserve.request import Request

KV_RESERVATIONS = ("none", "request", "max_model_len")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SlotUsage:
    """KV slots of the used blocks, split the way the PagedAttention paper's Figure 2 does."""
    token_states: int = 0   # slots holding a token's K/V now
    reserved: int = 0       # empty slots that a future token of the owning request will fill
    fragmentation: int = 0  # empty slots no token will ever fill (internal fragmentation)

    @property
    def allocated(self) -> int:
        return self.token_states + self.reserved + self.fragmentation

    def __iadd__(self, other: SlotUsage) -> SlotUsage:
        self.token_states += other.token_states
        self.reserved += other.reserved
        self.fragmentation += other.fragmentation
        return self


@dataclass
class CachedPrefix:
    """A request's longest cached prefix: blocks[i] holds tokens [i*B, (i+1)*B), a pool block or a tier entry
    (loaded into a fresh block); num_tokens of them are computed (less than len(blocks)*B only where a swapped
    request's partial last block comes back)."""
    blocks: list[KVCacheBlock | TierEntry] = field(default_factory=list)
    num_tokens: int = 0
    swapped_in: bool = False  # the request's own blocks, parked by swap_out


@dataclass
class _Swapped:
    """A request whose computed blocks wait in the tier: entry i holds tokens [i*B, min((i+1)*B, num_tokens))."""
    entries: list[TierEntry]
    num_tokens: int


def _swap_key(request_id: str, index: int) -> bytes:
    """The tier key of a swapped request's partial block: no hash can equal it (hashes are 32 bytes)."""
    return b"swap:" + request_id.encode("utf-8", "surrogatepass") + b"#" + str(index).encode()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 kv_reservation: str = "none", max_model_len: int | None = None,
                 num_offload_blocks: int = 0) -> None:
        if kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {KV_RESERVATIONS}, got {kv_reservation!r}")
        if kv_reservation != "none" and max_model_len is None:
            raise ValueError(f"kv_reservation={kv_reservation!r} needs max_model_len")
        self.block_size = block_size
        self.kv_reservation = kv_reservation
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.tier = OffloadTier(num_offload_blocks) if num_offload_blocks else None
        self.pool = BlockPool(num_blocks, block_size, enable_caching=enable_prefix_caching,
                              on_evict=self._offload_evicted if self.tier is not None else None)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_num_tokens: dict[str, int] = {}      # tokens in the cache once this step has run
        self.req_final_len: dict[str, int] = {}       # the length the request can grow to
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already registered as cached
        self._salts: dict[str, str | None] = {}
        self._transfers = BlockTransfers()
        self._swapped: dict[str, _Swapped] = {}
        self._swapped_this_step: list[str] = []
        # accounting
        self.peak_blocks_used = 0
        self.prefix_cache_queries = 0  # tokens looked up at admission (vLLM's semantics)
        self.prefix_cache_hits = 0     # of those, tokens found in the cache
        self.num_steps_recorded = 0
        self._utilization_sum = 0.0
        self.usage_sum = SlotUsage()
        self.offload_hits = 0           # of the prefix-cache hits, tokens loaded from the tier
        self.num_swapped_out = 0        # preemptions that parked their blocks in the tier
        self.num_blocks_offloaded = 0   # copies pool -> tier
        self.num_blocks_loaded = 0      # copies tier -> pool

    # ---- lookup -------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> CachedPrefix:
        """The longest cached prefix of a request's tokens, in the pool or the tier (or, for a request that
        swap_out parked, its own blocks). At least the last token is always left to compute, since sampling
        needs its logits.
        """
        swapped = self._swapped.get(request.request_id)
        if swapped is not None:
            return self._swapped_prefix(request, swapped)
        if not self.enable_prefix_caching:
            return CachedPrefix()
        self._update_block_hashes(request)
        B = self.block_size
        hits: list[KVCacheBlock | TierEntry] = []
        for i in range((request.num_tokens - 1) // B):
            key, tokens = request.block_hashes[i], request.all_token_ids[i * B:(i + 1) * B]
            hit = self.pool.get_cached_block(key, tokens)
            if hit is None and self.tier is not None:
                hit = self.tier.lookup(key, tokens)
            if hit is None:
                break
            hits.append(hit)
        return CachedPrefix(hits, len(hits) * B)

    def _swapped_prefix(self, request: Request, swapped: _Swapped) -> CachedPrefix:
        """A swapped request's blocks: from the pool where a full one is still cached there, else its tier entry."""
        B = self.block_size
        hits: list[KVCacheBlock | TierEntry] = []
        for i, entry in enumerate(swapped.entries):
            tokens = request.all_token_ids[i * B:min((i + 1) * B, swapped.num_tokens)]
            if entry.token_ids != tuple(tokens):
                raise InvariantError(f"request {request.request_id}: swapped block {i} holds other tokens")
            pooled = self.pool.get_cached_block(entry.key, tokens) if len(tokens) == B else None
            hits.append(pooled or entry)
        return CachedPrefix(hits, swapped.num_tokens, swapped_in=True)

    # ---- allocation ---------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       prefix: CachedPrefix | None = None) -> list[int] | None:
        """Make room for the next num_new_tokens of a request; None (and no change) if the pool is full.

        prefix: the cached prefix from get_computed_blocks, for a request being admitted (its
        num_computed_tokens is 0 and becomes prefix.num_tokens once admitted); its tier entries are
        loaded into fresh blocks before the step's forward. Returns the ids of the blocks newly taken.
        """
        B = self.block_size
        rid = request.request_id
        is_new = rid not in self.req_to_blocks
        blocks = self.req_to_blocks.get(rid, [])
        hits = prefix.blocks if prefix is not None else []
        num_computed = request.num_computed_tokens + (prefix.num_tokens if prefix is not None else 0)
        total = num_computed + num_new_tokens
        if total > request.num_tokens:
            raise ValueError(f"request {rid}: cannot compute {total} tokens, it has {request.num_tokens}")
        have = len(blocks) + len(hits)
        num_fresh = max(0, max(cdiv(total, B), self.reserved_blocks(request)) - have)
        # Copy-on-write: a shared block this step writes into is replaced by a private copy.
        written = range(num_computed // B, min(cdiv(total, B), len(blocks)))
        shared = [i for i in written if blocks[i].ref_cnt > 1]
        pool_hits = [h for h in hits if isinstance(h, KVCacheBlock)]
        tier_hits = [h for h in hits if isinstance(h, TierEntry)]
        # Hits that sit in the free queue stop being free once touched.
        free_hits = sum(1 for b in pool_hits if b.ref_cnt == 0)
        if num_fresh + len(shared) + len(tier_hits) > self.pool.num_free_blocks - free_hits:
            return None

        if is_new:
            self.req_to_blocks[rid] = blocks
            # Blocks from the pool are registered already; from the first tier load on, cache_blocks does it.
            self._num_cached_blocks[rid] = next((i for i, h in enumerate(hits) if isinstance(h, TierEntry)),
                                                len(hits))
            self._salts[rid] = request.cache_salt
            if prefix is None or not prefix.swapped_in:  # a swapped request's return is no lookup
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += prefix.num_tokens if prefix is not None else 0
                self.offload_hits += len(tier_hits) * B
        for entry in tier_hits:  # before taking blocks: an eviction into the tier must not take these slots
            self.tier.pin_for_step(entry)
        self.pool.touch(pool_hits)
        all_taken = self.pool.get_new_blocks(len(tier_hits) + num_fresh + len(shared))
        loads, taken = iter(all_taken[:len(tier_hits)]), all_taken[len(tier_hits):]
        for hit in hits:
            if isinstance(hit, TierEntry):
                slot, hit = hit.slot, next(loads)
                self._transfers.load.append((slot, hit.block_id))
                self.num_blocks_loaded += 1
            blocks.append(hit)
        if prefix is not None and prefix.swapped_in:
            self._release_swap(rid)
        for i, fresh in zip(shared, taken[num_fresh:]):
            if i * B < num_computed:  # holds valid tokens: the model runner copies them first
                self._transfers.copy.append((blocks[i].block_id, fresh.block_id))
            self.pool.free_blocks([blocks[i]])
            blocks[i] = fresh
        blocks.extend(taken[:num_fresh])
        for i in written:
            if blocks[i].ref_cnt != 1:
                raise InvariantError(f"block {blocks[i].block_id} is shared but about to be written")

        self.req_num_tokens[rid] = total
        self.req_final_len[rid] = self._final_len(request)
        self.peak_blocks_used = max(self.peak_blocks_used, self.pool.num_used_blocks)
        return [b.block_id for b in all_taken]

    def reserved_blocks(self, request: Request) -> int:
        """Blocks the reservation policy holds for a request from admission on (0 when paged)."""
        if self.kv_reservation == "none":
            return 0
        if self.kv_reservation == "max_model_len":
            return cdiv(self.max_model_len, self.block_size)
        return cdiv(self._final_len(request), self.block_size)

    def _final_len(self, request: Request) -> int:
        """How long the request can grow: prompt plus max_tokens, within the window."""
        max_tokens = request.max_tokens
        final = request.num_prompt_tokens + max_tokens if max_tokens is not None else (self.max_model_len or 0)
        final = max(final, request.num_tokens)
        return min(final, self.max_model_len) if self.max_model_len else final

    def _update_block_hashes(self, request: Request) -> None:
        B = self.block_size
        hashes, tokens = request.block_hashes, request.all_token_ids
        for i in range(len(hashes), len(tokens) // B):
            parent = hashes[i - 1] if i else None
            # The salt enters the first block only; the chain carries it to every later block.
            hashes.append(hash_block(parent, tokens[i * B:(i + 1) * B], request.cache_salt if i == 0 else None))

    def cache_blocks(self, request: Request) -> None:
        """Make the request's full, computed blocks findable by others.

        Called once a step has written their K/V (request.num_computed_tokens counts them), never before.
        """
        if not self.enable_prefix_caching:
            return
        rid, B = request.request_id, self.block_size
        start, end = self._num_cached_blocks[rid], request.num_computed_tokens // B
        if end <= start:
            return
        self._update_block_hashes(request)
        blocks = self.req_to_blocks[rid]
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i], request.all_token_ids[i * B:(i + 1) * B])
        self._num_cached_blocks[rid] = end

    # ---- sharing and freeing ----------------------------------------------------------------
    def fork(self, parent: Request, child: Request) -> None:
        """The child (a parallel sample) shares every block of the parent by reference count.

        The child must hold the same tokens and num_computed_tokens as the parent.
        """
        if child.request_id in self.req_to_blocks:
            raise ValueError(f"request {child.request_id} already has blocks")
        pid, cid = parent.request_id, child.request_id
        blocks = self.req_to_blocks[pid]
        self.pool.touch(blocks)
        self.req_to_blocks[cid] = list(blocks)
        self.req_num_tokens[cid] = self.req_num_tokens[pid]
        self.req_final_len[cid] = self.req_final_len[pid]
        self._num_cached_blocks[cid] = self._num_cached_blocks[pid]
        self._salts[cid] = self._salts[pid]
        child.block_hashes = list(parent.block_hashes)

    def free(self, request: Request | str) -> None:
        """Return a finished, aborted or preempted request's blocks, tail first (tails are evicted first),
        and whatever it had parked in the tier."""
        rid = request if isinstance(request, str) else request.request_id
        self._release_blocks(rid)
        self._release_swap(rid)

    def _release_blocks(self, rid: str) -> None:
        blocks = self.req_to_blocks.pop(rid, None)
        if blocks is None:
            return
        for d in (self.req_num_tokens, self.req_final_len, self._num_cached_blocks, self._salts):
            d.pop(rid, None)
        self.pool.free_blocks(reversed(blocks))

    # ---- the offload tier -----------------------------------------------------------------------
    def swap_out(self, request: Request) -> bool:
        """Preempt a request by parking its computed blocks in the tier, then freeing them; it resumes from
        them (get_computed_blocks). False, with nothing changed, when there is no tier or it has no room
        (the caller then preempts by recompute, free())."""
        tier, rid, B = self.tier, request.request_id, self.block_size
        blocks = self.req_to_blocks.get(rid)
        if tier is None or blocks is None:
            return False
        n = min(request.num_computed_tokens, request.num_tokens - 1)  # the last token is computed on return
        self._update_block_hashes(request)
        wanted = []  # (block, key, tokens, whether it is a partial block)
        for i in range(cdiv(n, B)):
            tokens = request.all_token_ids[i * B:min((i + 1) * B, n)]
            full = len(tokens) == B
            wanted.append((blocks[i], request.block_hashes[i] if full else _swap_key(rid, i), tokens, not full))
        present = [tier.lookup(key, tokens) for _, key, tokens, _ in wanted]
        for entry in present:  # pinned first, so that counting the room does not count them
            if entry is not None:
                tier.pin(entry)
        if sum(e is None for e in present) > tier.num_available:
            for entry in present:
                if entry is not None:
                    tier.unpin(entry)
            return False
        entries = []
        for (block, key, tokens, partial), entry in zip(wanted, present):
            if entry is None:
                # A full block stays after its return (evictable): swapped again unchanged, it needs no copy.
                entry, write = tier.store(key, tokens, transient=partial)
                if entry is None:  # room was counted above: only a key holding other tokens gets here
                    raise InvariantError(f"tier key of request {rid}'s block holds other tokens")
                tier.pin(entry)
                if write:
                    self._transfers.offload.append((block.block_id, entry.slot))
                    self.num_blocks_offloaded += 1
            entries.append(entry)
        self._swapped[rid] = _Swapped(entries, n)
        self._swapped_this_step.append(rid)
        self.num_swapped_out += 1
        self._release_blocks(rid)
        return True

    def _release_swap(self, rid: str) -> None:
        swapped = self._swapped.pop(rid, None)
        if swapped is not None:
            for entry in swapped.entries:
                self.tier.unpin(entry)

    def _offload_evicted(self, block: KVCacheBlock) -> None:
        """The pool is about to reuse a cached block: keep its K/V in the tier (when it has room)."""
        entry, write = self.tier.store(block.block_hash, block.token_ids)
        if write:
            self._transfers.offload.append((block.block_id, entry.slot))
            self.num_blocks_offloaded += 1

    def take_transfers(self) -> BlockTransfers:
        """The copies recorded since the last call, for the model runner to run before the step's forward."""
        out, self._transfers = self._transfers, BlockTransfers()
        return out

    def end_step(self, ok: bool) -> None:
        """The step scheduled last has run (ok), or failed before its copies were known to be done: then the
        tier forgets what it stored for that step, and requests swapped out in it will recompute instead."""
        if self.tier is None:
            return
        if not ok:
            for rid in self._swapped_this_step:
                self._release_swap(rid)
        self._swapped_this_step = []
        self.tier.end_step(ok)

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    def reset_prefix_cache(self) -> int:
        """Forget every cached block nobody holds, in the pool and the tier; returns how many."""
        return self.pool.reset_prefix_cache() + (self.tier.clear() if self.tier is not None else 0)

    # ---- accounting ---------------------------------------------------------------------
    def slot_usage(self) -> SlotUsage:
        """Slots of the blocks in use now: token states, reserved for future tokens, fragmentation.

        A shared block counts once, with the largest fill among its owners.
        """
        B = self.block_size
        filled: dict[int, int] = {}
        will_fill: dict[int, int] = {}
        for rid, blocks in self.req_to_blocks.items():
            n, final = self.req_num_tokens[rid], max(self.req_final_len[rid], self.req_num_tokens[rid])
            for i, b in enumerate(blocks):
                filled[b.block_id] = max(filled.get(b.block_id, 0), min(max(n - i * B, 0), B))
                will_fill[b.block_id] = max(will_fill.get(b.block_id, 0), min(max(final - i * B, 0), B))
        stored = sum(filled.values())
        future = sum(will_fill.values())
        return SlotUsage(token_states=stored, reserved=future - stored, fragmentation=len(filled) * B - future)

    def record_step(self) -> None:
        """Add this step's usage to the means. It walks every block table: not on the engine's hot path, but
        called by an observer (LLMEngine.add_step_observer) where a benchmark or the report wants the means."""
        usage = self.slot_usage()
        if usage.allocated == 0:
            return
        self.num_steps_recorded += 1
        self._utilization_sum += usage.token_states / usage.allocated
        self.usage_sum += usage

    def stats(self, detailed: bool = True) -> dict:
        """The cache's numbers; detailed=False skips the ones that walk every block table (kv_tokens_stored)."""
        used = self.pool.num_used_blocks
        out = {
            "num_kv_blocks": self.pool.num_blocks,
            "block_size": self.block_size,
            "kv_blocks_used": used,
            "kv_blocks_peak": self.peak_blocks_used,
            "kv_cache_usage": used / self.pool.num_blocks,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "num_evictions": self.pool.num_evictions,
            "kv_slots_allocated": used * self.block_size,
            # Only where an observer records steps (record_step); None rather than a misleading 0.
            "kv_utilization_mean": (self._utilization_sum / self.num_steps_recorded
                                    if self.num_steps_recorded else None),
        }
        if self.tier is not None:
            out.update(kv_offload_blocks=self.tier.num_slots, kv_offload_blocks_used=len(self.tier),
                       kv_offload_usage=len(self.tier) / self.tier.num_slots,
                       kv_offload_hits=self.offload_hits, kv_offload_evictions=self.tier.num_evictions,
                       kv_blocks_offloaded=self.num_blocks_offloaded, kv_blocks_loaded=self.num_blocks_loaded,
                       num_swapped_out=self.num_swapped_out)
        if detailed:
            out["kv_tokens_stored"] = self.slot_usage().token_states
        return out

    # ---- invariants -------------------------------------------------------------------------
    def check_invariants(self, requests: Iterable[Request] = ()) -> None:
        """Raise InvariantError if any invariant of DESIGN.md section 4 is broken.

        requests: the live requests that own block tables; with them the block contents are
        checked against each request's tokens as well.
        """
        pool, B = self.pool, self.block_size
        if self.tier is not None:
            self.tier.check_invariants()
            for rid, swapped in self._swapped.items():
                _check(rid not in self.req_to_blocks, f"request {rid} is swapped out but holds blocks")
                _check(all(e.pins > 0 for e in swapped.entries), f"swapped request {rid} has an unpinned block")
        queue = list(pool.free_queue)
        free_ids = {b.block_id for b in queue}
        _check(len(free_ids) == len(queue) == pool.num_free_blocks,
               "free queue holds a block twice")
        refs = [0] * pool.num_blocks
        for blocks in self.req_to_blocks.values():
            for b in blocks:
                refs[b.block_id] += 1
        for b in pool.blocks:
            _check((b.ref_cnt == 0) == (b.block_id in free_ids),
                   f"block {b.block_id}: ref_cnt {b.ref_cnt} but {'in' if b.block_id in free_ids else 'not in'} the free queue")
            _check(b.ref_cnt == refs[b.block_id],
                   f"block {b.block_id}: ref_cnt {b.ref_cnt} but {refs[b.block_id]} block-table entries")
            if b.block_hash is not None:
                _check(pool.cached_blocks.get(b.block_hash) is b,
                       f"block {b.block_id} has a hash the cache lost")
                _check(b.token_ids is not None and len(b.token_ids) == B,
                       f"cached block {b.block_id} is not full")
        for h, b in pool.cached_blocks.items():
            _check(b.block_hash == h,
                   f"cache entry points at block {b.block_id} with another hash")
        if not self.req_to_blocks:
            _check(pool.num_used_blocks == 0,
                   f"{pool.num_used_blocks} blocks used with no request running")
        _check(self.peak_blocks_used >= pool.num_used_blocks,
               f"peak {self.peak_blocks_used} blocks is below the {pool.num_used_blocks} in use")
        owner_tokens: dict[int, tuple[int, tuple[int, ...]]] = {}
        for r in requests:
            blocks = self.req_to_blocks.get(r.request_id)
            if blocks is None:
                continue
            n = self.req_num_tokens[r.request_id]
            _check(len(blocks) >= cdiv(n, B),
                   f"request {r.request_id}: {n} tokens in {len(blocks)} blocks")
            for i, b in enumerate(blocks):
                fill = min(max(n - i * B, 0), B)
                toks = tuple(r.all_token_ids[i * B:i * B + fill])
                # Findable only once written: a cached block lies within what a completed step computed.
                _check(b.block_hash is None or (i + 1) * B <= r.num_computed_tokens,
                       f"block {b.block_id} is in the prefix cache but request {r.request_id} has computed "
                       f"only {r.num_computed_tokens} tokens")
                if b.block_hash is not None and fill == B:
                    parent = r.block_hashes[i - 1] if i else None
                    _check(b.token_ids == toks,
                           f"block {b.block_id}: cached tokens differ from request {r.request_id}'s")
                    _check(hash_block(parent, toks, r.cache_salt if i == 0 else None) == b.block_hash,
                           f"block {b.block_id}: hash does not match request {r.request_id}'s chain")
                # A shared block holds the same tokens for every owner: nobody wrote into it alone.
                seen = owner_tokens.setdefault(b.block_id, (fill, toks))
                _check(seen == (fill, toks),
                       f"shared block {b.block_id} holds different tokens for different owners")


def _check(ok: bool, message: str) -> None:
    """An invariant check that `python -O` keeps (the server relies on it to decide whether to go on)."""
    if not ok:
        raise InvariantError(message)
