"""Random add / append / fork / free / preempt sequences against a model of what the cache must hold.

The model is a fake KV cache that stores, in each physical slot, the token id written there
(as the model runner would write K/V). After every step each live request must read back
exactly its own tokens through its block table: prefix hits, copy-on-write and eviction
can only be right if that holds. check_invariants() runs after every step too.
"""
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedserve.kv_cache import KVCacheManager
from pagedserve.request import Request
from pagedserve.sampling_params import SamplingParams

PREFIXES = [list(range(100, 124)), list(range(200, 213)), []]
# A new request's tokens: one of PREFIXES (shared prefixes make prefix-cache hits) and a random suffix.
NEW_TOKENS = dict(prefix=st.sampled_from(PREFIXES), suffix=st.lists(st.integers(0, 5), max_size=9),
                  salt=st.sampled_from([None, None, "t2"]))


def new_request(rid: str, tokens, salt: str | None = None) -> Request:
    return Request(rid, list(tokens) or [7], SamplingParams(max_tokens=8), cache_salt=salt)


class RequestMachine(RuleBasedStateMachine):
    """The bookkeeping every cache machine shares, over the manager `self.m` its subclass makes: running and
    waiting requests, new ones (add), parallel samples (fork), preempting the newest."""

    def __init__(self):
        super().__init__()
        self.running: dict[str, Request] = {}
        self.waiting: dict[str, Request] = {}
        self.next_id = 0

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id - 1}"

    def _preempt_newest(self, swap: bool = False) -> None:
        """Preempt the newest running request: by swap to the tier where asked and possible, else recompute."""
        rid = list(self.running)[-1]
        r = self.running.pop(rid)
        if not (swap and self.m.swap_out(r)):
            self.m.free(r)
        r.num_computed_tokens = 0
        self.waiting[rid] = r

    @rule(**NEW_TOKENS)
    def add(self, prefix, suffix, salt):
        rid = self._new_id()
        self.waiting[rid] = new_request(rid, prefix + suffix, salt)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        """A parallel sample of a running request: its tokens so far, its blocks shared (the manager's fork)."""
        parent = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        rid = self._new_id()
        child = Request(rid, parent.prompt_token_ids, parent.sampling_params, cache_salt=parent.cache_salt)
        child.all_token_ids = list(parent.all_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.m.fork(parent, child)
        self.running[rid] = child


class KVCacheMachine(RequestMachine):
    def __init__(self):
        super().__init__()
        self.B = 4
        self.num_blocks = 24
        self.m = KVCacheManager(self.num_blocks, self.B)
        self.slots = [None] * (self.num_blocks * self.B)

    # -- the fake model runner -------------------------------------------------------------
    def _run(self, r: Request, n: int) -> None:
        """Copy-on-write copies first, then write tokens [computed, computed + n) into their slots."""
        for src, dst in self.m.take_transfers().copy:
            self.slots[dst * self.B:(dst + 1) * self.B] = self.slots[src * self.B:(src + 1) * self.B]
        table = self.m.get_block_ids(r.request_id)
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            self.slots[table[pos // self.B] * self.B + pos % self.B] = r.all_token_ids[pos]
        r.num_computed_tokens += n
        self.m.cache_blocks(r)  # the step completed: its full blocks become findable

    # -- rules ------------------------------------------------------------------------------
    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data):
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        r = self.waiting[rid]
        prefix = self.m.get_computed_blocks(r)
        n = prefix.num_tokens
        assert n % self.B == 0 and n < r.num_tokens
        if self.m.allocate_slots(r, r.num_tokens - n, prefix) is None:
            return
        r.num_computed_tokens = n
        self._run(r, r.num_tokens - n)
        self.running[rid] = self.waiting.pop(rid)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 5))
    def append(self, data, token):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        r = self.running[rid]
        r.append_output_token(token)
        while self.m.allocate_slots(r, 1) is None:
            self._preempt_newest()
            if rid not in self.running:
                return
        self._run(r, 1)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), written=st.integers(0, 40))
    def failed_admit(self, data, written):
        """A step that fails part-way: its slots hold garbage, then its request is aborted.
        Nobody may find those blocks afterwards (every later read-back would see the garbage)."""
        rid = data.draw(st.sampled_from(sorted(self.waiting)))
        r = self.waiting[rid]
        prefix = self.m.get_computed_blocks(r)
        n = prefix.num_tokens
        if self.m.allocate_slots(r, r.num_tokens - n, prefix) is None:
            return
        self.m.take_transfers().copy
        table = self.m.get_block_ids(rid)
        for pos in range(n, min(r.num_tokens, n + written)):
            self.slots[table[pos // self.B] * self.B + pos % self.B] = "garbage"
        self.m.free(r)
        r.num_computed_tokens = 0

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.m.free(self.running.pop(rid))

    @precondition(lambda self: self.running)
    @rule()
    def preempt(self):
        self._preempt_newest()

    # -- checks -----------------------------------------------------------------------------
    @invariant()
    def cache_holds_every_request_tokens(self):
        for r in self.running.values():
            table = self.m.get_block_ids(r.request_id)
            read = [self.slots[table[p // self.B] * self.B + p % self.B] for p in range(r.num_computed_tokens)]
            assert read == r.all_token_ids[:r.num_computed_tokens], f"{r.request_id} reads back wrong tokens"

    @invariant()
    def invariants_hold(self):
        self.m.check_invariants(self.running.values())
        expected_min = len({b for r in self.running for b in self.m.get_block_ids(r)})
        assert self.m.pool.num_used_blocks == expected_min

    def teardown(self):
        for r in list(self.running.values()):
            self.m.free(r)
        self.m.check_invariants()
        assert self.m.pool.num_used_blocks == 0


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestKVCache = KVCacheMachine.TestCase
