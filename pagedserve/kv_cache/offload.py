"""The second KV tier: a bounded store of block contents behind the block pool, in host memory or in a file.

The pool's full blocks are keyed by their chained hash (the cache salt is in the chain, so tenants stay
apart here too, and every hit still double-checks the tokens). When the pool reuses a cached block, its
K/V are written here first; a later request whose prefix misses the pool but hits here has those blocks
loaded back instead of computed again. A request preempted in swap mode parks every computed block here
(a partial last block under a key of its own) and gets them back when it resumes.

OffloadTier is the index only: which key lives in which slot, least recently used first, and the pins
that keep an entry while a swapped request or the step in flight needs it. The model runner owns the
slot tensor (tier_storage) and runs the copies (offload_blocks, load_blocks) that the KV cache manager
lists for each step, before that step's forward.

An entry stored during a step counts only once the step has run: a failed step drops the entries it
stored (end_step(ok=False)), so nothing ever points at K/V that were never copied.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from pagedserve.device import to_device
from pagedserve.kv_cache.block_pool import InvariantError


@dataclass(eq=False)
class TierEntry:
    key: bytes
    slot: int
    token_ids: tuple[int, ...]
    pins: int = 0
    transient: bool = False  # a swapped request's own block (no hash): dropped once nobody pins it
    fresh: bool = True       # stored by the step in flight


class OffloadTier:
    """num_slots block-sized slots; entries by key. The LRU holds the evictable entries, oldest first: those
    unpinned and stored by an earlier step (evicting one stored by the step in flight would waste its copy)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the offload tier needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self._entries: dict[bytes, TierEntry] = {}
        self._lru: OrderedDict[bytes, TierEntry] = OrderedDict()  # evictable entries, least recent first
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._stored_this_step: list[TierEntry] = []
        self._pinned_for_step: list[TierEntry] = []
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_available(self) -> int:
        """Slots a store can take now: free ones, then the evictable entries'."""
        return len(self._free_slots) + len(self._lru)

    def lookup(self, key: bytes, token_ids: Sequence[int]) -> TierEntry | None:
        """The entry under key if it holds exactly these tokens; it becomes the most recently used."""
        entry = self._entries.get(key)
        if entry is None or entry.token_ids != tuple(token_ids):
            return None
        if key in self._lru:
            self._lru.move_to_end(key)
        return entry

    def store(self, key: bytes, token_ids: Sequence[int], transient: bool = False) -> tuple[TierEntry | None, bool]:
        """Room for a block under key: (entry, whether the caller must copy the block into entry.slot).

        An entry already holding these tokens is reused (nothing to copy); otherwise a free slot, or the
        least recently used evictable entry's, is taken. (None, False) when no slot is free or evictable.
        """
        entry = self.lookup(key, token_ids)
        if entry is not None:
            return entry, False
        if key in self._entries:  # same key, other tokens: only a broken hash could do it; keep the old one
            return None, False
        if self._free_slots:
            slot = self._free_slots.pop()
        elif self._lru:
            _, old = self._lru.popitem(last=False)
            del self._entries[old.key]
            self.num_evictions += 1
            slot = old.slot
        else:
            return None, False
        entry = TierEntry(key, slot, tuple(token_ids), transient=transient)
        self._entries[key] = entry
        self._stored_this_step.append(entry)  # evictable from the end of this step on
        return entry, True

    def pin(self, entry: TierEntry) -> None:
        if entry.pins == 0:
            self._lru.pop(entry.key, None)
        entry.pins += 1

    def unpin(self, entry: TierEntry) -> None:
        if entry.pins <= 0:
            raise InvariantError(f"tier slot {entry.slot} unpinned more often than pinned")
        entry.pins -= 1
        if entry.pins == 0:
            if entry.transient:
                self._drop(entry)
            elif not entry.fresh:
                self._lru[entry.key] = entry

    def pin_for_step(self, entry: TierEntry) -> None:
        """Keep an entry until the step in flight has run (its slot is read by that step's loads)."""
        self.pin(entry)
        self._pinned_for_step.append(entry)

    def end_step(self, ok: bool) -> None:
        """The step in flight ran (ok) or failed: release its pins; a failed step's stores never happened."""
        for entry in self._pinned_for_step:
            self.unpin(entry)
        self._pinned_for_step = []
        for entry in self._stored_this_step:
            entry.fresh = False
            if self._entries.get(entry.key) is not entry:
                continue  # a transient entry already loaded back and dropped
            if not ok:
                if entry.pins:
                    raise InvariantError(f"tier slot {entry.slot} of a failed step is still pinned")
                self._drop(entry)
            elif entry.pins == 0:
                self._lru[entry.key] = entry
        self._stored_this_step = []

    def clear(self) -> int:
        """Drop every unpinned entry; returns how many."""
        dropped = list(self._lru.values())
        for entry in dropped:
            self._drop(entry)
        return len(dropped)

    def _drop(self, entry: TierEntry) -> None:
        del self._entries[entry.key]
        self._lru.pop(entry.key, None)
        self._free_slots.append(entry.slot)

    def check_invariants(self) -> None:
        slots = [e.slot for e in self._entries.values()] + self._free_slots
        if sorted(slots) != list(range(self.num_slots)):
            raise InvariantError("the offload tier lost or doubled a slot")
        for key, entry in self._entries.items():
            if entry.key != key or (entry.pins == 0 and not entry.fresh) != (key in self._lru) or entry.pins < 0:
                raise InvariantError(f"tier entry in slot {entry.slot}: pins {entry.pins} and LRU disagree")
        if len(self._lru) > len(self._entries):
            raise InvariantError("the tier's LRU holds an entry it does not index")


# ---- the slot tensor and the copies, run by the model runner -------------------------------------------
def tier_storage(num_slots: int, num_layers: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 directory: str | None = None, pin_memory: bool = False) -> torch.Tensor:
    """The tier's slots: [num_slots, num_layers, 2 (K, V), *block_shape], one slot's layers contiguous.

    In host memory (page-locked with pin_memory, for a CUDA pool's copies), or with directory a memory-mapped
    file there (unlinked at once: it lives as long as the tensor, and the OS pages it between RAM and disk,
    so the tier may be larger than RAM).
    """
    shape = (num_slots, num_layers, 2, *block_shape)
    if directory is None:  # empty, not zeros: on the CPU, pages are committed as slots are first written
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    os.makedirs(directory, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="pagedserve-kv-", suffix=".bin", dir=directory)
    try:
        numel = 1
        for d in shape:
            numel *= d
        size = numel * torch.empty((), dtype=dtype).element_size()
        try:  # reserved now: a sparse file that later finds the disk full would kill the process (SIGBUS)
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            raise ValueError(f"cannot reserve {size} bytes for the KV offload tier in {directory}: {e}") from None
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)
        os.unlink(path)


def offload_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], tier: torch.Tensor,
                   pairs: list[tuple[int, int]]) -> None:
    """Copy pool blocks into tier slots: pairs of (block id, slot)."""
    if not pairs:
        return
    blocks = to_device([p[0] for p in pairs], kv_caches[0][0].device)
    slots = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    for layer, (k_cache, v_cache) in enumerate(kv_caches):
        tier[slots, layer, 0] = k_cache.index_select(0, blocks).to(tier.device)
        tier[slots, layer, 1] = v_cache.index_select(0, blocks).to(tier.device)


def load_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], tier: torch.Tensor,
                pairs: list[tuple[int, int]]) -> None:
    """Copy tier slots into pool blocks: pairs of (slot, block id)."""
    if not pairs:
        return
    slots = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    device = kv_caches[0][0].device
    blocks = to_device([p[1] for p in pairs], device)
    for layer, (k_cache, v_cache) in enumerate(kv_caches):
        k_cache.index_copy_(0, blocks, tier[slots, layer, 0].to(device))
        v_cache.index_copy_(0, blocks, tier[slots, layer, 1].to(device))
