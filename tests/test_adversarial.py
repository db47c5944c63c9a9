"""Hostile input at the engine: no request can make a step fail or reach another request's output."""
from __future__ import annotations

import random

import pytest
import torch

from pagedserve import SamplingParams
from pagedserve.engine import LLMEngine
from pagedserve.sampler import SamplingBatch, sample
from pagedserve.sampling_params import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS

OPTIONS = dict(dtype="float32", block_size=8, num_kv_blocks=256)
V = 320  # the tiny model's vocabulary


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, V) for _ in range(n)]


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], max_steps: int = 1000):
    """Run to completion; returns ({id: sample 0's tokens}, {id: steps until it finished})."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    tokens = {rid: [] for rid in requests}
    finished_at = {}
    for step in range(1, max_steps + 1):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            tokens[out.request_id] += [t for o in out.outputs if o.index == 0 for t in o.token_ids]
            if out.finished:
                finished_at[out.request_id] = step
        engine.check_invariants()
    return tokens, finished_at


def test_a_victim_is_untouched_by_adversarial_neighbours(tiny_model_dir):
    victims = {
        "victim_seeded": (_prompt(30, 1), SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)),
        "victim_greedy": (_prompt(25, 2), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)),
    }
    alone, _ = _run(LLMEngine(model=tiny_model_dir, **OPTIONS), victims)
    long_stops = [f"{i:03d}" + "x" * (MAX_STOP_STRING_LEN - 3) for i in range(MAX_STOP_STRINGS - 2)]
    neighbours = {
        # the edges of the vocabulary, banned until min_tokens
        "edge_ids": (_prompt(20, 3), SamplingParams(max_tokens=12, min_tokens=12, stop_token_ids=[0, V - 1])),
        "extreme_penalties": (_prompt(20, 4), SamplingParams(max_tokens=12, repetition_penalty=1e30,
                                                             frequency_penalty=2.0, presence_penalty=-2.0)),
        "tiny_penalty": (_prompt(20, 5), SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1e-30)),
        "many_stop_strings": (_prompt(20, 6), SamplingParams(max_tokens=12, stop=long_stops + ["e", " "])),
        "huge_logprobs": (_prompt(20, 7), SamplingParams(max_tokens=12, n=4, logprobs=20, temperature=1.5)),
        "all_knobs": (_prompt(20, 8), SamplingParams(max_tokens=12, temperature=1e-4, top_p=1e-9, top_k=1,
                                                     min_p=1.0, seed=2**62)),
    }
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS)
    for bad in ({"stop_token_ids": [10**9], "min_tokens": 2}, {"stop_token_ids": [V]}):
        with pytest.raises(ValueError, match="^stop_token_ids"):
            engine.add_request("bad", {"prompt_token_ids": _prompt(10, 9)}, SamplingParams(max_tokens=4, **bad))
    together, finished_at = _run(engine, {**neighbours, **victims})
    for rid in victims:
        assert together[rid] == alone[rid]
        # Bounded: one step for the prompt, one per further token (the budget fits every prompt at once).
        assert finished_at[rid] <= victims[rid][1].max_tokens
    assert set(finished_at) == set(neighbours) | set(victims)
    assert engine.stats()["kv_blocks_used"] == 0


def test_the_sampler_never_writes_outside_a_rows_logits():
    """Token ids outside [0, V) that get past validation are dropped, not written into the next row."""
    torch.manual_seed(0)
    logits = torch.randn(2, V)
    clean = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=2.0),
              SamplingParams(temperature=0.0)]
    victim_best = int(clean[1].argmax())
    # Row 0's ids V + victim_best and -V + victim_best would alias row 1's best token in the flat logits.
    bad = [V + victim_best, -1, 2 * V]
    batch = SamplingBatch.build(params, [bad, []], [[V + victim_best], []], [None, None], vocab_size=V,
                                banned_token_ids=[[V + victim_best, -V + victim_best], None])
    out = sample(logits, batch)
    assert out.token_ids[1] == victim_best
    assert torch.equal(logits[1], clean[1])


def test_stop_strings_are_capped():
    with pytest.raises(ValueError, match="^stop holds"):
        SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match="^stop strings must be at most"):
        SamplingParams(stop=["x" * (MAX_STOP_STRING_LEN + 1)])
    for bad in ({"temperature": float("inf")}, {"top_p": float("nan")}, {"repetition_penalty": float("inf")},
                {"presence_penalty": float("-inf")}, {"stop_token_ids": [-1]}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}"):
            SamplingParams(**bad)


def test_a_prompt_longer_than_the_budget_runs_alone_without_chunked_prefill(tiny_model_dir):
    """Today it blocks the head of the queue forever; it must run (alone) and the queue behind it too."""
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS, enable_chunked_prefill=False, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want, _ = _run(LLMEngine(model=tiny_model_dir, **OPTIONS), {"long": (_prompt(50, 1), params)})
    tokens, finished_at = _run(engine, {"long": (_prompt(50, 1), params), "short": (_prompt(10, 2), params)},
                               max_steps=50)
    assert set(finished_at) == {"long", "short"}
    assert tokens["long"] == want["long"]


def test_min_tokens_does_not_ban_eos_when_ignore_eos(tiny_model_dir):
    """One rule: min_tokens bans the stop tokens, and EOS only when EOS would stop the request."""
    prompt = _prompt(20, 11)
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS)
    first, _ = _run(engine, {"probe": (prompt, greedy)})
    engine.eos_token_ids = {first["probe"][0]}  # make the greedy first token the EOS
    params = SamplingParams(max_tokens=3, min_tokens=3, temperature=0.0, ignore_eos=True)
    got, _ = _run(engine, {"ignore": (prompt, params)})
    assert got["ignore"][0] == first["probe"][0]
    params = SamplingParams(max_tokens=3, min_tokens=3, temperature=0.0)
    got, _ = _run(engine, {"ban": (prompt, params)})
    assert got["ban"][0] != first["probe"][0] and len(got["ban"]) == 3


def test_a_user_id_cannot_alias_another_requests_sample(tiny_model_dir):
    params2 = SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    params1 = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a, b = _prompt(20, 1), _prompt(17, 2)
    want, _ = _run(LLMEngine(model=tiny_model_dir, **OPTIONS), {"x#1": (b, params1)})
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS)
    engine.add_request("x", {"prompt_token_ids": a}, params2)
    engine.add_request("x#1", {"prompt_token_ids": b}, params1)
    outs: dict[str, dict[int, list[int]]] = {"x": {}, "x#1": {}}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                outs[out.request_id].setdefault(o.index, []).extend(o.token_ids)
        engine.check_invariants()
    assert outs["x#1"] == {0: want["x#1"]}
    assert sorted(outs["x"]) == [0, 1] and all(len(t) == 6 for t in outs["x"].values())
