"""Structured output, logit_bias and prompt logprobs in the engine, on a tiny random-weight LLaMA.

A random model is the hard case for a grammar: it would never produce JSON by itself, so every output that
parses was made to by the mask. Schemas here are bounded (enums, booleans, no free whitespace) so every
output reaches its end well inside max_tokens.
"""
import json
import re

import jsonschema
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.engine import LLMEngine
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output import GrammarError, unpack_bitmask

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]},
                                          "tag": {"enum": ["red", "green"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
PROMPT = {"prompt_token_ids": [5, 17, 90, 33, 150, 201, 8, 64, 77, 12] * 4}  # 40 tokens: 2 full blocks


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, dtype="float32", num_kv_blocks=256)


def drive(engine: LLMEngine, items: list[tuple[object, SamplingParams]]) -> dict:
    """Run requests to the end by hand, checking the KV invariants after every step; {id: {index: (text, reason)}}."""
    for i, (prompt, params) in enumerate(items):
        engine.add_request(str(i), prompt, params)
    out = {str(i): {} for i in range(len(items))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for c in o.outputs:
                text, _ = out[o.request_id].get(c.index, ("", None))
                out[o.request_id][c.index] = (text + c.text, c.finish_reason)
        engine.check_invariants()
    assert engine.stats()["kv_blocks_used"] == 0
    return out


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def test_every_kind_of_grammar_holds_on_a_random_model(llm):
    cases = [
        (so(json=SCHEMA, disable_any_whitespace=True), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        (so(json=json.dumps(SCHEMA)), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),  # the schema as text
        (so(regex=r"[a-c]{2}-\d{3}"), lambda t: re.fullmatch(r"[a-c]{2}-\d{3}", t) or pytest.fail(t)),
        (so(choice=["yes", "no", 'say "hi"\n']), lambda t: t in ("yes", "no", 'say "hi"\n') or pytest.fail(t)),
        (so(grammar='root ::= "A" [0-9] [0-9]? "!"'), lambda t: re.fullmatch(r"A\d\d?!", t) or pytest.fail(t)),
    ]
    for grammar, check in cases:
        params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=200, structured_outputs=grammar)
        outs = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs
        assert len(outs) == 4
        for c in outs:
            assert c.finish_reason == "stop", (grammar.kind, c.text)
            check(c.text)


def test_json_object_is_always_an_object(llm):
    # Free JSON on a random model nests and runs on; a bias towards closing quotes and braces lets it end.
    tok = llm.get_tokenizer()
    closers = {tok.convert_tokens_to_ids(c): 8.0 for c in ('"', "}")}
    params = SamplingParams(n=8, temperature=1.0, seed=0, max_tokens=128, logit_bias=closers,
                            structured_outputs=so(json_object=True))
    outs = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert len(finished) >= 4
    for c in finished:
        assert isinstance(json.loads(c.text), dict)


def test_grammar_holds_under_preemption_and_prefix_hits(tiny_model_dir):
    """12 constrained requests sharing a prompt in a pool too small for all: preempted ones resume from the
    prefix cache and still finish valid."""
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=16, max_num_batched_tokens=48)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=60,
                            structured_outputs=so(json=SCHEMA, disable_any_whitespace=True))
    out = drive(engine, [(PROMPT, params)] * 12)
    assert engine.stats()["num_preemptions"] > 0
    assert engine.stats()["prefix_cache_hits"] > 0
    for samples in out.values():
        assert len(samples) == 2
        for text, reason in samples.values():
            assert reason == "stop"
            jsonschema.validate(json.loads(text), SCHEMA)


def test_a_neighbour_without_grammar_is_untouched(llm, tiny_model_dir):
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=64)
    constrained = SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=so(regex="[0-9]+"))
    engine.add_request("c", PROMPT, constrained)
    engine.add_request("p", PROMPT, plain)
    tokens = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == "p":
                tokens += o.outputs[0].token_ids
    assert tokens == alone


@pytest.mark.parametrize("grammar, message", [
    (so(json={"type": "objec"}), "invalid json"),
    (so(json="{not json"), "invalid json"),
    (so(regex="(ab"), "invalid regex"),
    (so(grammar="root ::= undefined_rule"), "invalid grammar"),
])
def test_an_invalid_grammar_is_refused_and_leaves_nothing(tiny_model_dir, grammar, message):
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=16)
    with pytest.raises(GrammarError, match=message):
        engine.add_request("bad", PROMPT, SamplingParams(structured_outputs=grammar))
    assert not engine.has_unfinished_requests()
    assert engine.stats()["kv_blocks_used"] == 0


def test_structured_outputs_params_name_exactly_one_grammar():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


def test_unpack_bitmask_matches_the_bits():
    bitmask = torch.tensor([[0b101, -1], [-(1 << 31), 0b10]], dtype=torch.int32)
    allowed = unpack_bitmask(bitmask, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().squeeze(1).tolist() == [0, 2] + list(range(32, 40))
    assert allowed[1].nonzero().squeeze(1).tolist() == [31, 33]


# ---- logit_bias ------------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens(llm):
    greedy = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    free = llm.generate([PROMPT], SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].token_ids
    forced = llm.generate([PROMPT], SamplingParams(logit_bias={99: 100}, **greedy), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [99] * 6
    banned = {t: -100 for t in set(free)}
    out = llm.generate([PROMPT], SamplingParams(logit_bias=banned, **greedy), use_tqdm=False)[0].outputs[0]
    assert not set(out.token_ids) & set(free)
    # Batched with an unbiased neighbour, which keeps its own tokens.
    both = llm.generate([PROMPT, PROMPT], [SamplingParams(logit_bias={99: 100}, **greedy), SamplingParams(**greedy)],
                        use_tqdm=False)
    assert both[0].outputs[0].token_ids == [99] * 6 and both[1].outputs[0].token_ids == free


def test_logit_bias_is_validated(llm):
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={5: 101})
    with pytest.raises(ValueError, match="token ids"):
        SamplingParams(logit_bias={-1: 1})
    with pytest.raises(ValueError, match="logit_bias: token ids must be in"):
        llm.llm_engine.add_request(None, PROMPT, SamplingParams(logit_bias={320: 1}))


# ---- prompt logprobs --------------------------------------------------------------------------------
def reference_prompt_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log-softmax: [len(ids) - 1] log-probabilities of ids[1:]."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    return lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1), lp[:-1]


def test_prompt_logprobs_match_transformers_through_chunks_and_a_warm_cache(tiny_model_dir):
    ids = [(7 * i + 3) % 317 + 3 for i in range(90)]
    want, full = reference_prompt_logprobs(tiny_model_dir, ids)
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=24, max_num_batched_tokens=32)
    # The first request fills the prefix cache; the second must not take its prompt from it.
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3)
    results = []
    for rid in ("a", "b"):
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    results.append(o)
            engine.check_invariants()
    assert len(results) == 2
    for o in results:
        lps = o.prompt_logprobs
        assert lps[0] is None and len(lps) == len(ids)
        got = torch.tensor([lps[p][ids[p]].logprob for p in range(1, len(ids))])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        for p in (1, 45, 89):  # the top-3 are transformers' top-3, best first
            top = [t for t, lp in sorted(lps[p].items(), key=lambda kv: kv[1].rank) if lp.rank <= 3]
            assert top == full[p - 1].topk(3).indices.tolist()
        assert o.num_cached_tokens == 0  # asked for prompt logprobs: nothing came from the cache


def test_prompt_logprobs_survive_preemption_mid_prompt(tiny_model_dir):
    ids = [(11 * i + 5) % 317 + 3 for i in range(70)]
    want, _ = reference_prompt_logprobs(tiny_model_dir, ids)
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=10, max_num_batched_tokens=16)
    # The hog grows to all 10 blocks; "lp" (admitted later) is preempted in the middle of its prompt.
    hog = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add_request("hog", {"prompt_token_ids": [(3 * i) % 300 + 10 for i in range(100)]}, hog)
    engine.add_request("lp", {"prompt_token_ids": ids}, SamplingParams(max_tokens=2, prompt_logprobs=0))
    got, preempted_mid_prompt = None, False
    while engine.has_unfinished_requests():
        lp = engine.groups.get("lp")
        seq = lp.samples[0].seq if lp else None
        before = (seq.num_computed_tokens, seq.num_preemptions) if seq else (0, 0)
        for o in engine.step():
            if o.request_id == "lp" and o.prompt_logprobs is not None:
                got = o.prompt_logprobs
        if seq and seq.num_preemptions > before[1] and 0 < before[0] < len(ids):
            preempted_mid_prompt = True  # preempted in this step, with part of its prompt computed
        engine.check_invariants()
    assert preempted_mid_prompt
    torch.testing.assert_close(torch.tensor([got[p][ids[p]].logprob for p in range(1, len(ids))]), want,
                               atol=1e-4, rtol=0)


def test_max_tokens_zero_computes_the_prompt_only(llm):
    ids = list(range(10, 60))
    o = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=0, prompt_logprobs=1, n=2),
                     use_tqdm=False)[0]
    assert [(c.token_ids, c.text, c.finish_reason) for c in o.outputs] == [([], "", "length")] * 2
    assert len(o.prompt_logprobs) == 50 and o.prompt_logprobs[0] is None
    assert all(len(e) in (1, 2) for e in o.prompt_logprobs[1:])  # the token and the top-1 (the same, or not)
    assert llm.stats()["kv_blocks_used"] == 0


def test_min_tokens_holds_under_a_grammar_unless_only_the_end_is_left(llm):
    """A stop token banned by min_tokens stays banned under a grammar that would allow it; a grammar whose only
    way on is its end is let end."""
    stop_id = llm.get_tokenizer().convert_tokens_to_ids("a")
    free = so(regex="[ab]{1,12}")
    params = SamplingParams(n=6, temperature=1.0, seed=5, max_tokens=20, min_tokens=4, stop_token_ids=[stop_id],
                            structured_outputs=free, logit_bias={stop_id: 5.0})
    for c in llm.generate([PROMPT], params, use_tqdm=False)[0].outputs:
        assert len(c.token_ids) >= 4 and stop_id not in c.token_ids[:4], c.token_ids
    ended = SamplingParams(max_tokens=10, min_tokens=5, structured_outputs=so(choice=["b"]))
    out = llm.generate([PROMPT], ended, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason) == ("b", "stop")


def test_ban_tokens_clears_bits_unless_nothing_would_be_left():
    from pagedserve.structured_output import ban_tokens
    row = torch.tensor([0b110, -(1 << 31)], dtype=torch.int32)  # tokens 1, 2 and 63
    assert ban_tokens(row, [2, 63]) and row.tolist() == [0b010, 0]
    assert not ban_tokens(row, [1]) and row.tolist() == [0b010, 0]  # token 1 is all that is left: kept


def test_grammars_too_long_or_too_costly_are_refused(tiny_model_dir, monkeypatch):
    from pagedserve import structured_output
    engine = LLMEngine(model=tiny_model_dir, dtype="float32", num_kv_blocks=16)
    with pytest.raises(GrammarError, match="longer than"):
        engine.add_request("long", PROMPT, SamplingParams(structured_outputs=so(choice=["x" * 40000, "y" * 40000])))
    monkeypatch.setattr(structured_output, "MAX_FIRST_MASK_S", 0.0)  # every grammar costs more than nothing
    with pytest.raises(GrammarError, match="too costly"):
        engine.add_request("costly", PROMPT, SamplingParams(structured_outputs=so(regex="[a-z]+")))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("vocab, rows", [(49152, [0, 1, 2, 3]), (100, [1, 3]), (33, [2])])
def test_the_c_mask_equals_the_torch_mask(vocab, rows, monkeypatch):
    from pagedserve import structured_output
    if structured_output._mask_library() is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(vocab)
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=gen)
    if len(rows) > 1:
        bitmask[0, 0] = -1  # a word of all-allowed tokens, skipped whole
    logits = torch.randn(4, vocab, generator=gen)
    fast, slow = logits.clone(), logits.clone()
    index = torch.tensor(rows)
    structured_output.mask_logits_(fast, index, bitmask)
    monkeypatch.setattr(structured_output, "_mask_library", lambda: None)
    structured_output.mask_logits_(slow, index, bitmask)
    assert torch.equal(fast, slow)
    assert bool(torch.isinf(fast[rows]).any()) and torch.equal(fast[[r for r in range(4) if r not in rows]],
                                                                    logits[[r for r in range(4) if r not in rows]])


def test_schemas_that_differ_only_in_property_order_are_not_confused(llm):
    """A schema's property order is the order the output writes them in: the compile cache must not hand the
    second schema the first one's grammar."""
    first = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}},
             "required": ["ok", "n"], "additionalProperties": False}
    second = {**first, "properties": {"n": {"enum": [1, 2]}, "ok": {"type": "boolean"}}}
    for schema, start in ((first, '{"ok"'), (second, '{"n"')):
        params = SamplingParams(temperature=0.0, max_tokens=40,
                                structured_outputs=so(json=schema, disable_any_whitespace=True))
        text = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
        assert text.startswith(start), text
