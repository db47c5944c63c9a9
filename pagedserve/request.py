"""Request: one sequence the engine is generating, as the scheduler and KV cache manager see it."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    cache_salt: str | None = None
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Prompt and output tokens together; the KV cache holds the first num_computed_tokens of them.
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Chained hashes of the full blocks of all_token_ids, filled in by the KV cache manager.
    block_hashes: list[bytes] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = -1  # prefix cache hit at first admission, -1 until admitted
    # Index of this sample among the n of its parent request (parallel sampling).
    sample_index: int = 0
    parent_id: str | None = None
    # A beam whose next-token logits are in, waiting for its siblings' (beams step together): not scheduled.
    held: bool = False

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
