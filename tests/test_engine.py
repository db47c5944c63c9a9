"""The engine end to end on a tiny random-weight LLaMA: batching, preemption, prefix caching, sampling, stops."""
import random

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine import LLMEngine

GREEDY = dict(temperature=0.0, ignore_eos=True)


def prompts(n, lo=5, hi=60, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256)


def run_engine(engine: LLMEngine, items, params):
    """Drive step() by hand, checking the KV cache invariants after every step."""
    for i, p in enumerate(items):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    tokens = {str(i): [] for i in range(len(items))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)
        engine.check_invariants()
    return [tokens[str(i)] for i in range(len(items))]


def test_batch_invariance_under_preemption(tiny_model_dir, llm):
    items = prompts(24)
    params = SamplingParams(max_tokens=24, **GREEDY)
    alone = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in items]
    # 24 requests of up to 84 tokens each (6 blocks) in 24 blocks: most must wait or be preempted.
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64)
    together = run_engine(engine, items, params)
    assert engine.stats()["num_preemptions"] > 0
    assert together == alone
    assert engine.stats()["kv_blocks_used"] == 0


def test_chunked_prefill_matches_whole_prefill(tiny_model_dir, llm):
    items = prompts(4, 100, 200, seed=1)
    params = SamplingParams(max_tokens=8, **GREEDY)
    whole = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in items], params, use_tqdm=False)]
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=128, max_num_batched_tokens=32)
    assert run_engine(engine, items, params) == whole


def test_prefix_cache_computes_only_the_suffix(tiny_model_dir):
    prefix = prompts(1, 80, 81, seed=2)[0]  # 5 full blocks
    a, b = prefix + [7, 8, 9], prefix + [10, 11, 12, 13]
    params = SamplingParams(max_tokens=10, **GREEDY)
    cached = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64)
    cached.generate([{"prompt_token_ids": a}], params, use_tqdm=False)
    before = cached.stats()
    out = cached.generate([{"prompt_token_ids": b}], params, use_tqdm=False)[0]
    after = cached.stats()
    assert out.num_cached_tokens == 80
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 80
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(b)
    plain = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    ref = plain.generate([{"prompt_token_ids": b}], params, use_tqdm=False)[0]
    assert ref.num_cached_tokens == 0 and out.outputs[0].token_ids == ref.outputs[0].token_ids
    # other salts never share
    other = cached.generate([{"prompt_token_ids": b}], params, use_tqdm=False, cache_salt="tenant-b")[0]
    assert other.num_cached_tokens == 0
    again = cached.generate([{"prompt_token_ids": b}], params, use_tqdm=False, cache_salt="tenant-b")[0]
    assert again.num_cached_tokens == 80


def test_parallel_samples_share_prompt_blocks(tiny_model_dir):
    prompt = prompts(1, 70, 71, seed=3)[0]  # 4 full blocks + 6 tokens
    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(n=4, temperature=1.0, max_tokens=20,
                                                                       ignore_eos=True, seed=1), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    samples = [tuple(o.token_ids) for o in out.outputs]
    assert all(len(s) == 20 for s in samples) and len(set(samples)) == 4
    # 4 separate requests of 90 tokens would hold 4 * 6 = 24 blocks; sharing the 4 full prompt blocks leaves 4 + 4 * 2
    peak = llm.stats()["kv_blocks_peak"]
    print(f"n=4: peak {peak} blocks, 24 without sharing")
    assert peak <= 12
    assert llm.stats()["kv_blocks_used"] == 0


def test_seed_gives_same_text_whatever_the_batch(llm):
    p = prompts(1, 20, 21, seed=4)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": p}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": q} for q in prompts(5, seed=5)]
    noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(others[:2] + [{"prompt_token_ids": p}] + others[2:], [noisy, noisy, seeded, noisy, noisy, noisy],
                        use_tqdm=False)
    assert outs[2].outputs[0].token_ids == alone
    other_seed = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                                        seed=99, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_stop_string_is_cut_from_the_text(llm):
    p = {"prompt_token_ids": prompts(1, 10, 11, seed=6)[0]}
    free = llm.generate([p], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].outputs[0]
    text = free.text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
    out = llm.generate([p], SamplingParams(max_tokens=30, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(free.token_ids)


def test_stop_token_ids_min_tokens_and_ignore_eos(tiny_model_dir):
    engine_llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64)
    p = {"prompt_token_ids": prompts(1, 12, 13, seed=7)[0]}
    free = engine_llm.generate([p], SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
    t = free[2]
    first = free.index(t)
    out = engine_llm.generate([p], SamplingParams(max_tokens=30, stop_token_ids=[t], temperature=0), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == free[:first + 1] and out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == t
    # min_tokens: the stop token cannot be chosen before min_tokens tokens exist
    out = engine_llm.generate([p], SamplingParams(max_tokens=30, stop_token_ids=[t], min_tokens=first + 3,
                                                  temperature=0), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 3 and t not in out.token_ids[:first + 3]
    # EOS: make t the model's EOS; ignore_eos runs on to max_tokens
    engine_llm.llm_engine.eos_token_ids = {t}
    out = engine_llm.generate([p], SamplingParams(max_tokens=30, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:first + 1] and out.stop_reason is None
    out = engine_llm.generate([p], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == free and out.outputs[0].finish_reason == "length"


def test_abort_returns_blocks(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=64)
    for i, p in enumerate(prompts(3, 30, 40, seed=8)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=50, n=2, temperature=1.0))
    for _ in range(4):
        engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort_request(["r0", "r1", "r2"])
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()
    engine.check_invariants()
    assert engine.step() == []


def test_logprobs_are_reported(llm):
    p = {"prompt_token_ids": prompts(1, 10, 11, seed=9)[0]}
    out = llm.generate([p], SamplingParams(max_tokens=5, logprobs=3, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert entry[tok].rank == 1 and len(entry) == 3  # greedy: the sampled token is the top one
        assert max(lp.logprob for lp in entry.values()) == entry[tok].logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_requests_that_can_never_fit_are_rejected(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=4, max_model_len=200)
    with pytest.raises(ValueError, match="maximum context length is 200"):
        engine.add_request("long", {"prompt_token_ids": [5] * 190}, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="whole pool of 4 blocks"):
        engine.add_request("big", {"prompt_token_ids": [5] * 70}, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []}, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad", {"prompt_token_ids": [10**6]}, SamplingParams(max_tokens=10))
    # the queue is not blocked: a request that fits still runs
    engine.add_request("ok", {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=4, **GREEDY))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].request_id == "ok"


def test_max_model_len_reservation_admits_only_whole_windows(tiny_model_dir):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=20, max_model_len=128,
                       kv_reservation="max_model_len")  # a window is 8 blocks: 2 requests fit
    items = prompts(5, 10, 20, seed=10)
    params = SamplingParams(max_tokens=6, **GREEDY)
    for i, p in enumerate(items):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    engine.step()
    assert engine.stats()["num_requests_running"] == 2 and engine.stats()["kv_blocks_used"] == 16
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_invariants()
