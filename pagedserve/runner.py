"""ModelRunner: owns the KV cache tensors; turns a SchedulerOutput into tensors, runs the model, returns logits."""
from __future__ import annotations

import torch

from pagedserve.attention import AttentionMetadata, copy_blocks
from pagedserve.outputs import SchedulerOutput


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int, dtype: torch.dtype, device: str = "cpu") -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        # One K and one V tensor per layer: [num_blocks, block_size, num_kv_heads, head_dim]
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(num_layers)]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampled, vocab] for the sequences with sample=True."""
        copy_blocks(self.kv_caches, sched.blocks_to_copy)
        seqs = sched.sequences
        tokens: list[int] = []
        positions: list[int] = []
        for s in seqs:
            tokens.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))
        query_lens = [len(s.token_ids) for s in seqs]
        meta = AttentionMetadata.build([s.block_ids for s in seqs], query_lens,
                                       [s.start_pos + q for s, q in zip(seqs, query_lens)],
                                       self.block_size, self.device)
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, pos, self.kv_caches, meta)  # [T, H]
        last = meta.query_start_loc[1:] - 1
        sample_rows = torch.tensor([i for i, s in enumerate(seqs) if s.sample], dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[last[sample_rows]])
