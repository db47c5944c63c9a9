"""The block pool: physical KV blocks, their reference counts, the LRU free queue and the prefix-cache map.

Invariants (checked by KVCacheManager.check_invariants):
- a block is in the free queue exactly when its ref_cnt is 0;
- a block with a block_hash is full, and cached_blocks[block_hash] is that block;
- eviction is lazy: a freed block keeps its hash (and stays findable) until it is taken for reuse.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence


class InvariantError(RuntimeError):
    """The KV cache's bookkeeping is inconsistent: a bug, never a user error; the engine cannot go on."""


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int], extra: str | None = None) -> bytes:
    """The chained hash of one full block: SHA-256 over a canonical, length-prefixed encoding.

    Why SHA-256 and not Python's hash(): a block hit hands one request another's KV
    states, so with a shared cache a forged collision would leak one tenant's prompt to
    another. A cryptographic hash over an unambiguous encoding (lengths prefixed, fixed-width
    token ids) makes such a collision infeasible. `extra` carries the cache salt (tenant
    identity, per-request cache_salt): different salts never produce the same chain.
    """
    h = hashlib.sha256()
    h.update(b"P" + (parent_hash or b""))
    salt = (extra or "").encode("utf-8", "surrogatepass")  # any str, even a lone surrogate, has one encoding
    h.update(struct.pack("<Q", len(salt)) + salt)
    h.update(struct.pack(f"<Q{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and registered in the prefix cache.
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens hashed, to double-check every hit
    # Free-queue links: intrusive, so a cached block is removed from the middle in O(1).
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head (LRU), append to the tail, remove anywhere."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels keep the link updates branch-free
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> KVCacheBlock:
        if self.num_free == 0:
            raise IndexError("no free block")
        block = self._head.next_free
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        b = self._head.next_free
        while b is not self._tail:
            yield b
            b = b.next_free

    def ids(self) -> list[int]:
        return [b.block_id for b in self]

    def __len__(self) -> int:
        return self.num_free


class BlockPool:
    """num_blocks physical blocks of block_size slots; hands out, shares, caches and frees them."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 on_evict: Callable[[KVCacheBlock], None] | None = None) -> None:
        """on_evict: called with a cached block about to be reused, while its K/V are still intact (the
        KV cache manager writes it to the offload tier)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[bytes, KVCacheBlock] = {}
        self.num_evictions = 0
        self.on_evict = on_evict

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free

    def get_cached_block(self, block_hash: bytes, token_ids: Sequence[int]) -> KVCacheBlock | None:
        """The block cached under this hash, if its stored tokens are exactly these."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take n blocks from the head of the free queue (least recently used), evicting their hashes."""
        if n > self.free_queue.num_free:
            raise ValueError(f"asked for {n} blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None and self.on_evict is not None:
                self.on_evict(block)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference to blocks that are already filled (a prefix hit or a fork)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue's tail in the given order."""
        for block in blocks_in_eviction_order:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise InvariantError(f"block {block.block_id} freed more often than referenced")
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVCacheBlock, block_hash: bytes, token_ids: Sequence[int]) -> None:
        """Register a full block under its chained hash so that later requests can share it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_blocks:
            return  # another block already holds these tokens; this one stays private
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.cached_blocks[block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        self.num_evictions += 1

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash of a free block; returns how many were dropped."""
        dropped = 0
        for block in self.free_queue:
            if block.block_hash is not None:
                self._evict(block)
                dropped += 1
        return dropped
