"""Fault injection: a step that fails (in the model, in a middle layer, in the sampler; during a chunked
prefill or a decode) aborts only the requests it was computing, and leaves the KV cache as if it never ran:
afterwards every request gives the tokens of a fresh engine, and the invariants hold."""
from __future__ import annotations

import random

import pytest

import pagedserve.engine as engine_module
from pagedserve import LLM, SamplingParams
from pagedserve.engine import LLMEngine, StepError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
OPTIONS = dict(dtype="float32", block_size=8, num_kv_blocks=64)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 320) for _ in range(n)]


class Fault(RuntimeError):
    pass


def _raise_on_call(k: int, exc=Fault):
    """A hook that raises on its k-th call (1-based) and passes otherwise."""
    calls = {"n": 0}

    def hook(*_args, **_kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise exc("injected fault")
    return hook


def _inject(engine: LLMEngine, where: str, k: int, monkeypatch, exc=Fault) -> None:
    hook = _raise_on_call(k, exc)
    model = engine.runner.model
    if where == "first_layer":
        model.layers[0].register_forward_pre_hook(hook)
    elif where == "middle_layer":  # layer 0 has written its K/V, the later ones have not
        model.layers[len(model.layers) // 2].register_forward_pre_hook(hook)
        graph = engine.runner.decode_graph
        if graph is not None:  # small decode steps replay as kernel calls: the middle one fails there
            build = graph._build

            def failing_build(m):
                calls, keep = build(m)
                i = len(calls) // 2
                fn, args = calls[i]
                calls[i] = (lambda *a, fn=fn: hook() or fn(*a), args)
                return calls, keep
            monkeypatch.setattr(graph, "_build", failing_build)
    elif where == "sampler":  # every layer has written its K/V; the step still fails
        real = engine_module.sample

        def sample(*args, **kwargs):
            hook()
            return real(*args, **kwargs)
        monkeypatch.setattr(engine_module, "sample", sample)
    else:
        raise ValueError(where)


def _run(engine: LLMEngine, prompts: dict[str, list[int]], params=GREEDY) -> dict[str, list[int]]:
    for rid, p in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    out = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out[delta.request_id] += delta.outputs[0].token_ids
        engine.check_invariants()
    return out


# (where, on which call of the hook, engine options, prompt length):
CASES = {
    "prefill_first_layer": ("first_layer", 1, {}, 40),
    "prefill_middle_layer": ("middle_layer", 1, {}, 40),
    "prefill_sampler": ("sampler", 1, {}, 40),
    # 40 tokens in chunks of 16: the second chunk fails after its first layer wrote blocks 2-3.
    "chunked_prefill_middle_layer": ("middle_layer", 2, {"max_num_batched_tokens": 16}, 40),
    # 23 prompt tokens: the first decode step fills block 2 (its 8th slot) and fails half-way.
    "decode_middle_layer": ("middle_layer", 2, {}, 23),
    "decode_sampler": ("sampler", 3, {}, 23),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_step_leaves_the_cache_as_if_it_never_ran(tiny_model_dir, monkeypatch, case):
    where, k, options, n = CASES[case]
    prompt = _prompt(n, seed=n)
    fresh = LLMEngine(model=tiny_model_dir, **OPTIONS, **options)
    want = _run(fresh, {"p": prompt})["p"]
    # Probes that would find any block the failed step touched: the prompt, and the prompt grown by the
    # tokens the failed decode step would have stored.
    probes = {"again": prompt, "grown": prompt + want[:4]}
    want_probes = _run(LLMEngine(model=tiny_model_dir, **OPTIONS, **options), probes)

    engine = LLMEngine(model=tiny_model_dir, **OPTIONS, **options)
    _inject(engine, where, k, monkeypatch)
    engine.add_request("victim", {"prompt_token_ids": prompt}, GREEDY)
    with pytest.raises(StepError) as failure:
        while engine.has_unfinished_requests():
            engine.step()
    assert failure.value.request_ids == ["victim"]
    assert isinstance(failure.value.__cause__, Fault)
    engine.check_invariants()
    assert not engine.has_unfinished_requests() and engine.stats()["kv_blocks_used"] == 0
    assert _run(engine, probes) == want_probes


def test_only_the_failed_steps_requests_fail(tiny_model_dir, monkeypatch):
    """A request waiting (max_num_seqs=1) while the step fails runs on, with its solo tokens."""
    a, b = _prompt(30, 1), _prompt(30, 2)
    want = _run(LLMEngine(model=tiny_model_dir, **OPTIONS), {"b": b})["b"]
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS, max_num_seqs=1)
    _inject(engine, "middle_layer", 3, monkeypatch)  # layer 1 of 2, on its third run: a's second decode
    engine.add_request("a", {"prompt_token_ids": a}, GREEDY)
    engine.add_request("b", {"prompt_token_ids": b}, GREEDY)
    got, failed = {"a": [], "b": []}, None
    while engine.has_unfinished_requests():
        try:
            for delta in engine.step():
                got[delta.request_id] += delta.outputs[0].token_ids
        except StepError as e:
            failed = e.request_ids
        engine.check_invariants()
    assert failed == ["a"] and len(got["a"]) == 2  # a's prefill and first decode went out, then it failed
    assert got["b"] == want


def test_n_samples_fail_together_when_their_first_token_fails(tiny_model_dir, monkeypatch):
    """The sampler fails on the step that would fork n=3 samples: the whole group is aborted, nothing leaks."""
    engine = LLMEngine(model=tiny_model_dir, **OPTIONS)
    _inject(engine, "sampler", 1, monkeypatch)
    engine.add_request("g", {"prompt_token_ids": _prompt(20, 3)}, SamplingParams(n=3, max_tokens=4, seed=1))
    with pytest.raises(StepError):
        engine.step()
    engine.check_invariants()
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_unfinished_requests()


def test_keyboard_interrupt_in_llm_generate_leaves_a_truthful_cache(tiny_model_dir):
    """Ctrl-C in the middle of a forward (as in `pagedserve chat`): the interrupt propagates as it is,
    and the next generate with the same prompt gives a fresh engine's tokens."""
    prompt = {"prompt_token_ids": _prompt(40, 4)}
    want = LLM(tiny_model_dir, **OPTIONS).generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm = LLM(tiny_model_dir, **OPTIONS)
    handle = llm.llm_engine.runner.model.layers[1].register_forward_pre_hook(_raise_on_call(1, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    handle.remove()
    llm.llm_engine.check_invariants()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
