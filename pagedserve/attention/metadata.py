"""AttentionMetadata: how one flat, unpadded token batch maps onto the paged KV cache.

The runner builds it once per step; every attention layer reads it. Sequences are
ordered decodes first (query_len == 1), then prefill chunks, so backends can take the
decode rows as one batched op: `num_decodes` sequences own the first `num_decodes` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # slot_mapping: [T] int64, physical slot (block_id * block_size + offset) of each new token's K/V
    slot_mapping: torch.Tensor
    # block_tables: [S, max_blocks] int64, physical block ids per sequence, padded with 0
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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], seq_lens: list[int],
              block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for sequences given by block table, new-token count and total length.

        The new tokens of sequence s sit at positions [seq_len - query_len, seq_len).
        """
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        max_blocks = max((len(t) for t in block_tables), default=0)
        table = torch.zeros((len(block_tables), max(max_blocks, 1)), dtype=torch.int64)
        for i, t in enumerate(block_tables):
            table[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
        slots: list[int] = []
        for t, q, s in zip(block_tables, query_lens, seq_lens):
            for pos in range(s - q, s):
                slots.append(t[pos // block_size] * block_size + pos % block_size)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=table.to(device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int64, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
            query_lens_list=list(query_lens),
            seq_lens_list=list(seq_lens),
            num_decodes=num_decodes,
            block_size=block_size,
        )
