"""Paged attention: one op every layer calls, plus the block copies for copy-on-write."""
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.attention.torch_backend import copy_blocks, paged_attention, write_kv_cache

__all__ = ["AttentionMetadata", "copy_blocks", "paged_attention", "write_kv_cache"]
