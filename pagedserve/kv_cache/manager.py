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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from pagedserve.kv_cache.block_pool import BlockPool, InvariantError, KVCacheBlock, hash_block
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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 kv_reservation: str = "none", max_model_len: int | None = None) -> None:
        if kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {KV_RESERVATIONS}, got {kv_reservation!r}")
        if kv_reservation != "none" and max_model_len is None:
            raise ValueError(f"kv_reservation={kv_reservation!r} needs max_model_len")
        self.block_size = block_size
        self.kv_reservation = kv_reservation
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_num_tokens: dict[str, int] = {}      # tokens in the cache once this step has run
        self.req_final_len: dict[str, int] = {}       # the length the request can grow to
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already registered as cached
        self._salts: dict[str, str | None] = {}
        self._blocks_to_copy: list[tuple[int, int]] = []
        # accounting
        self.peak_blocks_used = 0
        self.prefix_cache_queries = 0  # tokens looked up at admission (vLLM's semantics)
        self.prefix_cache_hits = 0     # of those, tokens found in the cache
        self.num_steps_recorded = 0
        self._utilization_sum = 0.0
        self.usage_sum = SlotUsage()

    # ---- lookup -------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of a request's tokens: (blocks, number of tokens).

        At least the last token is always left to compute, since sampling needs its logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        self._update_block_hashes(request)
        B = self.block_size
        hits: list[KVCacheBlock] = []
        for i in range((request.num_tokens - 1) // B):
            block = self.pool.get_cached_block(request.block_hashes[i], request.all_token_ids[i * B:(i + 1) * B])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * B

    # ---- allocation ---------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = ()) -> list[int] | None:
        """Make room for the next num_new_tokens of a request; None (and no change) if the pool is full.

        new_computed_blocks: prefix-cache hits from get_computed_blocks, for a request being
        admitted (its num_computed_tokens is 0 and becomes their token count once admitted).
        Returns the ids of the blocks newly taken from the pool.
        """
        B = self.block_size
        rid = request.request_id
        is_new = rid not in self.req_to_blocks
        blocks = self.req_to_blocks.get(rid, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * B
        total = num_computed + num_new_tokens
        if total > request.num_tokens:
            raise ValueError(f"request {rid}: cannot compute {total} tokens, it has {request.num_tokens}")
        have = len(blocks) + len(new_computed_blocks)
        num_fresh = max(0, max(cdiv(total, B), self.reserved_blocks(request)) - have)
        # Copy-on-write: a shared block this step writes into is replaced by a private copy.
        written = range(num_computed // B, min(cdiv(total, B), len(blocks)))
        shared = [i for i in written if blocks[i].ref_cnt > 1]
        # Hits that sit in the free queue stop being free once touched.
        free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_fresh + len(shared) > self.pool.num_free_blocks - free_hits:
            return None

        if is_new:
            self.req_to_blocks[rid] = blocks
            self._num_cached_blocks[rid] = len(new_computed_blocks)
            self._salts[rid] = request.cache_salt
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * B
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        taken = self.pool.get_new_blocks(num_fresh + len(shared))
        for i, fresh in zip(shared, taken[num_fresh:]):
            if i * B < num_computed:  # holds valid tokens: the model runner copies them first
                self._blocks_to_copy.append((blocks[i].block_id, fresh.block_id))
            self.pool.free_blocks([blocks[i]])
            blocks[i] = fresh
        blocks.extend(taken[:num_fresh])
        for i in written:
            if blocks[i].ref_cnt != 1:
                raise InvariantError(f"block {blocks[i].block_id} is shared but about to be written")

        self.req_num_tokens[rid] = total
        self.req_final_len[rid] = self._final_len(request)
        self.peak_blocks_used = max(self.peak_blocks_used, self.pool.num_used_blocks)
        return [b.block_id for b in taken]

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
        """Return a finished, aborted or preempted request's blocks, tail first (tails are evicted first)."""
        rid = request if isinstance(request, str) else request.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        if blocks is None:
            return
        for d in (self.req_num_tokens, self.req_final_len, self._num_cached_blocks, self._salts):
            d.pop(rid, None)
        self.pool.free_blocks(reversed(blocks))

    def take_blocks_to_copy(self) -> list[tuple[int, int]]:
        """The (src, dst) copy-on-write copies recorded since the last call, for the model runner."""
        out, self._blocks_to_copy = self._blocks_to_copy, []
        return out

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
        return self.pool.reset_prefix_cache()

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
