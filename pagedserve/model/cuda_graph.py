"""CudaGraphs: pure-decode steps replayed as CUDA graphs, one captured per batch size of a ladder.

A decode step of a small batch is a few hundred kernel launches whose host-side cost (Python, dispatch,
Triton's launcher) exceeds the GPU's work. Captured once per batch size over persistent input buffers,
a step becomes a few copies into the buffers and one replay. A batch of n rows runs the smallest captured
size >= n; the padded rows have slot -1 (their K/V are not written), length 0 and the null block's
table, so they read nothing and their outputs are dropped.

What makes a captured graph valid for every later batch of its size: the model and the attention
backend take every data-dependent number from the device buffers, never from Python (the metadata a
graph is captured with carries max_model_len as each row's Python length, an upper bound the backend
may size work by). Only the `triton` backend is written so; `torch` reads Python lengths.

The capture itself is a seam: `Capture` turns a function into a replayable one. On CUDA it records a
CUDA graph (`cuda_capture`); the tests pass one that runs the function again on every replay under a
guard that fails on any device-to-host read, which is what a real capture forbids.
"""
from __future__ import annotations

import bisect
from typing import Callable

import torch

from pagedserve.attention import AttentionBackend, AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The ladder: 1, 2, 4, 8, then every multiple of 8, up to and including max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def cuda_capture(pool) -> Capture:
    """Records fn as a CUDA graph in the shared memory pool; the replay returns the captured output tensor,
    refilled."""
    def capture(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the capture: Triton compiles, the allocator settles
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
    return capture


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[KVCache], backend: AttentionBackend,
                 block_size: int, null_block: int, max_model_len: int, max_num_seqs: int,
                 device: torch.device) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size, self.null_block, self.max_model_len = block_size, null_block, max_model_len
        self.sizes = batch_sizes(max_num_seqs)
        rows, width = self.sizes[-1], -(-max_model_len // block_size)
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(rows, **i64)
        self.positions = torch.zeros(rows, **i64)
        self.slot_mapping = torch.full((rows,), -1, **i64)
        self.seq_lens = torch.zeros(rows, **i64)
        self.block_tables = torch.full((rows, width), null_block, **i64)
        self.query_start_loc = torch.arange(rows + 1, **i64)  # one token per row
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.num_replays = 0  # steps replayed (observability and tests)

    def capture_all(self, capture: Capture) -> None:
        """Capture every size of the ladder, largest first (the smaller ones reuse its memory)."""
        for size in reversed(self.sizes):
            meta = AttentionMetadata(
                slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
                query_lens_list=[1] * size, seq_lens_list=[self.max_model_len] * size, num_decodes=size,
                block_size=self.block_size, backend=self.backend)
            ids, positions = self.input_ids[:size], self.positions[:size]
            self._replays[size] = capture(lambda ids=ids, positions=positions, meta=meta:
                                          self.model(ids, positions, self.kv_caches, meta))

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Whether this step is one the graphs serve: pure decode, within the largest size and the window."""
        return (bool(self._replays) and meta.num_decodes == meta.num_seqs <= self.sizes[-1]
                and max(meta.seq_lens_list) <= self.max_model_len)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The step's final-normed hidden states [n, H], from the replay of the smallest size that fits.
        The tensor is the graph's own output, valid until the next replay."""
        n = meta.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if n < size:  # the padded rows: nothing written, nothing read
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(0)
            self.block_tables[n:size].fill_(self.null_block)
        self.num_replays += 1
        return self._replays[size]()[:n]
