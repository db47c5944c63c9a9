"""The scheduler: one token budget per step, running requests first, then waiting ones in chunks.

There is no prefill phase: a request's num_computed_tokens catches up with its token
count, a chunk at a time. When the pool has no block for a running request, the most
recently admitted request is preempted (back to the head of the queue): by recompute (blocks
freed; it resumes later, usually from its own blocks still in the prefix cache or the KV
cache's second tier) or, with preemption_mode="swap", by swap (its blocks parked in the tier
and loaded back when it resumes; recompute when the tier has no room).

A step is two calls: schedule() allocates and emits the batch; commit_step() runs once the
model has written the batch's K/V and advances num_computed_tokens, making newly full
blocks findable in the prefix cache. If the step fails, abort_step() forgets it (the engine
aborts the requests it was computing), and nothing of it was ever visible to others.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pagedserve.kv_cache import KVCacheManager
from pagedserve.kv_cache.manager import CachedPrefix, cdiv
from pagedserve.outputs import ScheduledSequence, SchedulerOutput
from pagedserve.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"  # recompute | swap (to the KV cache's offload tier)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prefill_tokens_computed = 0
        self._in_flight: list[tuple[Request, int]] = []  # scheduled, not yet committed

    # ---- requests in and out ----------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Raise ValueError for a request that could never run (it would block the queue forever)."""
        n, limit = request.num_prompt_tokens, self.config.max_model_len
        if n == 0:
            raise ValueError("the prompt is empty")
        max_tokens = request.max_tokens or 0
        if n + max_tokens > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but the request has "
                             f"{n} prompt tokens and asks for {max_tokens} completion tokens ({n + max_tokens} in all)")
        B, pool = self.kv_cache.block_size, self.kv_cache.num_blocks
        samples = request.sampling_params.n
        # n samples share the prompt's full blocks; each needs its own tail and output blocks.
        needed = max(cdiv(n + max_tokens, B), self.kv_cache.reserved_blocks(request))
        needed += (samples - 1) * (needed - n // B)
        if needed > pool:
            raise ValueError(f"the request needs {needed} KV cache blocks ({n} prompt + {max_tokens} completion "
                             f"tokens, n={samples}), more than the whole pool of {pool} blocks of {B} tokens")

    def add_request(self, request: Request) -> None:
        self.check_request(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_forked(self, parent: Request, child: Request) -> None:
        """A parallel sample that shares the parent's blocks; it runs from now on as its own request."""
        child.all_token_ids = list(parent.all_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.kv_cache.fork(parent, child)
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish or abort a request wherever it is; its blocks return to the pool."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._in_flight:
            raise RuntimeError("the previous step was neither committed nor aborted")
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.held:  # nothing to compute until its beam siblings catch up
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while self.kv_cache.allocate_slots(req, n) is None:
                victim = self.running.pop()  # the most recently admitted: not scheduled yet this step
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append((req, n))
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: nothing after it is left

        # Admit waiting requests only when nobody had to be preempted this step.
        preempted_held: list[str] = []
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                if scheduled or not self._preempt_held(preempted_held):  # beams held at the limit: as below
                    break
                continue
            req = self.waiting[0]
            prefix = self.kv_cache.get_computed_blocks(req)
            if (req.sampling_params.prompt_logprobs is not None and req.num_output_tokens == 0
                    and not prefix.swapped_in):
                prefix = CachedPrefix()  # every prompt position's logits are wanted: compute them all
            num_hit = prefix.num_tokens
            n = req.num_tokens - num_hit
            if n > budget and not self.config.enable_chunked_prefill:
                if scheduled:
                    break
                budget = n  # longer than any budget: it runs alone, or it would block the queue forever
            n = min(n, budget)
            if self.kv_cache.allocate_slots(req, n, prefix) is None:
                if scheduled or not self._preempt_held(preempted_held):
                    break
                continue
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n

        out = SchedulerOutput(transfers=self.kv_cache.take_transfers(), preempted_ids=preempted + preempted_held)
        for req, n in scheduled:
            start = req.num_computed_tokens
            seq = ScheduledSequence(
                request_id=req.request_id, token_ids=req.all_token_ids[start:start + n], start_pos=start,
                block_ids=self.kv_cache.get_block_ids(req.request_id), sample=start + n == req.num_tokens)
            top_n = req.sampling_params.prompt_logprobs
            if top_n is not None and req.num_output_tokens == 0 and start + 1 < req.num_prompt_tokens:
                seq.prompt_logprobs = top_n
                seq.prompt_targets = req.prompt_token_ids[start + 1:start + n + 1]
            out.sequences.append(seq)
        self._in_flight = scheduled
        if out.is_empty:  # nothing to run: the step is over already
            self.kv_cache.end_step(ok=True)
        return out

    def commit_step(self) -> None:
        """The last scheduled step has run (its copies and its forward): its tokens count as computed from
        now on."""
        for req, n in self._in_flight:
            # Prefill: every token computed but the one a decode step computes (the last sampled token).
            decode = req.num_output_tokens > 0 and req.num_computed_tokens + n == req.num_tokens
            self.num_prefill_tokens_computed += n - decode
            req.num_computed_tokens += n
            self.kv_cache.cache_blocks(req)
        self._in_flight = []
        self.kv_cache.end_step(ok=True)

    def abort_step(self) -> None:
        """The last scheduled step failed: forget it (the caller aborts the requests it was computing)."""
        self._in_flight = []
        self.kv_cache.end_step(ok=False)

    def _preempt_held(self, preempted: list[str]) -> bool:
        """Nothing could run this step and the queue's head does not fit (the pool, or max_num_seqs): the most
        recent request held for its beam siblings gives its place back (to the queue's tail), or the siblings it
        waits for might never get in.
        Its next-token log-probs are kept by the engine, so its beam search loses no step."""
        for victim in reversed(self.running):
            if victim.held:
                self.running.remove(victim)
                self._preempt(victim, to_tail=True)
                preempted.append(victim.request_id)
                return True
        return False

    def _preempt(self, req: Request, to_tail: bool = False) -> None:
        """Swap the request's blocks out to the tier (preemption_mode swap, when it has room), else free them
        to be recomputed; either way it goes back to the head of the queue (or its tail)."""
        if not (self.config.preemption_mode == "swap" and self.kv_cache.swap_out(req)):
            self.kv_cache.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        if to_tail:
            self.waiting.append(req)
        else:
            self.waiting.appendleft(req)
