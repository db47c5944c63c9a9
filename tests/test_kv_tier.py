"""The second KV tier and swap preemption through the engine, on a tiny random-weight LLaMA in float32: outputs
with them equal outputs without them, under preemption storms, failed steps and several tenants."""
import random

import pytest

from pagedserve import LLM, BeamSearchParams, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine, StepError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(n=2, max_tokens=16, temperature=0.9, seed=5, ignore_eos=True)


def prompts(n, lo=5, hi=60, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def drive(engine: LLMEngine, items: dict[str, tuple], salt=None) -> dict[str, list[list[int]]]:
    """Run requests to the end, checking the KV invariants after every step: {id: [tokens of each sample]}."""
    for rid, (prompt, params) in items.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params, cache_salt=salt)
    out = {rid: [[] for _ in range(params.n)] for rid, (_, params) in items.items()}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for c in o.outputs:
                out[o.request_id][c.index] += c.token_ids
        engine.check_invariants()
    assert engine.stats()["kv_blocks_used"] == 0
    return out


def storm() -> dict[str, tuple]:
    """24 requests of up to 84 tokens (6 blocks of 16) for a pool of 24 blocks, a few with 2 seeded samples."""
    return {str(i): (p, SEEDED if i % 5 == 0 else GREEDY) for i, p in enumerate(prompts(24))}


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    """Each request by itself in a roomy engine with neither tier nor preemption."""
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=256)
    return {rid: drive(engine, {rid: item})[rid] for rid, item in storm().items()}


TIERS = {
    "tier_recompute": dict(kv_offload_memory="2MiB"),
    "tier_swap": dict(kv_offload_memory="2MiB", preemption_mode="swap"),
    "disk_tier_swap": dict(preemption_mode="swap", kv_offload_memory="2MiB", kv_offload_dir="{tmp}"),
    # 4 slots: most swaps find no room and fall back to recompute; evictions churn the tier
    "tiny_tier_swap": dict(num_offload_blocks=4, preemption_mode="swap"),
}


@pytest.mark.parametrize("case", list(TIERS))
def test_outputs_equal_without_the_tier_under_a_preemption_storm(tiny_model_dir, alone, tmp_path, case):
    options = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in TIERS[case].items()}
    if "num_offload_blocks" in options:  # the tier's size in blocks: what kv_offload_memory holds
        probe = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=4, kv_offload_memory="1MiB")
        per_block = (1 << 20) // probe.stats()["kv_offload_blocks"]
        options["kv_offload_memory"] = options.pop("num_offload_blocks") * per_block
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64, **options)
    assert drive(engine, storm()) == alone
    s = engine.stats()
    assert s["num_preemptions"] > 0 and s["kv_blocks_offloaded"] > 0
    if options.get("preemption_mode") == "swap":
        assert s["num_swapped_out"] > 0 and s["kv_blocks_loaded"] > 0
    else:
        assert s["num_swapped_out"] == 0 and s["kv_offload_hits"] > 0
    if case == "tiny_tier_swap":
        assert s["num_swapped_out"] < s["num_preemptions"] and s["kv_offload_evictions"] > 0


def test_swap_restores_instead_of_recomputing(tiny_model_dir, alone):
    """The same storm: swap computes each prompt once; recompute runs preempted contexts again."""
    runs = {}
    for mode in ("recompute", "swap"):
        engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64,
                           enable_prefix_caching=False, kv_offload_memory="2MiB", preemption_mode=mode)
        assert drive(engine, storm()) == alone
        runs[mode] = engine.stats()
    prompt_tokens = sum(len(p) for p, _ in storm().values())
    assert runs["swap"]["num_swapped_out"] == runs["swap"]["num_preemptions"] > 0
    assert runs["swap"]["prefill_tokens_computed"] == prompt_tokens
    assert runs["recompute"]["prefill_tokens_computed"] > prompt_tokens


def test_a_prefix_evicted_from_the_pool_is_loaded_from_the_tier(tiny_model_dir):
    """A long prompt, then enough other prompts to push its blocks out of a small pool, then the prompt grown by
    a new turn: with the tier its 5 evicted blocks are loaded; without it, they are computed again."""
    first = prompts(1, 80, 81, seed=3)[0] + [9]  # 5 full blocks and one token
    turn = {"t1": (first, GREEDY)}
    filler = {f"f{i}": (p, GREEDY) for i, p in enumerate(prompts(6, 60, 80, seed=4))}
    runs = {}
    for name, options in (("tier", dict(kv_offload_memory="4MiB")), ("none", {})):
        engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=16, **options)
        out = drive(engine, turn)["t1"][0]
        drive(engine, filler)
        before = engine.stats()
        nxt = first + out + [11, 12, 13]
        runs[name] = (drive(engine, {"t2": (nxt, GREEDY)}), engine.stats(), before, len(nxt))
    (tier_out, tier, tier_before, n), (plain_out, plain, plain_before, _) = runs["tier"], runs["none"]
    assert tier_out == plain_out
    assert plain["prefix_cache_hits"] == plain_before["prefix_cache_hits"]  # the pool had lost every block
    assert tier["kv_offload_hits"] - tier_before["kv_offload_hits"] >= 80
    assert tier["prefill_tokens_computed"] - tier_before["prefill_tokens_computed"] <= n - 80
    assert plain["prefill_tokens_computed"] - plain_before["prefill_tokens_computed"] == n


def test_the_tier_keeps_tenants_apart(tiny_model_dir):
    prompt = prompts(1, 64, 65, seed=6)[0] + [5]
    filler = {f"f{i}": (p, GREEDY) for i, p in enumerate(prompts(6, 60, 80, seed=7))}
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=16, kv_offload_memory="4MiB")
    want = drive(engine, {"a": (prompt, GREEDY)}, salt="tenant-1")["a"]
    drive(engine, filler, salt="tenant-1")  # tenant-1's prompt now lives only in the tier

    def hits_for(salt):
        before = engine.stats()["kv_offload_hits"]
        assert drive(engine, {"probe": (prompt, GREEDY)}, salt=salt)["probe"] == want
        return engine.stats()["kv_offload_hits"] - before
    assert hits_for("tenant-2") == 0
    assert hits_for(None) == 0
    drive(engine, filler, salt="tenant-2")
    assert hits_for("tenant-1") == 64


def test_a_failed_step_that_swapped_recomputes_its_victims(tiny_model_dir, alone, monkeypatch):
    """The step whose copies would park a victim's blocks in the tier fails before they run: its own requests are
    aborted, the victims resume by recompute, and every other request's output is unchanged."""
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64,
                       kv_offload_memory="2MiB", preemption_mode="swap")
    real = engine.runner.run_transfers
    failed = []

    def run_transfers(sched):
        if sched.transfers.offload and not failed and engine.kv_cache.num_swapped_out:
            failed.append(True)
            raise RuntimeError("injected: the copies did not run")
        real(sched)
    monkeypatch.setattr(engine.runner, "run_transfers", run_transfers)
    items = storm()
    for rid, (prompt, params) in items.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    out = {rid: [[] for _ in range(params.n)] for rid, (_, params) in items.items()}
    aborted = []
    while engine.has_unfinished_requests():
        try:
            outputs = engine.step()
        except StepError as e:
            aborted += e.request_ids
            outputs = []
        for o in outputs:
            for c in o.outputs:
                out[o.request_id][c.index] += c.token_ids
        engine.check_invariants()
    assert failed and aborted
    assert {rid: v for rid, v in out.items() if rid not in aborted} == {
        rid: v for rid, v in alone.items() if rid not in aborted}
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("options", [{}, dict(kv_offload_memory="2MiB", preemption_mode="swap")])
def test_batched_beam_searches_in_a_tight_pool_equal_them_with_room(tiny_model_dir, options):
    """Six searches of 3 beams in 14 blocks: beams are preempted while their siblings wait. (This once deadlocked:
    every running beam held for a sibling that could not get back in.)"""
    params = BeamSearchParams(beam_width=3, max_tokens=12)
    items = [{"prompt_token_ids": p} for p in prompts(6, 30, 50, seed=8)]
    roomy = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256).beam_search(items, params)
    tight = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=14, **options)
    got = tight.beam_search(items, params)
    assert [[s.tokens for s in r.sequences] for r in got] == [[s.tokens for s in r.sequences] for r in roomy]
    stats = tight.stats()
    assert stats["num_preemptions"] > 0 and stats["kv_blocks_used"] == 0
    if options:
        assert stats["num_swapped_out"] > 0


def test_tier_options_are_checked():
    with pytest.raises(ValueError, match="kv_offload_memory"):
        EngineConfig(preemption_mode="swap")
    with pytest.raises(ValueError, match="kv_offload_memory"):
        EngineConfig(kv_offload_dir="/tmp")
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig(kv_offload_memory="1GiB", preemption_mode="evict")
    with pytest.raises(ValueError, match="memory size"):
        EngineConfig(kv_offload_memory="lots")
