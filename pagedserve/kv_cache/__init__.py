"""The paged KV cache: a pool of fixed-size blocks and the per-request block tables over it."""
from pagedserve.kv_cache.block_pool import BlockPool, FreeBlockQueue, InvariantError, KVCacheBlock, hash_block
from pagedserve.kv_cache.manager import CachedPrefix, KVCacheManager, SlotUsage

__all__ = ["BlockPool", "CachedPrefix", "FreeBlockQueue", "InvariantError", "KVCacheBlock", "KVCacheManager", "SlotUsage",
           "hash_block"]
