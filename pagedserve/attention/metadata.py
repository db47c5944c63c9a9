"""AttentionMetadata: how one flat, unpadded token batch maps onto the paged KV cache.

The runner builds it once per step (MetadataBuilder, vectorised on the CPU, then sent to the device
without a sync); every attention layer reads it. Sequences are laid out in the order their backend asked
for (both CPU backends: decodes, query_len == 1, first), so `num_decodes` sequences own the first
`num_decodes` tokens. Block-table rows are padded with a reserved null block, never a real one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from pagedserve.device import to_device

if TYPE_CHECKING:
    from pagedserve.attention.backend import AttentionBackend


@dataclass
class AttentionMetadata:
    # slot_mapping: [T] int64, physical slot (block_id * block_size + offset) of each new token's K/V
    slot_mapping: torch.Tensor
    # block_tables: [S, max_blocks] int64, physical block ids per sequence, padded with the null block
    block_tables: torch.Tensor
    # query_start_loc: [S + 1] int64, cumulative query lengths: sequence s owns tokens [qsl[s], qsl[s+1])
    query_start_loc: torch.Tensor
    # seq_lens: [S] int64, context length of each sequence after this step (cached + new tokens)
    seq_lens: torch.Tensor
    # Python-side copies, so backends never sync on tensor values
    query_lens_list: list[int]
    seq_lens_list: list[int]
    num_decodes: int  # the first num_decodes sequences have query_len == 1
    block_size: int
    backend: AttentionBackend | None = None  # runs the layer op (torch_backend.paged_attention)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], seq_lens: list[int],
              block_size: int, device: torch.device | str = "cpu", backend: AttentionBackend | None = None,
              null_block: int = 0) -> "AttentionMetadata":
        """Metadata for sequences given by block table, new-token count and total length, in this order.

        The new tokens of sequence s sit at positions [seq_len - query_len, seq_len). backend: None
        is the torch backend.
        """
        if backend is None:
            from pagedserve.attention.torch_backend import TorchBackend
            backend = TorchBackend()
        builder = MetadataBuilder(block_size, null_block, device)
        starts = [s - q for s, q in zip(seq_lens, query_lens)]
        return builder.build(block_tables, query_lens, starts, backend)[1]


class MetadataBuilder:
    """Builds a step's positions and AttentionMetadata with a few vectorised ops: no Python loop over tokens
    or block-table entries."""

    def __init__(self, block_size: int, null_block: int, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.null_block = null_block
        self.device = torch.device(device)

    def build(self, block_tables: Sequence[Sequence[int]], query_lens: list[int], start_positions: list[int],
              backend: AttentionBackend) -> tuple[torch.Tensor, AttentionMetadata]:
        """(positions [T], metadata) for sequences in this order, given each one's block table, number of
        new tokens and the position of the first. Computed on the CPU and sent to the device in one go, with
        no sync."""
        B = self.block_size
        S = len(query_lens)
        seq_lens = [p + q for p, q in zip(start_positions, query_lens)]
        num_decodes = 0
        while num_decodes < S and query_lens[num_decodes] == 1:
            num_decodes += 1
        lens = [len(t) for t in block_tables]
        table = torch.full((S, max(lens, default=1) or 1), self.null_block, dtype=torch.int64)
        flat = torch.tensor(list(itertools.chain.from_iterable(block_tables)), dtype=torch.int64)
        if flat.numel():
            lens_t = torch.tensor(lens)
            rows = torch.repeat_interleave(torch.arange(S), lens_t)
            first = lens_t.cumsum(0) - lens_t  # each row's offset into flat
            table[rows, torch.arange(flat.numel()) - first[rows]] = flat
        qlens = torch.tensor(query_lens, dtype=torch.int64)
        qsl = torch.zeros(S + 1, dtype=torch.int64)
        torch.cumsum(qlens, 0, out=qsl[1:])
        T = sum(query_lens)
        seq_of_token = torch.repeat_interleave(torch.arange(S), qlens, output_size=T)
        positions = (torch.arange(T) - qsl[:-1][seq_of_token]
                     + torch.tensor(start_positions, dtype=torch.int64)[seq_of_token])
        slot_mapping = table[seq_of_token, positions // B] * B + positions % B
        table, positions, slot_mapping, qsl, seq_lens_t = (to_device(t, self.device) for t in (
            table, positions, slot_mapping, qsl, torch.tensor(seq_lens, dtype=torch.int64)))
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=table, query_start_loc=qsl, seq_lens=seq_lens_t,
            query_lens_list=list(query_lens), seq_lens_list=seq_lens, num_decodes=num_decodes,
            block_size=B, backend=backend)
        return positions, meta
