"""Tensor parallelism's two small parts: which slice of every layer a rank holds (`ShardPlan`), and the
collectives the model calls (`TPGroup`, over torch.distributed: gloo on the CPU, NCCL on CUDA).

The split, as Megatron-LM and vLLM do it: q/k/v and gate/up are split by output rows (column-parallel),
o and down by input columns (row-parallel, one all-reduce each), so a layer costs two all-reduces. Heads
go to ranks whole, grouped by KV head: a rank holds a contiguous run of KV heads and the query heads that
read them, so attention needs no communication. When the KV heads do not split evenly (SmolLM2's 3 over
2 ranks) the runs are uneven (1 and 2 heads): nothing is stored twice, and one rank does more attention
work. When there are fewer KV heads than ranks, each KV head is replicated on the ranks that share its
query heads. The vocabulary is split for the embedding (each rank looks up its own ids, an all-reduce
sums) and the LM head (each rank's logits are gathered to rank 0, which samples).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


def _run(n: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of `parts` contiguous runs that split range(n) as evenly as possible."""
    return index * n // parts, (index + 1) * n // parts


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world_size: int
    q_heads: tuple[int, int]       # [first, end) of the query heads this rank holds
    kv_heads: tuple[int, int]      # [first, end) of the KV heads
    intermediate: tuple[int, int]  # [first, end) of the MLP's intermediate columns
    vocab: tuple[int, int]         # [first, end) of the vocabulary rows (embedding and LM head)
    vocab_per_rank: int            # the widest rank's vocabulary share: the gather's padded width
    vocab_size: int

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def shard_plan(num_heads: int, num_kv_heads: int, intermediate_size: int, vocab_size: int,
               rank: int, world_size: int) -> ShardPlan:
    """The slices rank `rank` of `world_size` holds. Raises ValueError when the heads cannot be split."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    group = num_heads // num_kv_heads  # query heads per KV head
    if num_kv_heads >= world_size:
        kv = _run(num_kv_heads, world_size, rank)
        q = (kv[0] * group, kv[1] * group)
    elif world_size % num_kv_heads == 0 and num_heads % world_size == 0:
        q = _run(num_heads, world_size, rank)  # within one KV head's group: that head is replicated
        kv = (q[0] // group, q[0] // group + 1)
    else:
        raise ValueError(f"{num_heads} query heads over {num_kv_heads} KV heads cannot be split over "
                         f"{world_size} ranks: with fewer KV heads than ranks, the ranks must be a multiple "
                         f"of the KV heads and divide the query heads")
    per_rank = -(-vocab_size // world_size)
    if (world_size - 1) * per_rank >= vocab_size:
        raise ValueError(f"a vocabulary of {vocab_size} cannot be split over {world_size} ranks")
    return ShardPlan(rank, world_size, q, kv, _run(intermediate_size, world_size, rank),
                     (min(rank * per_rank, vocab_size), min((rank + 1) * per_rank, vocab_size)), per_rank,
                     vocab_size)


def model_shard_plan(cfg, rank: int, world_size: int) -> ShardPlan:
    """shard_plan of a model's config (model/config.py's ModelConfig)."""
    return shard_plan(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size,
                      rank, world_size)


# HF parameter name (within a layer, without the layer prefix) -> (the dimension split, what it is split by)
_SPLIT = {
    "self_attn.q_proj": (0, "q"), "self_attn.k_proj": (0, "kv"), "self_attn.v_proj": (0, "kv"),
    "self_attn.o_proj": (1, "q"), "mlp.gate_proj": (0, "i"), "mlp.up_proj": (0, "i"), "mlp.down_proj": (1, "i"),
}


def weight_slice(plan: ShardPlan, name: str, head_dim: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of the HF tensor `name` that this rank holds; None: the whole tensor (norms, and
    the biases of row-parallel layers, which are added once after the all-reduce)."""
    name = name.removeprefix("model.")
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return (0, *plan.vocab)
    fields = name.split(".")
    if fields[0] != "layers" or len(fields) != 5:
        return None
    split = _SPLIT.get(".".join(fields[2:4]))
    if split is None:
        return None
    dim, by = split
    if fields[4] == "bias" and dim == 1:
        return None
    first, end = {"q": plan.q_heads, "kv": plan.kv_heads, "i": plan.intermediate}[by]
    scale = 1 if by == "i" else head_dim
    return 0 if fields[4] == "bias" else dim, first * scale, end * scale


class TPGroup:
    """This process's place in the tensor-parallel group, and the collectives the model calls."""

    def __init__(self, plan: ShardPlan, group: dist.ProcessGroup | None = None) -> None:
        self.plan = plan
        self.rank, self.world_size = plan.rank, plan.world_size
        self.group = group

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (a row-parallel layer's partial products)."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor | None:
        """This rank's logits [n, its vocabulary share] -> the whole [n, V] on rank 0, None elsewhere."""
        width = self.plan.vocab_per_rank
        if logits.shape[1] < width:  # the last rank's share may be narrower: pad, so all sizes match
            logits = torch.nn.functional.pad(logits, (0, width - logits.shape[1]))
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=0, group=self.group)
        if parts is None:
            return None
        return torch.cat(parts, dim=1)[:, :self.plan.vocab_size]


def init_process_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the group; every collective after this fails after timeout_s instead of waiting forever."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
