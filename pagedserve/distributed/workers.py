"""The ranks of a tensor-parallel engine: rank 0 is the engine's own process (it schedules, runs its shard of
the model and samples); ranks 1..N-1 are worker processes it spawns, each running its own ModelRunner
over its shard and its own KV cache (its heads' K/V of the same blocks).

A step on rank 0 (`TensorParallelRunner.execute`): broadcast the step, then run it. The message is the
step as the workers need it with each block table sent as what changed since the previous step (the
blocks appended, or the whole table when it was replaced), so a decode step sends a few ints a sequence.
Every rank then runs the same forward: the all-reduces and the logits' gather inside the model are its
only other communication. Any call that fails (a worker killed, a collective timing out) marks the group
broken: the engine raises a clear error on every later step, and shutdown reaps the workers.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pagedserve.outputs import ScheduledSequence, SchedulerOutput

log = logging.getLogger(__name__)

# How long a collective of a step (or the start-up rendezvous) may wait for the other ranks before failing.
COLLECTIVE_TIMEOUT_S = 120.0
# The commands travel in a gloo group of their own, whose wait has no practical bound: a worker waits there
# between steps for as long as the engine is idle. A dead peer still fails it at once (its sockets close).
CONTROL_TIMEOUT = datetime.timedelta(days=3650)
STOP = "stop"


class TensorParallelError(RuntimeError):
    """The tensor-parallel group failed: a rank died or a collective failed or timed out."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Each rank's device: one GPU a rank, counting from the configured one; the CPU otherwise."""
    d = torch.device(device)
    return f"cuda:{(d.index or 0) + rank}" if d.type == "cuda" else device


def rank_threads(num_threads: int | None, world_size: int) -> int:
    """Torch threads of each rank: as configured, else the CPU's cores shared out."""
    return num_threads or max(1, (os.cpu_count() or 1) // world_size)


class StepEncoder:
    """Rank 0's side of the block-table deltas: what each sequence's table was in the previous step."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def encode(self, sched: SchedulerOutput) -> tuple:
        seqs, tables = [], {}
        for s in sched.sequences:
            old = self._tables.get(s.request_id)
            if old is not None and s.block_ids[:len(old)] == old:
                blocks = ("+", s.block_ids[len(old):])
            else:
                blocks = ("=", s.block_ids)
            tables[s.request_id] = list(s.block_ids)
            seqs.append((s.request_id, s.token_ids, s.start_pos, blocks, s.sample, s.prompt_logprobs,
                         s.prompt_targets))
        self._tables = tables  # a sequence not in this step sends its whole table when it comes back
        t = sched.transfers
        return seqs, (t.offload, t.load, t.copy)


class StepDecoder:
    """A worker's side: the same tables, rebuilt from the deltas."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def decode(self, message: tuple) -> SchedulerOutput:
        from pagedserve.outputs import BlockTransfers
        seqs, (offload, load, copy) = message
        out, tables = SchedulerOutput(transfers=BlockTransfers(offload, load, copy)), {}
        for request_id, token_ids, start_pos, (kind, blocks), sample, prompt_logprobs, targets in seqs:
            table = self._tables[request_id] + blocks if kind == "+" else blocks
            tables[request_id] = table
            out.sequences.append(ScheduledSequence(request_id, token_ids, start_pos, table, sample,
                                                   prompt_logprobs, targets))
        self._tables = tables
        return out


@dataclass(frozen=True)
class RankGroups:
    """The gloo groups besides the model's: `control` carries the commands (a worker waits there between steps
    for as long as the engine is idle: no practical timeout), `results` the gathered results of a call
    (a step's timeout, so a rank that failed mid-call cannot leave another waiting for ever)."""
    control: dist.ProcessGroup
    results: dist.ProcessGroup


def join_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float,
               device: str) -> RankGroups:
    """Join the group (its collectives fail after timeout_s) and form the command and result groups."""
    from pagedserve.distributed.parallel import init_process_group
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))  # NCCL, Triton and graph capture use the current device
    init_process_group(backend, init_method, rank, world_size, timeout_s)
    bounded = datetime.timedelta(seconds=timeout_s)
    # Formed with a bounded timeout (a peer lost while the groups form fails the start), then unbounded.
    control = dist.new_group(backend="gloo", timeout=bounded)
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        set_timeout(CONTROL_TIMEOUT, control)
    else:  # an older torch: the only way is at creation
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return RankGroups(control, dist.new_group(backend="gloo", timeout=bounded))


def _broadcast(obj: Any, control: dist.ProcessGroup) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


@dataclass
class RankFailure:
    """What a rank sends back instead of its result when its part of a gathered call raised."""
    rank: int
    error: BaseException


# Options a rank started on its own may set differently from rank 0's (its host's device, cores and disk).
OWN_OPTIONS = ("device", "distributed_init_method", "num_threads", "kv_offload_dir")


def check_same_options(mine: dict, rank0: dict) -> None:
    """A rank started with `pagedserve worker` must run the engine rank 0 runs."""
    differ = sorted(k for k in rank0 if k not in OWN_OPTIONS and mine.get(k) != rank0[k])
    if differ:
        raise ValueError("this worker's engine options differ from rank 0's: "
                         + ", ".join(f"{k}={mine.get(k)!r} (rank 0: {rank0[k]!r})" for k in differ))


def worker_main(config_fields: dict, rank: int, world_size: int, init_method: str, timeout_s: float,
                device: str, spawned: bool = True) -> None:
    """A worker rank's process: join the group, load this rank's shard on `device`, then run what rank 0
    broadcasts until it says stop (or the group fails, which ends the process). A spawned worker ignores
    Ctrl-C, which the terminal sends its whole process group: rank 0 handles it and stops the workers."""
    from pagedserve.config import EngineConfig
    if spawned:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = EngineConfig(**config_fields)
    torch.set_num_threads(rank_threads(config.num_threads, world_size))
    groups = join_group(backend_for(config.device), init_method, rank, world_size, timeout_s, device)
    try:
        check_same_options(config_fields, _broadcast(None, groups.control))
        runner = build_rank_runner(config, rank, world_size, device)
        decoder = StepDecoder()
        while True:
            name, args = _broadcast(None, groups.control)
            if name == STOP:
                break
            if name == "execute":
                runner.execute(decoder.decode(args[0]))
            elif name in GATHERED:
                try:
                    value = getattr(runner, name)(*args)
                except Exception as e:  # noqa: BLE001 - rank 0 raises it; this rank stays in step
                    value = RankFailure(rank, e)
                dist.gather_object(value, None, dst=0, group=groups.results)
            else:
                getattr(runner, name)(*args)
    finally:
        dist.destroy_process_group()


# The runner calls whose results rank 0 gathers from every rank.
GATHERED = ("kv_cache_bytes", "measure_kv_budget")


def build_rank_runner(config, rank: int, world_size: int, device: str):
    """This rank's model shard and its ModelRunner (no KV cache yet: rank 0 sends the size)."""
    from pagedserve.engine import max_model_len_of
    from pagedserve.model.loader import load_model
    from pagedserve.runner import ModelRunner
    loaded = load_model(config.model, dtype=config.dtype, device=device, tokenizer=config.tokenizer,
                        quantization=config.quantization, tensor_parallel=(rank, world_size))
    mc = loaded.config
    return ModelRunner(loaded.model, mc.num_hidden_layers, loaded.model.tp.plan.num_kv_heads, mc.head_dim,
                       config.block_size, loaded.dtype, device, config.attention_backend, config.max_num_seqs,
                       max_model_len_of(config, mc), config.enforce_eager)


class Workers:
    """The worker processes of ranks 1..N-1: spawned here, or (spawn=False) started by `pagedserve worker`
    elsewhere, which this process cannot watch: their failures show only as failed collectives."""

    def __init__(self, config, world_size: int, init_method: str, timeout_s: float | None = None,
                 spawn: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch or OpenMP state
        fields = dataclasses.asdict(config)
        self.world_size = world_size
        self.timeout_s = timeout_s = timeout_s or COLLECTIVE_TIMEOUT_S
        self.processes = [ctx.Process(target=worker_main, args=(fields, rank, world_size, init_method, timeout_s,
                                                                rank_device(config.device, rank)),
                                      name=f"pagedserve-tp-rank{rank}", daemon=True)
                          for rank in range(1, world_size)] if spawn else []
        for p in self.processes:
            p.start()

    def failure(self, wait: float = 0.0) -> str | None:
        """Which worker has exited, if any; wait: give a dying one up to this long in all to finish exiting
        (a collective sees a peer's sockets close a moment before its process is gone)."""
        deadline = time.monotonic() + wait
        for rank, p in enumerate(self.processes, start=1):
            p.join(max(0.0, deadline - time.monotonic()))
            if not p.is_alive():
                return f"tensor-parallel rank {rank} exited with code {p.exitcode}"
        return None

    def reap(self, timeout: float = 10.0) -> None:
        """Wait for the workers to exit, then terminate, then kill the ones that will not."""
        for p in self.processes:
            p.join(timeout)
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()


def join_as_rank0(backend: str, init_method: str, world_size: int, workers: Workers, device: str,
                  options: dict) -> RankGroups:
    """Rank 0 joins the group, watching the workers meanwhile: one that dies before it joins (a bad model
    path, a script without a `__main__` guard under spawn) fails start-up at once, not at the timeout; so
    does Ctrl-C. Then it sends its options, which a worker started on its own checks against its own."""
    result: list = []
    abandoned = threading.Event()

    def join() -> None:
        try:
            result.append(join_group(backend, init_method, 0, world_size, workers.timeout_s, device))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.append(e)
        if (abandoned.is_set() or isinstance(result[0], BaseException)) and dist.is_initialized():
            dist.destroy_process_group()  # the start failed meanwhile: leave the group to a later engine
    thread = threading.Thread(target=join, name="pagedserve-tp-join", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
            failure = workers.failure()
            if failure is not None and thread.is_alive():
                raise TensorParallelError(f"{failure} before joining the group (its error is printed above)")
        if isinstance(result[0], BaseException):
            raise TensorParallelError(f"the tensor-parallel group did not form: {result[0]}") from result[0]
        groups = result[0]
        _broadcast(options, groups.control)
        return groups
    except BaseException:
        abandoned.set()
        workers.reap(timeout=0)
        if not thread.is_alive() and dist.is_initialized():
            dist.destroy_process_group()
        raise


class TensorParallelRunner:
    """Rank 0's runner: every call that runs the model is broadcast to the workers, then run here. Other
    attributes are the local ModelRunner's."""

    def __init__(self, runner, workers: Workers, groups: RankGroups) -> None:
        self.runner, self.workers, self.groups = runner, workers, groups
        self.encoder = StepEncoder()
        # shared with the finalizer: why the group broke (None: it works), whether a call is in flight
        self._state: dict[str, Any] = {"broken": None, "in_call": False}
        self._finalizer = weakref.finalize(self, _shutdown, workers, groups.control, self._state)

    @property
    def broken(self) -> str | None:
        """Why the group stopped working, or None."""
        return self._state["broken"]

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def _call(self, name: str, args: tuple, local_args: tuple | None = None, gather: bool = False):
        """Broadcast the call, run it here; with gather, every rank's result (rank 0's first). A gathered
        call that raised on some rank, the others having finished it, raises that error and leaves the
        group working; anything else that raises leaves it broken."""
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel group is broken ({self.broken}); restart the engine")
        self._state["in_call"] = True
        try:
            _broadcast((name, args), self.groups.control)
            if not gather:
                return getattr(self.runner, name)(*(args if local_args is None else local_args))
            try:
                mine = getattr(self.runner, name)(*args)
            except Exception as e:  # noqa: BLE001 - still gathered, so the workers do not wait for it
                mine = RankFailure(0, e)
            results = [None] * self.workers.world_size
            dist.gather_object(mine, results, dst=0, group=self.groups.results)
        except BaseException as e:  # Ctrl-C included: the other ranks may be inside a collective of this call
            self._state["broken"] = self.workers.failure(wait=0.5) or f"{type(e).__name__}: {e}"
            if not isinstance(e, Exception):
                raise
            raise TensorParallelError(f"tensor-parallel step failed: {self.broken}") from e
        finally:
            self._state["in_call"] = False
        for r in results:
            if isinstance(r, RankFailure):
                raise r.error
        return results

    def execute(self, sched: SchedulerOutput):
        return self._call("execute", (self.encoder.encode(sched),), (sched,))

    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        self._call("profile_run", (num_tokens, num_seqs))

    def measure_kv_budget(self, num_tokens: int, num_seqs: int, utilization: float) -> int:
        """The smallest of the ranks' measured budgets: every rank holds the same blocks."""
        return min(self._call("measure_kv_budget", (num_tokens, num_seqs, utilization), gather=True))

    def allocate_kv_caches(self, num_blocks: int, num_offload_blocks: int = 0, offload_dir: str | None = None) -> None:
        self._call("allocate_kv_caches", (num_blocks, num_offload_blocks, offload_dir))

    def kv_cache_bytes_per_rank(self) -> list[int]:
        """The bytes of K/V each rank holds, as each rank counts its own tensors."""
        return self._call("kv_cache_bytes", (), gather=True)

    def shutdown(self) -> None:
        self._finalizer()


def run_worker(config, rank: int) -> None:
    """`pagedserve worker`: rank `rank` of config.tensor_parallel_size, meeting rank 0 (the engine, started
    with the same options) at config.distributed_init_method, on config.device as given."""
    if config.distributed_init_method is None:
        raise ValueError("a worker needs --distributed-init-method, the same as the engine's")
    if not 0 < rank < config.tensor_parallel_size:
        raise ValueError(f"--rank must be in [1, {config.tensor_parallel_size}): rank 0 is the engine")
    fields = dataclasses.asdict(config)
    worker_main(fields, rank, config.tensor_parallel_size, config.distributed_init_method, COLLECTIVE_TIMEOUT_S,
                config.device, spawned=False)


def _shutdown(workers: Workers, control: dist.ProcessGroup, state: dict) -> None:
    """Tell the workers to stop if the group works and is idle (a call still in flight on another thread
    would interleave with the message), reap them (terminating those that do not stop), leave the group."""
    if state["broken"] is None and not state["in_call"] and workers.failure() is None:
        try:
            _broadcast((STOP, ()), control)
        except Exception:  # noqa: BLE001 - a broken group: reaping below ends the workers anyway
            log.warning("could not tell the tensor-parallel workers to stop; terminating them")
    workers.reap(timeout=10.0 if not state["in_call"] else 0.0)
    if dist.is_initialized() and not state["in_call"]:
        dist.destroy_process_group()
