"""LLMEngine: add_request / step / abort_request over the scheduler, the model runner and the sampler.

A user request with n > 1 is one group of n sequences: the prompt is computed once by
sample 0, and when its first token is sampled the other samples fork from it (sharing
every block, copy-on-write where they diverge inside one).

A step that raises aborts the requests it was computing and nothing else: the scheduler
commits a step (its tokens count as computed, its full blocks become shareable) only after
the forward and the sampler have succeeded, so the cache stays as if the step never ran.
The caller gets a StepError naming the aborted requests; the engine goes on serving.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from dataclasses import dataclass, field

import torch

from pagedserve.config import EngineConfig
from pagedserve.device import to_device
from pagedserve.distributed import workers
from pagedserve.distributed.parallel import model_shard_plan
from pagedserve.kv_cache import KVCacheManager, sizing
from pagedserve.model.loader import load_model
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput, SchedulerOutput
from pagedserve.request import Request, RequestStatus
from pagedserve.runner import ModelRunner, kv_bytes_per_block
from pagedserve.sampler import SamplingBatch, TokenLogprobs, min_tokens_banned_ids, sample
from pagedserve.beam_search import BeamHypothesis, BeamSearchState
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler import Scheduler, SchedulerConfig
from pagedserve.structured_output import GrammarState, StructuredOutputManager, allowed_token_bitmask, ban_tokens
from pagedserve.tokenizer import OutputText, encode_prompt


class StepError(RuntimeError):
    """An engine step raised. The requests it was computing (request_ids, the users' ids) were
    aborted and their partial work discarded; every other request is untouched."""

    def __init__(self, request_ids: list[str], cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids


def _sample_id(request_id: str, index: int) -> str:
    """The engine-internal id of sample `index` of a request. Injective (the index is the text after
    the last '#', and holds none), so no user id can name another request's sample."""
    return f"{request_id}#{index}"


@dataclass(eq=False)
class _Sample:
    """One of the n sequences of a request, with its text state."""
    seq: Request
    out: OutputText
    generator: torch.Generator | None
    grammar: GrammarState | None = None  # structured output: where this sequence is in its grammar
    text: str = ""  # the text emitted so far (stop strings and held-back tails excluded)
    text_sent: int = 0
    tokens_sent: int = 0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(eq=False)
class _Beams:
    """A beam search's state: the rules (beam_search.py), each live beam's cumulative log-probability
    (aligned with the group's samples), and the next-token log-probs of the beams that have them this step."""
    search: BeamSearchState
    cum_logprobs: list[torch.Tensor]
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # request id -> [V] float32
    num_made: int = 1  # beams created so far (for their ids)
    result: list[BeamHypothesis] | None = None


@dataclass(eq=False)
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    forked: bool = False
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Prompt logprobs (when asked), one per prompt position computed so far; sent once the prompt is done.
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False
    beams: _Beams | None = None  # a beam search; its samples are the live beams

    @property
    def finished(self) -> bool:
        if self.beams is not None:
            return self.beams.result is not None
        return all(s.finish_reason is not None for s in self.samples)


def max_model_len_of(config: EngineConfig, mc) -> int:
    """The context window: the configured one, at most the model's."""
    return min(config.max_model_len or mc.context_len, mc.context_len)


def _start_runner(config: EngineConfig, device: str):
    """The model (this process's shard, with tensor parallelism) and its runner; with tensor parallelism the
    workers are spawned first (they load their shards while this process loads its own), and reaped if
    this process fails before the runner that owns them exists."""
    tp = config.tensor_parallel_size
    tp_workers = groups = None
    if tp > 1:
        if torch.distributed.is_initialized():
            raise ValueError("this process already runs a tensor-parallel engine (or another torch.distributed "
                             "group): shut it down first; one per process")
        init_method = config.distributed_init_method or f"tcp://127.0.0.1:{workers.free_port()}"
        tp_workers = workers.Workers(config, tp, init_method, spawn=config.distributed_init_method is None)
        groups = workers.join_as_rank0(workers.backend_for(config.device), init_method, tp, tp_workers, device,
                                       dataclasses.asdict(config))
    try:
        loaded = load_model(config.model, dtype=config.dtype, device=device, tokenizer=config.tokenizer,
                            quantization=config.quantization, tensor_parallel=(0, tp) if tp > 1 else None)
        mc = loaded.config
        runner = ModelRunner(loaded.model, mc.num_hidden_layers,
                             mc.num_key_value_heads if tp == 1 else loaded.model.tp.plan.num_kv_heads,
                             mc.head_dim, config.block_size, loaded.dtype, device, config.attention_backend,
                             config.max_num_seqs, max_model_len_of(config, mc), config.enforce_eager)
    except BaseException:
        if tp_workers is not None:
            tp_workers.reap(timeout=0)
            torch.distributed.destroy_process_group()
        raise
    if tp_workers is not None:
        runner = workers.TensorParallelRunner(runner, tp_workers, groups)
    return loaded, runner


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs) -> None:
        config = config or EngineConfig.from_kwargs(**kwargs)
        self.config = config
        tp = config.tensor_parallel_size
        if config.num_threads or tp > 1:
            torch.set_num_threads(workers.rank_threads(config.num_threads, tp))
        device = workers.rank_device(config.device, 0)
        loaded, self.runner = _start_runner(config, device)
        try:
            self._set_up(config, loaded, device)
        except BaseException:
            self.shutdown()  # the tensor-parallel workers, at once: not when the half-built engine is collected
            raise

    def _set_up(self, config: EngineConfig, loaded, device: str) -> None:
        """Everything after the model and its runner: the KV cache's size and the pool, the scheduler."""
        tp = config.tensor_parallel_size
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = mc = loaded.config
        self.model_name = loaded.name
        self.dtype = loaded.dtype
        self.max_model_len = max_model_len_of(config, mc)
        # The largest step: the token budget, or without chunking a whole prompt of up to the window.
        profile_tokens = config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            profile_tokens = max(profile_tokens, self.max_model_len)
        measured = None if sizing.memory_probe(device) is None else functools.partial(
            self.runner.measure_kv_budget, profile_tokens, config.max_num_seqs, config.gpu_memory_utilization)
        # Every rank holds the same blocks; a block's bytes on the rank with the most KV heads bound them.
        kv_heads = max(model_shard_plan(mc, r, tp).num_kv_heads for r in range(tp))
        per_block = kv_bytes_per_block(mc.num_hidden_layers, kv_heads, mc.head_dim, config.block_size, loaded.dtype)
        num_blocks, num_offload_blocks = sizing.num_blocks(config, per_block, measured)
        self.runner.allocate_kv_caches(num_blocks, num_offload_blocks, config.kv_offload_dir)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                       config.kv_reservation, self.max_model_len, num_offload_blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   self.max_model_len, config.enable_chunked_prefill,
                                                   config.preemption_mode), self.kv_cache)
        self.eos_token_ids = set(mc.eos_token_ids)
        self.structured_output = StructuredOutputManager(self.tokenizer, mc.vocab_size, self.eos_token_ids)
        # Logprobs name each listed token by its text: decoded once per token id (a long prompt's
        # prompt_logprobs would otherwise decode 21 tokens per position on this thread).
        self._token_text = functools.lru_cache(maxsize=1 << 17)(lambda tid: self.tokenizer.decode([tid]))
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.groups: dict[str, _Group] = {}
        self._seq_owner: dict[str, tuple[_Group, _Sample]] = {}
        self._ids = itertools.count()
        self._step_observers: list = []
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_steps = 0

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int] | dict,
                    params: SamplingParams | None = None, cache_salt: str | None = None,
                    arrival_time: float | None = None, compiled_grammar=None) -> str:
        """Queue a request; raises ValueError if it is malformed or could never fit (GrammarError: its
        structured_outputs cannot be followed). compiled_grammar: params.structured_outputs already compiled
        (structured_output.StructuredOutputManager.compile), so this thread need not."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._prompt_tokens(prompt)
        if isinstance(params, BeamSearchParams):
            return self._add_beam_search(request_id, text, token_ids, params, cache_salt, arrival_time)
        if params.max_tokens is None:  # up to the context window
            params = dataclasses.replace(params, max_tokens=max(1, self.max_model_len - len(token_ids)))
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {params.stop_token_ids}")
        bad_bias = [t for t in params.logit_bias or {} if not 0 <= t < vocab]
        if bad_bias:
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab}), got {bad_bias[:8]}")
        grammar = compiled_grammar
        if grammar is None and params.structured_outputs is not None:
            grammar = self.structured_output.compile(params.structured_outputs)
        samples = []
        for i in range(params.n):
            seq = Request(_sample_id(request_id, i), token_ids, params, cache_salt=cache_salt, sample_index=i,
                          parent_id=None if i == 0 else request_id)
            gen = None
            if params.seed is not None:
                gen = torch.Generator().manual_seed(params.seed + i)
            state = GrammarState(grammar) if grammar is not None else None
            samples.append(_Sample(seq, OutputText(self.tokenizer, params, token_ids), gen, state))
        self.scheduler.add_request(samples[0].seq)  # validates the length against window and pool
        group = _Group(request_id, text, token_ids, params, samples, forked=params.n == 1,
                       arrival_time=arrival_time or time.monotonic())
        self.groups[request_id] = group
        for s in samples:
            self._seq_owner[s.seq.request_id] = (group, s)
        self.num_prompt_tokens += len(token_ids)
        return request_id

    def _add_beam_search(self, request_id: str, text: str | None, token_ids: list[int], params: BeamSearchParams,
                         cache_salt: str | None, arrival_time: float | None) -> str:
        """A beam search starts as one sequence (the prompt); beams fork from it (beam_search.py's rules)."""
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        # n = beam_width sizes the pool check; EOS is the beam rules' to handle, not the stop check's.
        sp = SamplingParams(n=params.beam_width, temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True)
        seq = Request(_sample_id(request_id, 0), token_ids, sp, cache_salt=cache_salt)
        sample = _Sample(seq, OutputText(self.tokenizer, sp, token_ids), None)
        self.scheduler.add_request(seq)
        eos = () if params.ignore_eos else sorted(self.eos_token_ids)
        search = BeamSearchState(params.beam_width, params.max_tokens, params.length_penalty, params.early_stopping, eos)
        group = _Group(request_id, text, token_ids, sp, [sample], forked=True,
                       arrival_time=arrival_time or time.monotonic(), beams=_Beams(search, [torch.zeros(())]))
        self.groups[request_id] = group
        self._seq_owner[seq.request_id] = (group, sample)
        self.num_prompt_tokens += len(token_ids)
        return request_id

    def _prompt_tokens(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return prompt, encode_prompt(self.tokenizer, prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("a prompt is a string, a list of token ids, or {'prompt_token_ids': [...]}")

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            for s in group.samples:
                self._seq_owner.pop(s.seq.request_id, None)
                if not s.seq.status.finished:
                    self.scheduler.finish(s.seq, RequestStatus.FINISHED_ABORTED)
                s.finish_reason = s.finish_reason or "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, sample; returns the new tokens and text of each request that moved.

        Raises StepError if the step failed (its requests are aborted, the engine stays usable);
        a KeyboardInterrupt or other BaseException aborts them too and propagates as it is.
        """
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        groups: list[str] = []
        try:  # from here on, whatever is raised (Ctrl-C included) leaves no step in flight
            self.num_steps += 1
            # Every group of the step fails with it, even one that finished in it: its output is never returned.
            groups = list(dict.fromkeys(self._seq_owner[s.request_id][0].request_id for s in sched.sequences))
            for observe in self._step_observers:
                observe(sched)
            return self._run_step(sched)
        except BaseException as e:
            self.scheduler.abort_step()
            self.abort_request(groups)
            if isinstance(e, Exception):
                raise StepError(groups, e) from e
            raise

    def _run_step(self, sched: SchedulerOutput) -> list[RequestOutput]:
        model_out = self.runner.execute(sched)
        logits = model_out.logits
        # One row per sampled sequence; a group sampling its first token also gives its other samples
        # a row each, on the same logits (they fork from the first once the step is committed).
        rows: list[tuple[_Group, _Sample]] = []
        row_index: list[int] = []
        prompt_only: list[_Group] = []  # max_tokens=0: the prompt is computed, nothing is sampled
        beam_logprobs: list[tuple[_Group, str, torch.Tensor]] = []
        for j, seq in enumerate(s for s in sched.sequences if s.sample):
            group, first = self._seq_owner[seq.request_id]
            if group.beams is not None:  # raw float32 log-probs, for the beam rules; not sampled
                beam_logprobs.append((group, seq.request_id, torch.log_softmax(logits[j].float(), dim=-1)))
                continue
            if group.params.max_tokens == 0:
                prompt_only.append(group)
                continue
            samples = group.samples if not group.forked else [first]
            rows += [(group, s) for s in samples]
            row_index += [j] * len(samples)
        if row_index != list(range(logits.shape[0])):
            logits = logits[to_device(row_index, logits.device)]
        result = None
        if rows:
            with torch.inference_mode():  # the logits are inference tensors: the sampler edits them in place
                result = sample(logits, self._sampling_batch(rows, logits.device))
        self.scheduler.commit_step()
        moved: dict[str, _Group] = {}
        for seq in sched.sequences:
            entries = model_out.prompt_logprobs.get(seq.request_id)
            if entries:
                group = self._seq_owner[seq.request_id][0]
                self._add_prompt_logprobs(group, seq.start_pos + 1, entries)
        for group in prompt_only:
            for s in group.samples:
                s.finish_reason = "length"
                self.scheduler.finish(s.seq, RequestStatus.FINISHED_LENGTH)
            moved[group.request_id] = group
        for group, rid, lp in beam_logprobs:
            group.beams.pending[rid] = lp
        for group in dict.fromkeys(g for g, _, _ in beam_logprobs):
            if self._step_beams(group):
                moved[group.request_id] = group
        if result is None:
            return [self._make_output(g) for g in moved.values()]
        for group, s in rows:
            if not group.forked:  # the prompt is done: the other samples share its blocks from here
                group.forked = True
                for child in group.samples[1:]:
                    self.scheduler.add_forked(s.seq, child.seq)
        now = time.monotonic()
        for r, (group, s) in enumerate(rows):
            token = result.token_ids[r]
            s.seq.append_output_token(token)
            self.num_generation_tokens += 1
            if result.logprobs is not None and result.logprobs[r] is not None:
                entry = self._logprob_dict(result.logprobs[r])
                s.logprobs.append(entry)
                s.cumulative_logprob += entry[token].logprob
            # A grammar that reached its end (its stop token accepted) ends the sequence, even under ignore_eos.
            grammar_done = s.grammar is not None and (not s.grammar.accept(token) or s.grammar.finished)
            self._check_stop(group, s, token, grammar_done)
            group.first_token_time = group.first_token_time or now
            group.last_token_time = now
            moved[group.request_id] = group
        return [self._make_output(g) for g in moved.values()]

    def _step_beams(self, group: _Group) -> bool:
        """Once every live beam has its next-token log-probs: the beam rules pick the next beams (a parent's
        first continuation keeps its sequence, the others fork its blocks; a parent with none is freed) or end
        the search. Until then, the beams that have theirs wait (held). Returns whether the search ended."""
        b, live = group.beams, group.samples
        if any(s.seq.request_id not in b.pending for s in live):
            for s in live:
                s.seq.held = s.seq.request_id in b.pending
            return False
        step = b.search.step(torch.stack([b.pending[s.seq.request_id] for s in live]), torch.stack(b.cum_logprobs),
                             [s.seq.output_token_ids for s in live])
        b.pending.clear()
        if step.finished:
            for s in live:
                self.scheduler.finish(s.seq, RequestStatus.FINISHED_STOPPED)
            b.result = b.search.hypotheses
            return True
        kept: dict[int, _Sample] = {}
        beams = []
        for c in step.continuations:  # forks first: a fork copies its parent's tokens before the parent appends
            parent = live[c.parent]
            beams.append(self._fork_beam(group, parent) if c.parent in kept else kept.setdefault(c.parent, parent))
        for beam, c in zip(beams, step.continuations):
            beam.seq.append_output_token(c.token_id)
            beam.seq.held = False
        for i, s in enumerate(live):
            if i not in kept:  # pruned: its blocks go back at once
                self.scheduler.finish(s.seq, RequestStatus.FINISHED_ABORTED)
                self._seq_owner.pop(s.seq.request_id, None)
        group.samples, b.cum_logprobs = beams, [c.cum_logprob for c in step.continuations]
        self.num_generation_tokens += len(beams)
        return False

    def _fork_beam(self, group: _Group, parent: _Sample) -> _Sample:
        """A new beam sharing its parent's blocks (copy-on-write where they diverge); a parent preempted meanwhile
        has no blocks, so its copy waits to be computed again, like it."""
        b = group.beams
        seq = Request(_sample_id(group.request_id, b.num_made), group.prompt_token_ids, group.params,
                      cache_salt=parent.seq.cache_salt, sample_index=b.num_made, parent_id=group.request_id)
        b.num_made += 1
        if parent.seq.status == RequestStatus.RUNNING:
            self.scheduler.add_forked(parent.seq, seq)
        else:
            seq.all_token_ids = list(parent.seq.all_token_ids)
            self.scheduler.add_request(seq)
        child = _Sample(seq, parent.out, None)
        self._seq_owner[seq.request_id] = (group, child)
        return child

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        """A token's logprobs as outputs hold them, each listed token named by its text."""
        lps = entry.as_dict()
        for tid, lp in lps.items():
            lp.decoded_token = self._token_text(tid)
        return lps

    def _add_prompt_logprobs(self, group: _Group, position: int, entries: list[TokenLogprobs]) -> None:
        """Keep the logprobs of prompt tokens position, position + 1, ...; a chunk computed again after a
        preemption brings positions already kept, which are skipped."""
        have = group.prompt_logprobs
        for entry in entries[len(have) - position:] if position <= len(have) else []:
            have.append(self._logprob_dict(entry))

    def _sampling_batch(self, rows: list[tuple[_Group, _Sample]], device: torch.device) -> SamplingBatch:
        banned = [min_tokens_banned_ids(g.params, s.seq.num_output_tokens, self.eos_token_ids) for g, s in rows]
        grammar_rows = [r for r, (_, s) in enumerate(rows) if s.grammar is not None]
        grammar = None
        if grammar_rows:
            states = [rows[r][1].grammar for r in grammar_rows]
            bitmask = allowed_token_bitmask(states, self.model_config.vocab_size)
            for i, r in enumerate(grammar_rows):
                if banned[r]:  # min_tokens' bans go into the grammar's mask, unless they would leave no token
                    ban_tokens(bitmask[i], banned[r])
                    banned[r] = None
            grammar = (grammar_rows, bitmask)
        return SamplingBatch.build(
            [g.params for g, _ in rows], [s.seq.output_token_ids for _, s in rows],
            [g.prompt_token_ids for g, _ in rows], [s.generator for _, s in rows],
            vocab_size=self.model_config.vocab_size, device=device, banned_token_ids=banned, generator=self.generator,
            grammar=grammar)

    def _check_stop(self, group: _Group, s: _Sample, token: int, grammar_done: bool = False) -> None:
        p, seq = group.params, s.seq
        n_out = seq.num_output_tokens
        reason = stop_reason = None
        is_eos = token in self.eos_token_ids and not p.ignore_eos
        # min_tokens holds through the sampler, which bans EOS and stop tokens until then (vLLM's meaning).
        if is_eos or token in p.stop_token_ids:
            reason, stop_reason = "stop", (None if is_eos else token)
        if reason is None:  # a stop token's text is not part of the output
            delta = s.out.append(token)
            s.text += delta.text
            if delta.stop_str is not None:
                reason, stop_reason = "stop", delta.stop_str
        if reason is None and grammar_done:
            reason = "stop"
        if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if stop_reason is None or isinstance(stop_reason, int):
                s.text += s.out.finish()
            s.finish_reason, s.stop_reason = reason, stop_reason
            self.scheduler.finish(seq, RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH)

    def _make_output(self, g: _Group) -> RequestOutput:
        if g.beams is not None:
            return self._beam_output(g)
        outs = []
        for i, s in enumerate(g.samples):
            tokens = s.seq.output_token_ids
            if len(tokens) == s.tokens_sent and len(s.text) == s.text_sent and s.finish_reason is None:
                continue
            outs.append(CompletionOutput(
                index=i, text=s.text[s.text_sent:], token_ids=tokens[s.tokens_sent:],
                cumulative_logprob=s.cumulative_logprob if g.params.logprobs is not None else None,
                logprobs=s.logprobs[s.tokens_sent:] if g.params.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
            s.text_sent, s.tokens_sent = len(s.text), len(tokens)
        prompt_logprobs = None
        if (g.params.prompt_logprobs is not None and not g.prompt_logprobs_sent
                and len(g.prompt_logprobs) == len(g.prompt_token_ids)):
            prompt_logprobs, g.prompt_logprobs_sent = g.prompt_logprobs, True
        finished = g.finished
        if finished:
            self.groups.pop(g.request_id, None)
            for s in g.samples:
                self._seq_owner.pop(s.seq.request_id, None)
        return RequestOutput(
            request_id=g.request_id, prompt=g.prompt, prompt_token_ids=g.prompt_token_ids, outputs=outs,
            finished=finished, num_cached_tokens=max(g.samples[0].seq.num_cached_tokens, 0),
            metrics={"arrival_time": g.arrival_time, "first_token_time": g.first_token_time,
                     "last_token_time": g.last_token_time},
            prompt_logprobs=prompt_logprobs)

    def _beam_output(self, g: _Group) -> RequestOutput:
        """A beam search answers once, at its end: its hypotheses, best first."""
        self.groups.pop(g.request_id, None)
        for s in g.samples:
            self._seq_owner.pop(s.seq.request_id, None)
        outs = []
        for i, h in enumerate(g.beams.result):
            ended = bool(h.output_token_ids) and h.output_token_ids[-1] in g.beams.search.eos_token_ids
            text_ids = h.output_token_ids[:-1] if ended else h.output_token_ids
            outs.append(CompletionOutput(index=i, text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                                         token_ids=list(h.output_token_ids), cumulative_logprob=h.cum_logprob,
                                         finish_reason="stop" if ended else "length"))
        return RequestOutput(request_id=g.request_id, prompt=g.prompt, prompt_token_ids=g.prompt_token_ids,
                             outputs=outs, finished=True, num_cached_tokens=max(g.samples[0].seq.num_cached_tokens, 0),
                             metrics={"arrival_time": g.arrival_time, "first_token_time": None,
                                      "last_token_time": time.monotonic()})

    # ---- introspection ----------------------------------------------------------------------
    def live_requests(self) -> list[Request]:
        return [s.seq for g in self.groups.values() for s in g.samples]

    def add_step_observer(self, observe) -> None:
        """Call observe(scheduler_output) once per step, after scheduling and before the forward. For
        benchmarks and the report (e.g. the KV slot accounting, kv_cache.record_step); never on by default."""
        self._step_observers.append(observe)

    def check_invariants(self) -> None:
        self.kv_cache.check_invariants(self.scheduler.running)

    def kv_cache_bytes_per_rank(self) -> list[int]:
        """The bytes of K/V each rank holds, counted by each rank (one entry without tensor parallelism).
        Not while a step runs: with tensor parallelism it is a collective."""
        if isinstance(self.runner, workers.TensorParallelRunner):
            return self.runner.kv_cache_bytes_per_rank()
        return [self.runner.kv_cache_bytes()]

    def shutdown(self) -> None:
        """Stop and reap the tensor-parallel workers, if any (also done when the engine is collected)."""
        if isinstance(self.runner, workers.TensorParallelRunner):
            self.runner.shutdown()

    def stats(self, detailed: bool = True) -> dict:
        """The engine's numbers (see DESIGN.md); detailed=False skips those that walk every block table."""
        out = self.kv_cache.stats(detailed)
        out.update(num_preemptions=self.scheduler.num_preemptions,
                   prefill_tokens_computed=self.scheduler.num_prefill_tokens_computed,
                   num_requests_running=len(self.scheduler.running),
                   num_requests_waiting=len(self.scheduler.waiting),
                   prompt_tokens=self.num_prompt_tokens, generation_tokens=self.num_generation_tokens,
                   num_steps=self.num_steps)
        return out

