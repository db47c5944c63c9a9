"""Paged attention: the AttentionBackend interface and its backends, the metadata they read, block copies."""
from pagedserve.attention.backend import ATTENTION_BACKENDS, AttentionBackend, select_backend
from pagedserve.attention.metadata import AttentionMetadata, MetadataBuilder
from pagedserve.attention.torch_backend import TorchBackend, copy_blocks, paged_attention, write_kv_cache

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "MetadataBuilder", "TorchBackend",
           "copy_blocks", "paged_attention", "select_backend", "write_kv_cache"]
