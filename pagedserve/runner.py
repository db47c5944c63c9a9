"""ModelRunner: owns the KV cache tensors and the attention backend; turns a SchedulerOutput into tensors,
runs the model, returns logits."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from pagedserve.attention import MetadataBuilder, copy_blocks, select_backend
from pagedserve.device import on_device, to_device
from pagedserve.kv_cache import sizing
from pagedserve.kv_cache.offload import load_blocks, offload_blocks, tier_storage
from pagedserve.model import cuda_graph, decode_graph
from pagedserve.model.packed_linear import pack_linears
from pagedserve.outputs import SchedulerOutput
from pagedserve.sampler import TokenLogprobs, logprobs_of

# Prompt logprobs are computed this many positions at a time: the logits of a whole prompt chunk (2048 x a
# 50k vocabulary) would take 400 MB.
PROMPT_LOGITS_ROWS = 256


@dataclass
class ModelOutput:
    # [num_sampled, V] float32: the last position of each sampled sequence, scheduler order (None on the
    # tensor-parallel ranks other than 0, which sample nothing)
    logits: torch.Tensor | None
    # Per sequence that asked (ScheduledSequence.prompt_logprobs): one entry per prompt_targets token.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    """Built in two stages: the model and its attention backend, then (allocate_kv_caches) the KV cache, once
    its size is known; on CUDA a profiling forward (profile_run) between the two measures what the KV cache
    may take."""

    def __init__(self, model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, device: str = "cpu", attention_backend: str = "auto",
                 max_num_seqs: int = 256, max_model_len: int = 2048, enforce_eager: bool = False) -> None:
        self.model = model
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.dtype = block_size, dtype
        self.max_num_seqs, self.max_model_len, self.enforce_eager = max_num_seqs, max_model_len, enforce_eager
        self.device = torch.device(device)
        self.num_packed_linears = pack_linears(model, dtype, self.device)
        self.backend = select_backend(attention_backend, self.device, dtype, head_dim, block_size)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_tier: torch.Tensor | None = None
        self.metadata_builder: MetadataBuilder | None = None  # with the KV cache: it pads with its null block
        self.decode_graph: decode_graph.DecodeGraph | None = None
        self.cuda_graphs: cuda_graph.CudaGraphs | None = None

    @on_device
    def allocate_kv_caches(self, num_blocks: int, num_offload_blocks: int = 0, offload_dir: str | None = None) -> None:
        """The KV cache of num_blocks blocks (and the offload tier's slots), then what reads it in place: the
        CPU decode graph, or on CUDA the captured decode graphs."""
        # One K and one V tensor per layer: [num_blocks + 1, block_size, num_kv_heads, head_dim]. The extra
        # block (id num_blocks, never handed out by the pool) is the null block that pads block-table rows:
        # a backend reading past a sequence's length reads zeros there, never another request's K/V.
        shape = (num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        # The offload tier's slots (kv_cache/offload.py), in host memory or a file: K/V of blocks the pool let go.
        self.kv_tier = (tier_storage(num_offload_blocks, self.num_layers, shape[1:], self.dtype, offload_dir,
                                     pin_memory=self.device.type == "cuda") if num_offload_blocks else None)
        self.metadata_builder = MetadataBuilder(self.block_size, num_blocks, self.device)
        self.decode_graph = self.cuda_graphs = None
        if self.enforce_eager:
            return
        # Pure-decode steps replay the model as a fixed list of kernel calls where it can (decode_graph.py) ...
        if decode_graph.unsupported(self.model, self.kv_caches, self.backend.name) is None:
            self.decode_graph = decode_graph.DecodeGraph(self.model, self.kv_caches, self.max_num_seqs)
        # ... or, on CUDA with a backend that takes its lengths from device tensors, as CUDA graphs.
        elif self.device.type == "cuda" and self.backend.name == "triton":
            self.capture_cuda_graphs(cuda_graph.cuda_capture(torch.cuda.graph_pool_handle()))

    @on_device
    def capture_cuda_graphs(self, capture: cuda_graph.Capture) -> None:
        """Capture the decode graphs of every batch size with `capture` (cuda_graph.py: on CUDA a real
        capture; the tests pass one that replays by running again, on the CPU)."""
        graphs = cuda_graph.CudaGraphs(self.model, self.kv_caches, self.backend, self.block_size,
                                       self.kv_caches[0][0].shape[0] - 1, self.max_model_len, self.max_num_seqs,
                                       self.device)
        with torch.inference_mode():
            graphs.capture_all(capture)
        self.cuda_graphs = graphs

    def kv_cache_bytes(self) -> int:
        """Bytes of this runner's K and V tensors (the pool's blocks and the null block)."""
        return sum(t.numel() * t.element_size() for pair in self.kv_caches for t in pair)

    @on_device
    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """The largest steps the scheduler may send, on dummy tokens, without the KV cache: num_tokens over
        num_seqs prefill sequences (more where one would pass the window) with the logits of num_seqs rows,
        then one sequence as long as a step and the window allow (attention's temporaries grow with a
        chunk's length). What they allocate at their peak is what a step may need beyond the weights and
        the KV cache."""
        num_rows = max(1, min(num_seqs, num_tokens))
        num_seqs = max(num_rows, -(-num_tokens // self.max_model_len))  # none longer than the window
        self._profile_forward(sorted(num_tokens // num_seqs + (i < num_tokens % num_seqs)  # 1s first
                                     for i in range(num_seqs)), num_rows)
        self._profile_forward([min(num_tokens, self.max_model_len)], 1)

    def _profile_forward(self, lens: list[int], num_rows: int) -> None:
        width = -(-max(lens) // self.block_size)
        # A scratch cache of one sequence's blocks that every sequence shares: attention's working memory
        # without the pool (what it writes there is thrown away).
        shape = (width + 1, self.block_size, self.num_kv_heads, self.head_dim)
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(self.num_layers)]
        builder = MetadataBuilder(self.block_size, width, self.device)
        positions, meta = builder.build([list(range(width))] * len(lens), lens, [0] * len(lens), self.backend)
        ids = torch.zeros(sum(lens), dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions, scratch, meta)
        logits = self.model.compute_logits(hidden[:num_rows])
        if logits is not None:  # the sampler's largest temporary: top-p sorts each row's probabilities
            torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)

    @on_device
    def measure_kv_budget(self, num_tokens: int, num_seqs: int, utilization: float) -> int:
        """Bytes this device's KV cache may take (kv_cache/sizing.py), measured around profile_run."""
        probe = sizing.memory_probe(self.device)
        if probe is None:
            raise ValueError(f"the memory of {self.device} is not measured: give kv_cache_memory or num_kv_blocks")
        return sizing.profile_kv_cache_bytes(probe, lambda: self.profile_run(num_tokens, num_seqs), utilization)

    @on_device
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        """Run one step; returns float32 logits [num_sampled, vocab] for the sequences with sample=True, in
        the scheduler's order, and the prompt logprobs of the sequences that asked."""
        self.run_transfers(sched)
        if not sched.sequences:
            return ModelOutput(torch.empty(0, self.model.config.vocab_size))
        query_lens = [len(s.token_ids) for s in sched.sequences]
        order = self.backend.order(query_lens)  # the layout the backend's kernels want
        seqs = [sched.sequences[i] for i in order]
        positions, meta = self.metadata_builder.build(
            [s.block_ids for s in seqs], [query_lens[i] for i in order], [s.start_pos for s in seqs], self.backend)
        input_ids = to_device(list(itertools.chain.from_iterable(s.token_ids for s in seqs)), self.device)
        graph = self.decode_graph
        if graph is not None and meta.num_decodes == len(seqs) <= graph.max_rows:
            hidden = graph.run(input_ids, positions, meta)  # [T, H], bitwise what the model would return
        elif self.cuda_graphs is not None and self.cuda_graphs.can_run(meta):
            hidden = self.cuda_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, H]
        # The last token of each sampled sequence, in the scheduler's order.
        slot_of = {i: j for j, i in enumerate(order)}
        last = list(itertools.accumulate(query_lens[i] for i in order))
        rows = [last[slot_of[i]] - 1 for i, s in enumerate(sched.sequences) if s.sample]
        out = ModelOutput(self.model.compute_logits(hidden[to_device(rows, self.device)]))
        for i, s in enumerate(sched.sequences):
            if s.prompt_logprobs is not None and s.prompt_targets:
                first = last[slot_of[i]] - query_lens[i]
                out.prompt_logprobs[s.request_id] = self._prompt_logprobs(
                    hidden[first:first + len(s.prompt_targets)], s.prompt_targets, s.prompt_logprobs)
        return out

    def run_transfers(self, sched: SchedulerOutput) -> None:
        """The step's block copies, in the order that keeps every block's K/V intact until it is read:
        pool -> tier first (a block leaving the pool may be rewritten by this step), then tier -> pool, then
        copy-on-write."""
        t = sched.transfers
        offload_blocks(self.kv_caches, self.kv_tier, t.offload)
        load_blocks(self.kv_caches, self.kv_tier, t.load)
        copy_blocks(self.kv_caches, t.copy)

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprobs]:
        result: list[TokenLogprobs] = []
        for a in range(0, len(targets), PROMPT_LOGITS_ROWS):
            b = a + PROMPT_LOGITS_ROWS
            logits = self.model.compute_logits(hidden[a:b])  # every tensor-parallel rank: it gathers
            if logits is not None:  # None: a rank other than 0, which only lends its share
                result += logprobs_of(logits, targets[a:b], top_n)
        return result
