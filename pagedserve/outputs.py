"""The plain types that cross layers: what the scheduler hands the runner, and what users get back."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduledSequence:
    """One sequence's work in a step, as the model runner needs it (never a Request)."""
    request_id: str
    token_ids: list[int]      # the new tokens to compute this step
    start_pos: int            # position of token_ids[0] (= tokens already in the KV cache)
    block_ids: list[int]      # the whole block table after this step's allocation
    sample: bool              # True when this chunk reaches the end of the sequence: sample a token
    # Prompt logprobs: top-N wanted (None: not wanted), and the prompt tokens this chunk's positions predict
    # (token_ids[1:] plus the next prompt token, if any): their log-probabilities are returned.
    prompt_logprobs: int | None = None
    prompt_targets: list[int] = field(default_factory=list)


@dataclass
class BlockTransfers:
    """The copies a step needs before its forward, in this order: pool -> tier (offload: (block, slot)),
    tier -> pool (load: (slot, block)), then copy-on-write inside the pool (copy: (src, dst))."""
    offload: list[tuple[int, int]] = field(default_factory=list)
    load: list[tuple[int, int]] = field(default_factory=list)
    copy: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.offload or self.load or self.copy)


@dataclass
class SchedulerOutput:
    """A step's batch (in the scheduler's order; the attention backend lays it out as its kernels need),
    plus the block copies to run before its forward (offload tier and copy-on-write)."""
    sequences: list[ScheduledSequence] = field(default_factory=list)
    transfers: BlockTransfers = field(default_factory=BlockTransfers)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences and not self.transfers


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # One dict per generated token: token id -> Logprob (the sampled token and the top-N)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict | None = None
    # One entry per prompt token (None for the first, which nothing predicts), for requests that asked
    # (SamplingParams.prompt_logprobs); sent once, in the first output after the prompt is computed.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class BeamSearchSequence:
    """One hypothesis of a beam search (vLLM's name): prompt and output tokens, the output's text, the sum of
    its tokens' log-probabilities, and the score it was ranked by (cum_logprob / len(output) ** length_penalty)."""
    tokens: list[int]
    text: str
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (ended by EOS) | "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first
